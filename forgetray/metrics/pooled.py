"""The stage rule of docs/methods.md §4 pooled over replicates (docs/methods.md §10): pure functions, no model, no I/O.

A grid point run with n seeds gives, per checkpoint e, n per-question outcome tables (base, SFT_e, R_e on the same
questions; each replicate has its own base). `classify_pooled` decides the checkpoint's stage from all of them.

**The test: exact McNemar on the pooled discordant pairs, stratified by replicate (our choice).** In replicate k let
b_k = questions base gets right and the other state (SFT_e or R_e) wrong, and c_k = the reverse. Under the null of
no change in replicate k (marginal homogeneity of its paired 2x2 table), given its n_k = b_k + c_k discordant
questions, b_k ~ Binomial(n_k, 1/2); the replicates are independent, so B = sum b_k ~ Binomial(N, 1/2) with
N = sum n_k, and the two-sided p-value is p = min(1, 2 P[X <= min(B, C)]), X ~ Binomial(N, 1/2), C = sum c_k. The
drop is decided on the pooled evidence: B > C (acc falls) and p < alpha, exactly as the single-trial rule decides
it on one table (`significance.mcnemar`).
- It is the Cochran-Mantel-Haenszel test for K paired 2x2 tables, McNemar pooled over strata: the CMH statistic over
  matched pairs reduces to McNemar's (sum b_k - sum c_k)^2 / (sum b_k + sum c_k) (Mantel & Haenszel 1959, JNCI 22:719;
  Agresti, Categorical Data Analysis, 2nd ed. 2002, ch. 10: McNemar's test and its identity with the CMH test over
  pair strata). We use its exact conditional form rather than that chi-square (with or without a continuity
  correction): the null distribution of B given N is known exactly and costs nothing to compute, the discordant
  counts are small on the organism (tens of questions), where the chi-square approximation is poor, and with one
  replicate the pooled rule is then exactly the single-trial rule (tests/test_replicates.py checks it).
- Stratifying by replicate only ever pairs a question's outcomes within one replicate (base_k vs SFT_k); because
  the null probability 1/2 is the same in every stratum, the exact test equals McNemar's exact test on the
  concatenated (replicate, question) pairs, so unequal question counts between replicates need no weights.
- What it tests: "fine-tuning with this recipe drops these questions", with the seeds as strata. Its unit is the
  (replicate, question) pair, and a question's outcomes in different seeds are not independent, so it does not
  generalise to new seeds as a random-effects test would; a test on the n per-replicate deltas (2 degrees of
  freedom with 3 seeds) has almost no power. The seed-to-seed variation is reported alongside instead: how many
  replicates' own tests agree with the pooled stage, and the transition epoch's median and range.

**Not restored (our choice): every replicate's R_e must reach its own base's probing PPL within the tolerance**
(`stage.is_restored`), else the pooled stage is "not_restored". The pooled dR test pools every replicate's R_e
outcomes; one unrestored replicate's R_e still carries the format loss, which the pooled test cannot tell from
knowledge loss, exactly the confusion §4's precondition exists to prevent. A median rule would let it in. How many
replicates were restored is reported (`n_restored`).

Precedence is the single-trial rule's (`stage.stage_from_drops`): not restored, then actual (pooled dR drop), then
pseudo (pooled dS drop), else no forgetting. The transition epoch is summarised over replicates by
`transition_summary`: each replicate's own first "actual" epoch, their median (a replicate that never reached actual
forgetting counts as later than every epoch) and range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from forgetray.metrics.significance import _half_binomial_cdf, mcnemar
from forgetray.metrics.stage import classify_checkpoint, is_restored, stage_from_drops, transition_epoch


@dataclass(frozen=True)
class ReplicateOutcome:
    """One replicate at one checkpoint: per-question correctness of base, SFT_e and R_e (same questions, boolean or
    0/1 of shape [N]) and the probing perplexities of base and R_e."""

    base_correct: Any
    sft_correct: Any
    restored_correct: Any
    base_ppl: float
    restored_ppl: float


@dataclass(frozen=True)
class PooledMcNemar:
    """Exact McNemar over strata: n pairs in all, b01 = sum of (a wrong, b right), b10 = sum of (a right, b wrong);
    delta = (b01 - b10) / n = acc(b) - acc(a) over all pairs; two-sided p conditional on b01 + b10."""

    strata: int
    n: int
    b01: int
    b10: int
    delta: float
    p_value: float


@dataclass(frozen=True)
class PooledStage:
    """A checkpoint's pooled stage, its pooled deltas and p-values, whether (and in how many replicates) restoration
    worked, each replicate's own stage (single-trial rule, McNemar) and how many of those agree with the pooled one."""

    stage: str
    d_sft: float
    d_restored: float
    p_sft: float
    p_restored: float
    restored_ok: bool
    n_restored: int
    replicate_stages: tuple[str, ...]

    @property
    def n(self) -> int:
        return len(self.replicate_stages)

    @property
    def agreeing(self) -> int:
        return sum(stage == self.stage for stage in self.replicate_stages)


