"""Rehearsal (docs/methods.md §6): a fine-tuning phase's training set also replays a small sample of an earlier phase's data; by
default 1% of the earlier dataset (Scialom et al. 2022), sweepable.

Count: replay_count = round(ratio * n_previous), rounding halves up, computed on the decimal value of `ratio` as
written (`Decimal(str(ratio))`), so that e.g. ratio 0.005 of 100 examples is exactly 0.5 -> 1 instead of depending on
the binary float 0.005 * 100; and at least 1 whenever ratio > 0 and there are earlier examples (a rehearsal run
never silently replays nothing).

Sample: `numpy.random.default_rng(seed).choice(n_previous, count, replace=False)`, i.e. numpy's default Generator
(PCG64) seeded with `seed`, sorted ascending. NumPy does not promise the same stream across all of its versions, so
record the indices (or the numpy version) with a run if they must be reproduced elsewhere.

Order: `mix` returns `current` in its order followed by the replayed examples in index order; the training loop
shuffles the whole set every epoch, so this order is only for inspection and tests.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Sequence, TypeVar

import numpy as np

T = TypeVar("T")

DEFAULT_REPLAY_RATIO = 0.01  # Scialom et al. 2022


def _check_ratio(ratio: float) -> Decimal:
    try:
        value = Decimal(str(float(ratio)))
    except (TypeError, ValueError):
        raise ValueError(f"replay ratio must be a number in [0, 1], got {ratio!r}") from None
    if value.is_nan() or not Decimal(0) <= value <= Decimal(1):
        raise ValueError(f"replay ratio must be in [0, 1], got {ratio!r}")
    return value


def replay_count(n_previous: int, ratio: float) -> int:
    """Number of earlier-stage examples replayed: round-half-up of ratio * n_previous, at least 1 if both > 0."""
    value = _check_ratio(ratio)
    if isinstance(n_previous, bool) or int(n_previous) != n_previous or n_previous < 0:
        raise ValueError(f"n_previous must be a non-negative integer, got {n_previous!r}")
    n_previous = int(n_previous)
    count = int((value * n_previous).to_integral_value(rounding=ROUND_HALF_UP))
    if value > 0 and n_previous > 0:
        count = max(count, 1)
    return min(count, n_previous)


def replay_indices(n_previous: int, ratio: float, seed: int) -> list[int]:
    """replay_count(n_previous, ratio) distinct indices into the earlier dataset, sorted; deterministic in `seed`
    (numpy `default_rng(seed)`, sampling without replacement)."""
    count = replay_count(n_previous, ratio)
    if count == 0:
        return []
    rng = np.random.default_rng(seed)
    chosen = rng.choice(int(n_previous), size=count, replace=False)
    return sorted(int(i) for i in chosen)


def mix(current: Sequence[T], previous: Sequence[T], ratio: float, seed: int) -> list[T]:
    """The phase's training set: all of `current` (in order), then the replayed sample of `previous` (in index
    order). len(result) == len(current) + replay_count(len(previous), ratio)."""
    replayed = [previous[i] for i in replay_indices(len(previous), ratio, seed)]
    return list(current) + replayed
