"""The margin rule (forgetray.metrics.margin, docs/methods.md §4 and §10) on simulated outcomes with a known truth: what
issue 17 asks it to show. Per draw: 300 questions, 30 seeds (the first 3, 10 or 30 are used), the true residual
D_R = acc(R_0) - acc(R_e) exactly 0, 0.5 x delta or 2.5 x delta (delta = 0.02), at a base below the ceiling and at
a base at 1.000. Over the draws:
- the margin rule never calls 0 or 0.5 x delta "actual" (in >= 95% of draws not), at any seed count;
- it calls 2.5 x delta "actual" at 30 seeds: at the ceiling in >= 95% of draws, below it in 90% (a shortfall
  asserted as measured: 300 questions, not the seeds, limit it; `test_beyond_the_margin_is_actual_at_30_seeds`);
- the share of "inconclusive" falls as seeds grow;
- the pooled McNemar rule (metrics.pooled, against the control) calls 0.5 x delta "actual" at 30 seeds in most
  draws: significance is not size (the defect the margin rule removes);
- the 95% intervals cover the true D_R and D_S in 95% +- 3% of draws.

The generative model, chosen once for realism (not fitted to make these pass):
- Question q has an accuracy a_q, the chance a model of this family answers it: below the ceiling 1 (70% of
  questions), 0.5 (20%, "borderline") or 0 (10%); at the ceiling all 1. Mean accuracy abar = 0.8 or 1.
- Forgetting is sparse: 10% of questions are fragile (w_q = 10, else 0, mean 1) and carry all the loss, as
  fine-tuning damages some facts and leaves most alone; the number of fragile questions among 300 varies from draw
  to draw (binomial), which is most of the residual's variance at 30 seeds.
- Seeds differ moderately: seed s loses m_s x as much (0.75 or 1.25, mean 1).
- A model answers q correctly iff a uniform u < its chance: R_0's chance a_q, SFT_e's a_q (1 - min(1, w_q m_s
  drop / abar)) with drop 0.08, R_e's a_q (1 - w_q m_s residual / abar), so that the true D_S is computed exactly
  (`true_drop`) and the true D_R is exactly the residual. The loss is relative to what a question's accuracy is:
  a borderline question has less to lose.
- The three models of one seed share the uniform u_sq (a question all of them know stays known: restoration
  of the base keeps what it knew, and the outcomes are nested), except on borderline questions, where each model
  uses the shared u half the time and its own otherwise: two different models agree on a coin-flip question more
  often than chance, not always. This symmetric churn is what R_0 vs R_e looks like on a real benchmark; without
  it a residual of 0 would give R_e == R_0 exactly and "never actual at 0" would be empty. At the ceiling there
  are no borderline questions, so every discordant pair points one way (docs/methods.md §4's ceiling case).
- The base is one draw per question (B answers q iff its own uniform < a_q), shared by all seeds.

The rule is run with `margin.deltas(..., crossed=True)`: the two-level bootstrap's spread scaled to the crossed
design's variance, with t at its degrees of freedom. The plain two-level bootstrap (crossed=False, the default)
counts the per-cell noise about three times and fails the coverage band (table below).

Measured with 2000 draws and 1000 resamples (Monte Carlo sd 0.5%): coverage of the true D_R / D_S, and the share of
draws called actual (A) and inconclusive (I), crossed [plain]:
  below the ceiling (true D_S 0.070)
    seeds  D_R 0.5 delta     D_R 2.5 delta     D_S            A at 2.5 delta  I at 0 / 0.5 / 2.5 delta
    3      0.969 [0.991]     0.955 [0.978]     0.953 [0.958]  0.363 [0.339]   0.77 / 0.94 / 0.64
    10     0.960 [0.997]     0.945 [0.972]     0.950 [0.955]  0.777 [0.655]   0.30 / 0.78 / 0.22
    30     0.947 [0.994]     0.940 [0.959]     0.945 [0.945]  0.903 [0.866]   0.21 / 0.45 / 0.10
  at the ceiling (true D_S 0.080)
    3      0.948 [0.986]     0.935 [0.955]     0.922 [0.917]  0.584 [0.708]   0.06 / 0.58 / 0.42
    10     0.950 [0.988]     0.947 [0.961]     0.949 [0.950]  0.951 [0.932]   0.00 / 0.13 / 0.05
    30     0.951 [0.981]     0.944 [0.947]     0.941 [0.941]  0.971 [0.968]   0.00 / 0.02 / 0.03
  "actual" at 0 or 0.5 delta: at most 0.1% in every cell; pooled McNemar "actual" at 0.5 delta, 30 seeds: 87.3%
  below the ceiling, 100% at it.

Runtime: one pass of 200 draws per base (each draw: 9 margin-rule bootstraps of 500 resamples, one pooled McNemar),
shared by every test of that base through a module fixture; about 15 s of CPU in all.
"""