@dataclass(frozen=True)
class TransitionSummary:
    """The transition epoch over replicates: each one's own (None: no actual forgetting), their median (None when
    the middle of the sorted epochs is a replicate that never got there) and range over those that did."""

    epochs: tuple[int | None, ...]
    median: float | None
    low: int | None
    high: int | None

    @property
    def reached(self) -> int:
        return sum(epoch is not None for epoch in self.epochs)


def pooled_mcnemar(pairs: Sequence[tuple[Any, Any]]) -> PooledMcNemar:
    """The exact McNemar test on K strata's paired outcomes [(a_1, b_1), ..., (a_K, b_K)] (module docstring): the
    discordant counts are summed over strata, B = sum b10_k ~ Binomial(sum (b01_k + b10_k), 1/2) under the null."""
    if not pairs:
        raise ValueError("pooled_mcnemar needs at least one stratum")
    tables = [mcnemar(a, b) for a, b in pairs]  # checks each stratum's vectors (same questions, 0/1)
    n = sum(t.n for t in tables)
    b01 = sum(t.b01 for t in tables)
    b10 = sum(t.b10 for t in tables)
    discordant = b01 + b10
    p_value = 1.0 if discordant == 0 else min(1.0, 2.0 * _half_binomial_cdf(min(b01, b10), discordant))
    return PooledMcNemar(strata=len(tables), n=n, b01=b01, b10=b10, delta=(b01 - b10) / n, p_value=p_value)


def classify_pooled(replicates: Sequence[ReplicateOutcome], *, alpha: float = 0.05,
                    ppl_tolerance: float = 0.05) -> PooledStage:
    """The stage of one checkpoint from all replicates' outcomes (module docstring: the test, the restoration rule,
    the precedence), with each replicate's own stage by the single-trial rule at the same alpha and tolerance."""
    if not replicates:
        raise ValueError("classify_pooled needs at least one replicate")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    sft = pooled_mcnemar([(r.base_correct, r.sft_correct) for r in replicates])
    restored = pooled_mcnemar([(r.base_correct, r.restored_correct) for r in replicates])
    n_restored = sum(is_restored(r.base_ppl, r.restored_ppl, ppl_tolerance) for r in replicates)
    restored_ok = n_restored == len(replicates)
    stage = stage_from_drops(sft.delta < 0 and sft.p_value < alpha, restored.delta < 0 and restored.p_value < alpha,
                             restored_ok)
    own = tuple(classify_checkpoint(r.base_correct, r.sft_correct, r.restored_correct, r.base_ppl, r.restored_ppl,
                                    test="mcnemar", alpha=alpha, ppl_tolerance=ppl_tolerance).stage
                for r in replicates)
    return PooledStage(stage=stage, d_sft=sft.delta, d_restored=restored.delta, p_sft=sft.p_value,
                       p_restored=restored.p_value, restored_ok=restored_ok, n_restored=n_restored,
                       replicate_stages=own)


def transition_summary(stages_by_replicate: Sequence[Mapping[int, str]]) -> TransitionSummary:
    """Each replicate's transition epoch (its first "actual_forgetting", `stage.transition_epoch`), their median and
    range. The median sorts a replicate without one after every epoch (it is right-censored: it may get there
    later), so it is None when that replicate sits in the middle; the range is over the replicates that got there."""
    if not stages_by_replicate:
        raise ValueError("transition_summary needs at least one replicate")
    epochs = tuple(transition_epoch(stages) for stages in stages_by_replicate)
    ordered = sorted(math.inf if epoch is None else epoch for epoch in epochs)
    half = len(ordered) // 2
    middle = ordered[half:half + 1] if len(ordered) % 2 else ordered[half - 1:half + 1]
    median = None if math.inf in middle else sum(middle) / len(middle)
    reached = [epoch for epoch in epochs if epoch is not None]
    return TransitionSummary(epochs=epochs, median=median, low=min(reached) if reached else None,
                             high=max(reached) if reached else None)
