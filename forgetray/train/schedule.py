"""Learning-rate schedule as a pure function (docs/methods.md §1: cosine with 3% linear warm-up, our choice; CF's step
decay of 0.85 per epoch, docs/methods.md §1 "CF settings")."""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio) if warmup_ratio > 0 else 0


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str, steps_per_epoch: int = 0,
              decay: float = 1.0) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based).

    Warm-up rises linearly from 1/warmup to 1 (the first step already trains, unlike a warm-up from 0); then
    "cosine" decays to 0 at `total_steps`, "constant" stays at 1, "step" is `decay ** (step // steps_per_epoch)`
    (every step of epoch e, 1-based, at decay^(e-1)). "constant" and "step" do not read `total_steps`: a shorter run
    is a prefix of a longer one (forgetray.sharing), unless a warm-up (whose length is a share of the total) precedes.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        if steps_per_epoch < 1:
            raise ValueError("the 'step' lr schedule needs steps_per_epoch >= 1")
        return decay ** (step // steps_per_epoch)
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown lr schedule {schedule!r}")