from __future__ import annotations

import numpy as np
import pytest

from forgetray.metrics import margin
from forgetray.metrics.pooled import ReplicateOutcome, classify_pooled
from forgetray.metrics.stage import ACTUAL_FORGETTING

DELTA = 0.02
RESIDUALS = (0.0, 0.5 * DELTA, 2.5 * DELTA)
SEEDS = (3, 10, 30)
QUESTIONS = 300
DROP = 0.08
FRAGILE = 0.1  # share of fragile questions; each carries 1 / FRAGILE of the mean loss
SEED_EFFECTS = (0.75, 1.25)
DRAWS = 200
RESAMPLES = 500


def mean_accuracy(ceiling: bool) -> float:
    return 1.0 if ceiling else 0.7 * 1.0 + 0.2 * 0.5


def true_drop(ceiling: bool) -> float:
    """E[acc(B) - acc(SFT_e)] over questions and seeds: abar x P(fragile) x E_m min(1, m drop / (P(fragile) abar))."""
    abar = mean_accuracy(ceiling)
    return abar * FRAGILE * float(np.mean([min(1.0, m * DROP / (FRAGILE * abar)) for m in SEED_EFFECTS]))


def draw(rng: np.random.Generator, seeds: int, ceiling: bool):
    """One draw of base, SFT_e, {residual: R_e}, R_0 as [seeds, questions] booleans (module docstring)."""
    q = QUESTIONS
    a = np.ones(q) if ceiling else rng.choice([1.0, 0.5, 0.0], size=q, p=[0.7, 0.2, 0.1])
    abar = mean_accuracy(ceiling)
    w = (rng.random(q) < FRAGILE) / FRAGILE
    m = rng.choice(SEED_EFFECTS, size=seeds)[:, None]
    shared = rng.random((seeds, q))
    borderline = (a > 0) & (a < 1)

    def uniform():  # the seed's shared uniform, or on a borderline question half the time the model's own
        own, keep = rng.random((seeds, q)), rng.random((seeds, q)) < 0.5
        return np.where(borderline & ~keep, own, shared)

    base = np.broadcast_to(rng.random(q) < a, (seeds, q))
    control = uniform() < a
    sft = uniform() < a * (1 - np.minimum(1.0, w * m * DROP / abar))
    u = uniform()
    restored = {r: u < a * (1 - w * m * r / abar) for r in RESIDUALS}  # w m r / abar <= 0.78: never clipped
    return base, sft, restored, control


def simulate(ceiling: bool) -> dict:
    """Per (seeds, residual): the stage, whether the D_R and D_S intervals cover the truth, over DRAWS draws; and the
    pooled McNemar stage at 0.5 x delta with 30 seeds."""
    rng = np.random.default_rng(17 + ceiling)
    drop = true_drop(ceiling)
    cells = {(s, r): {"stage": [], "covers_r": [], "covers_s": []} for s in SEEDS for r in RESIDUALS}
    mcnemar = []
    for i in range(DRAWS):
        base, sft, restored, control = draw(rng, max(SEEDS), ceiling)
        for s in SEEDS:
            for r in RESIDUALS:
                found = margin.deltas(base[:s], sft[:s], restored[r][:s], control[:s], level=0.95,
                                      n_resamples=RESAMPLES, seed=i, crossed=True)
                cell = cells[(s, r)]
                cell["stage"].append(margin.classify(found, DELTA, restored_ok=True).stage)
                cell["covers_r"].append(found.d_restored.low <= r <= found.d_restored.high)
                cell["covers_s"].append(found.d_sft.low <= drop <= found.d_sft.high)
        pooled = classify_pooled([ReplicateOutcome(control[k], sft[k], restored[0.5 * DELTA][k], 1.0, 1.0)
                                  for k in range(max(SEEDS))])
        mcnemar.append(pooled.stage)
    return {"cells": cells, "mcnemar": mcnemar}


@pytest.fixture(scope="module", params=[False, True], ids=["below_ceiling", "ceiling"])
def sim(request):
    return request.param, simulate(request.param)


