"""The reported variants of the stage rule (docs/methods.md §4) as pure functions: no model, no I/O. The headline
verdict is the margin rule (`forgetray.metrics.margin`); significance alone is no verdict (with enough questions or
seeds any residual is significant), so these two stay beside it, never in its place.

For checkpoint e, dS = acc(SFT_e) - acc(base) and dR = acc(R_e) - acc(base). A "drop" is decided either by a
paired significance test on per-question correctness (`classify_checkpoint`, the main variant) or by a fixed
threshold on the accuracy deltas (`classify_fixed`, the variant docs/methods.md asks to report alongside).

Choices where docs/methods.md leaves room:
- Restoration precondition: "PPL(R_e) within 5% of PPL(base)" is read as PPL(R_e) <= PPL(base) * (1 + tolerance);
  a restored model with a *lower* probing perplexity than base has restored the text pattern, so it counts.
  A nan perplexity is not restored. Without a restoration the deltas are still reported, the stage is
  "not_restored".
- Precedence: docs/methods.md's "actual" (dR < -tau) does not require dS < -tau. A drop that survives restoration means
  knowledge is lost whatever the SFT model showed, so "actual_forgetting" wins whenever the restored model drops;
  then "pseudo_forgetting" when only the SFT model drops; else "no_forgetting".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from forgetray.metrics.significance import mcnemar, significant_drop

NO_FORGETTING = "no_forgetting"
PSEUDO_FORGETTING = "pseudo_forgetting"
ACTUAL_FORGETTING = "actual_forgetting"
NOT_RESTORED = "not_restored"
INCONCLUSIVE = "inconclusive"  # the margin rule's (metrics.margin): an interval straddles the margin
STAGES = (NO_FORGETTING, PSEUDO_FORGETTING, ACTUAL_FORGETTING, INCONCLUSIVE, NOT_RESTORED)

# Integer codes for logging a stage as a numeric metric; ordered by severity, negative for "could not be judged".
STAGE_CODES: dict[str, int] = {INCONCLUSIVE: -2, NOT_RESTORED: -1, NO_FORGETTING: 0, PSEUDO_FORGETTING: 1,
                               ACTUAL_FORGETTING: 2}

# Slack for classify_fixed so that a delta equal to -tau up to float rounding (0.48 - 0.50) is not a drop.
_FLOAT_SLACK = 1e-12


@dataclass(frozen=True)
class StageResult:
    """A checkpoint's stage, its accuracy deltas vs base, their p-values (None where no p-value applies), and
    whether restoration reached the base probing perplexity."""

    stage: str
    d_sft: float
    d_restored: float
    p_sft: float | None
    p_restored: float | None
    restored_ok: bool


def is_restored(base_ppl: float, restored_ppl: float, ppl_tolerance: float = 0.05) -> bool:
    """Whether the restored model's probing perplexity is at most (1 + tolerance) times the base's."""
    if ppl_tolerance < 0:
        raise ValueError(f"ppl_tolerance must be non-negative, got {ppl_tolerance}")
    if math.isnan(base_ppl) or math.isnan(restored_ppl):
        return False
    return restored_ppl <= base_ppl * (1.0 + ppl_tolerance)


def stage_from_drops(sft_drop: bool, restored_drop: bool, restored_ok: bool) -> str:
    """The stage from the two drop decisions, with the precedence in the module docstring."""
    if not restored_ok:
        return NOT_RESTORED
    if restored_drop:
        return ACTUAL_FORGETTING
    if sft_drop:
        return PSEUDO_FORGETTING
    return NO_FORGETTING


def classify_checkpoint(
    base_correct,
    sft_correct,
    restored_correct,
    base_ppl: float,
    restored_ppl: float,
    *,
    test: str = "mcnemar",
    alpha: float = 0.05,
    ppl_tolerance: float = 0.05,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> StageResult:
    """Stage of one checkpoint from per-question correctness of base, SFT_e and R_e on the same questions.

    A drop is "significantly worse than base" (`significant_drop`: McNemar p < alpha with a negative delta, or a
    paired-bootstrap (1 - alpha) CI entirely below 0). p-values are McNemar's; None with the bootstrap, whose
    decision is the CI (n_resamples and seed only matter there).
    """
    sft = mcnemar(base_correct, sft_correct)
    restored = mcnemar(base_correct, restored_correct)
    options = {"alpha": alpha, "test": test, "n_resamples": n_resamples, "seed": seed}
    sft_drop = significant_drop(base_correct, sft_correct, **options)
    restored_drop = significant_drop(base_correct, restored_correct, **options)
    restored_ok = is_restored(base_ppl, restored_ppl, ppl_tolerance)
    with_p = test == "mcnemar"
    return StageResult(
        stage=stage_from_drops(sft_drop, restored_drop, restored_ok),
        d_sft=sft.delta,
        d_restored=restored.delta,
        p_sft=sft.p_value if with_p else None,
        p_restored=restored.p_value if with_p else None,
        restored_ok=restored_ok,
    )


def classify_fixed(
    acc_base: float,
    acc_sft: float,
    acc_restored: float,
    base_ppl: float,
    restored_ppl: float,
    *,
    tau: float = 0.02,
    ppl_tolerance: float = 0.05,
) -> StageResult:
    """Fixed-threshold variant: a drop is an accuracy delta below -tau (a delta of exactly -tau is not a drop)."""
    if tau < 0:
        raise ValueError(f"tau must be non-negative, got {tau}")
    d_sft = float(acc_sft) - float(acc_base)
    d_restored = float(acc_restored) - float(acc_base)
    restored_ok = is_restored(base_ppl, restored_ppl, ppl_tolerance)
    stage = stage_from_drops(d_sft < -tau - _FLOAT_SLACK, d_restored < -tau - _FLOAT_SLACK, restored_ok)
    return StageResult(stage, d_sft, d_restored, None, None, restored_ok)


def transition_epoch(stages_by_epoch: Mapping[int, str]) -> int | None:
    """The first (smallest) epoch classified "actual_forgetting", or None if there is none."""
    unknown = set(stages_by_epoch.values()) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; expected some of {STAGES}")
    actual = [epoch for epoch, stage in stages_by_epoch.items() if stage == ACTUAL_FORGETTING]
    return min(actual) if actual else None
