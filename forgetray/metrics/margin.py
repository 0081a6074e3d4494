"""The margin rule (METHODS.md §4 and §10): a stage verdict about how much knowledge was lost, not about how many
questions or seeds were collected. Pure functions: numpy only, seeded and deterministic.

Per checkpoint e, with B the base, SFT_e the fine-tuned model, R_e its restoration and R_0 the control (the
untouched start put through the same restoration recipe), all on the same questions:
- drop `D_S = acc(B) - acc(SFT_e)`, residual `D_R = acc(R_0) - acc(R_e)` (positive = knowledge lost);
- recoverable share `(acc(R_e) - acc(SFT_e)) / (acc(R_0) - acc(SFT_e))`;
- intervals from a paired bootstrap over questions (the same question draws for every model); with replicates
  (outcomes of shape [seeds, questions]) a two-level bootstrap: seeds with replacement, then questions with
  replacement, one question draw shared by every seed and model, because the seeds answer the same questions and
  seed x question pairs are not independent observations;
- the verdict against a margin delta, the smallest loss that matters: **actual** when the residual's lower bound is
  above delta (this wins), **no forgetting** when the drop's upper bound is below delta, **pseudo** when the drop's
  lower bound is above delta and the residual's upper bound below it, **inconclusive** otherwise (an interval
  straddles delta: `why` says which), **not restored** first of all when PPL(R_e) is not within the tolerance of
  PPL(R_0), either side.

Adding questions or seeds only narrows the intervals, so a residual well inside the margin converges to "pseudo"
and one well beyond it to "actual"; only the share of "inconclusive" changes (tests/test_margin_simulation.py).
Family-wise over the epochs of a grid point: Bonferroni, each epoch's interval at level 1 - alpha / epochs
(`epoch_level`); Holm has no interval form, so the simpler, slightly conservative adjustment is ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from forgetray.metrics.stage import (ACTUAL_FORGETTING, INCONCLUSIVE, NO_FORGETTING, NOT_RESTORED, PSEUDO_FORGETTING,
                                     STAGES)

REPORTED_MARGINS = (0.01, 0.02, 0.05)  # every table shows the verdict at each of these too (METHODS.md §4)
N_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile bootstrap interval [low, high] (nan where undefined)."""

    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Deltas:
    """One checkpoint's drop D_S, residual D_R and recoverable share with intervals at `level`, from `seeds` x
    `questions` outcomes."""

    d_sft: Interval
    d_restored: Interval
    share: Interval
    level: float
    seeds: int
    questions: int


@dataclass(frozen=True)
class MarginVerdict:
    """The stage at margin `margin`; `why` says what an inconclusive or not-restored verdict lacks ("" otherwise)."""

    stage: str
    why: str
    margin: float


def outcomes(values, name: str) -> np.ndarray:
    """Per-question correctness as a boolean [seeds, questions] array (a 1-D vector is one seed)."""
    arr = np.asarray(values)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be [questions] or [seeds, questions] with at least one of each, "
                         f"got shape {arr.shape}")
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must be boolean or 0/1")
    return arr.astype(bool)