def share(values, label=None) -> float:
    values = list(values)
    return float(np.mean([v == label for v in values] if label is not None else values))


def test_inside_the_margin_is_never_actual(sim):
    """0 and 0.5 x delta: "actual" in at most 5% of draws at 3, 10 and 30 seeds (measured over 2000 draws: at most
    0.1%, one draw at 3 seeds below the ceiling)."""
    _, result = sim
    for s in SEEDS:
        for r in RESIDUALS[:2]:
            assert share(result["cells"][(s, r)]["stage"], ACTUAL_FORGETTING) <= 0.05, (s, r)


def test_beyond_the_margin_is_actual_at_30_seeds(sim):
    """2.5 x delta at 30 seeds: "actual" in >= 95% of draws at the ceiling (2000 draws: 97.1%). Below the ceiling it
    is not (2000 draws: 90.3%, the plain bootstrap 86.6%; here 91%), and seeds are not what is missing: at 30 seeds
    the residual's estimate varies by sd 0.010 from draw to draw (half a margin; 0.012 at 10 seeds), nearly all of it
    from the questions (which and how many of the 300 are fragile, and the borderline ones' churn), which more seeds
    do not average away. low(D_R) > delta needs the estimate above about delta + 2 sd = 0.04, one sd below the
    truth. The sd falls as 1 / sqrt(questions): the same model with 450 questions gives 98%, with 600 99.5% (400
    draws each). Asserted as measured so that a change to the rule or the model shows here."""
    ceiling, result = sim
    actual = share(result["cells"][(30, 2.5 * DELTA)]["stage"], ACTUAL_FORGETTING)
    if ceiling:
        assert actual >= 0.95
    else:
        assert 0.85 <= actual < 0.95


def test_inconclusive_falls_as_seeds_grow(sim):
    """From 3 to 10 to 30 seeds the share of "inconclusive" falls strictly until it is ~0 (at most 2%), then stays
    there (at the ceiling with no residual it is 6% at 3 seeds and 0.1% from 10 on)."""
    _, result = sim
    falling = 0
    for r in RESIDUALS:
        shares = [share(result["cells"][(s, r)]["stage"], margin.INCONCLUSIVE) for s in SEEDS]
        for fewer, more in zip(shares, shares[1:]):
            assert more < fewer if fewer > 0.02 else more <= 0.02, (r, shares)
        falling += shares[0] > 0.02
    assert falling >= 2  # not empty: the residuals of 0.5 and 2.5 x delta are inconclusive at 3 seeds in both bases


def test_mcnemar_calls_half_the_margin_actual_at_30_seeds(sim):
    """The old rule (exact McNemar on the pooled discordant pairs, against the control): a residual of half the
    margin is "actual" in most draws at 30 seeds (2000 draws: 87% below the ceiling, 100% at it), the margin rule in
    none (test above): significance is not size."""
    _, result = sim
    assert share(result["mcnemar"], ACTUAL_FORGETTING) > 0.5


def test_interval_coverage(sim):
    """The 95% intervals of D_R (residual > 0) and D_S cover the truth in 95% +- 3% of draws. Each cell's share
    over 200 draws has a Monte Carlo sd of 1.5%, so each cell is held to the band widened by about two of those,
    [0.90, 0.99] (the plain two-level bootstrap, 98.1-99.7% at 0.5 x delta over 2000 draws, fails it), and their
    mean over the cells, sd under 1%, to [0.93, 0.97]. Measured with 2000 draws (module docstring): every cell
    within [0.92, 0.98]; the ceiling's D_S at 3 seeds, 0.922, at the band's edge: at the ceiling the seed spread is
    a large part of D_S's variance (every seed loses the same fragile questions, 60% or 100% of each) and 3 seeds
    estimate it from 2 degrees of freedom; the normal quantile gave 0.913, Satterthwaite's t brings it into the band
    and no further."""
    _, result = sim
    covered = {}
    for s in SEEDS:
        for r in RESIDUALS[1:]:
            covered[("D_R", s, r)] = share(result["cells"][(s, r)]["covers_r"])
        covered[("D_S", s)] = share(result["cells"][(s, 0.0)]["covers_s"])
    outside = {cell: c for cell, c in covered.items() if not 0.90 <= c <= 0.99}
    assert not outside
    assert 0.93 <= float(np.mean(list(covered.values()))) <= 0.97, covered