def _counts(n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Multinomial(n, uniform over n) counts per resample, [n_resamples, n]: n uniform indices per resample, counted
    (the same law as `rng.multinomial`, which draws category by category and is 8x slower at 300 questions)."""
    idx = rng.integers(0, n, size=(n_resamples, n)) + (n * np.arange(n_resamples))[:, None]
    return np.bincount(idx.ravel(), minlength=n_resamples * n).reshape(n_resamples, n)


def resample_means(matrices: Mapping[str, np.ndarray], n_resamples: int, rng: np.random.Generator) -> dict:
    """Bootstrap means of each [S, Q] matrix under one shared resampling: seed counts c (multinomial over S; all ones
    when S = 1) and question counts k (multinomial over Q); a resample's mean is c @ X @ k / (S Q), the same c and k
    for every matrix, so paired differences stay paired."""
    shapes = {m.shape for m in matrices.values()}
    if len(shapes) != 1:
        raise ValueError(f"every state must answer the same seeds x questions, got shapes {sorted(shapes)}")
    (s, q), = shapes
    seeds = _counts(s, n_resamples, rng).astype(float) if s > 1 else np.ones((n_resamples, 1))
    questions = _counts(q, n_resamples, rng)
    names = list(matrices)
    stacked = np.concatenate([matrices[name].astype(float) for name in names], axis=1)  # [S, n x Q]: one matmul
    per_question = (seeds @ stacked).reshape(n_resamples, len(names), q)
    means = np.einsum("bnq,bq->nb", per_question, questions) / (s * q)
    return dict(zip(names, means))


def _interval(estimate: float, draws: np.ndarray, level: float) -> Interval:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return Interval(float(estimate), float(low), float(high))


def deltas(base, sft, restored, control, *, level: float = 0.95, n_resamples: int = N_RESAMPLES,
           seed: int = 0) -> Deltas:
    """D_S, D_R and the recoverable share of one checkpoint with `level` intervals (module docstring). Inputs are
    per-question correctness, [questions] for one trial or [seeds, questions] for replicates (row k of every input
    is replicate k; the same question in every column)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_resamples < 100:
        raise ValueError(f"n_resamples must be >= 100, got {n_resamples}")
    b, s, r, c = (outcomes(x, name) for x, name in ((base, "base"), (sft, "sft"), (restored, "restored"),
                                                     (control, "control")))
    shapes = {x.shape for x in (b, s, r, c)}
    if len(shapes) != 1:  # before the differences: numpy would broadcast a 1-seed state over the others' seeds
        raise ValueError(f"every state must answer the same seeds x questions, got shapes {sorted(shapes)}")
    differences = {"d_sft": b.astype(int) - s, "d_restored": c.astype(int) - r,
                   "gain": r.astype(int) - s, "gap": c.astype(int) - s}
    observed = {name: float(m.mean()) for name, m in differences.items()}
    draws = resample_means(differences, n_resamples, np.random.default_rng(seed))
    gap = _interval(observed["gap"], draws["gap"], level)
    if gap.low > 0:  # a drop below R_0 that the interval tells from zero: the ratio is bounded
        share = _interval(observed["gain"] / observed["gap"], draws["gain"] / draws["gap"], level)
    else:  # nothing (clearly) lost relative to R_0: the share's interval would be unbounded
        share = Interval(math.nan, math.nan, math.nan)
    return Deltas(d_sft=_interval(observed["d_sft"], draws["d_sft"], level),
                  d_restored=_interval(observed["d_restored"], draws["d_restored"], level),
                  share=share, level=level, seeds=b.shape[0], questions=b.shape[1])


def within_control(control_ppl: float, restored_ppl: float, tolerance: float = 0.05) -> bool:
    """The precondition: PPL(R_e) within `tolerance` of PPL(R_0), either side (nan: not restored)."""
    if tolerance < 0:
        raise ValueError(f"ppl_tolerance must be non-negative, got {tolerance}")
    if math.isnan(control_ppl) or math.isnan(restored_ppl) or control_ppl <= 0:
        return False
    return abs(restored_ppl / control_ppl - 1.0) <= tolerance


def classify(found: Deltas, margin: float, restored_ok: bool) -> MarginVerdict:
    """The stage of one checkpoint at margin delta (module docstring), with what an unclear verdict lacks."""
    if not 0.0 < margin < 1.0:
        raise ValueError(f"stage_margin must be in (0, 1), got {margin}")
    ds, dr = found.d_sft, found.d_restored
    if not restored_ok:
        return MarginVerdict(NOT_RESTORED, "PPL(R_e) not within the tolerance of PPL(R_0)", margin)
    if dr.low > margin:
        return MarginVerdict(ACTUAL_FORGETTING, "", margin)
    if ds.high < margin:
        return MarginVerdict(NO_FORGETTING, "", margin)
    if ds.low > margin and dr.high < margin:
        return MarginVerdict(PSEUDO_FORGETTING, "", margin)
    straddles = [f"{name} [{i.low:+.3f}, {i.high:+.3f}]" for name, i in (("D_S", ds), ("D_R", dr))
                 if i.low <= margin <= i.high]
    return MarginVerdict(INCONCLUSIVE, " and ".join(straddles) + f" straddle{'s' if len(straddles) == 1 else ''}"
                         f" {margin:g}: more questions or seeds settle it", margin)


def epoch_level(alpha: float, epochs: int) -> float:
    """Bonferroni over the epochs of a grid point: each epoch's interval at 1 - alpha / epochs."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return 1.0 - alpha / epochs


def epoch_seed(seed: int, epoch: int) -> int:
    """Each epoch its own bootstrap stream, so a verdict does not depend on which other epochs were judged."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def transition(stages_by_epoch: Mapping[int, str]) -> int | None:
    """The first epoch classified "actual_forgetting" by the margin rule, or None."""
    unknown = set(stages_by_epoch.values()) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; expected some of {STAGES}")
    actual = [e for e, stage in stages_by_epoch.items() if stage == ACTUAL_FORGETTING]
    return min(actual) if actual else None
