"""The margin rule's pure functions (forgetray.metrics.margin, docs/methods.md §4 and §10) against hand values and
quantities computed independently of its bootstrap: the exact bootstrap law of tiny arrays (enumerated from the
multinomial law, not from the module's draws), the normal approximation of a mean of n differences, the variance
of a mean of independent cells, and the ANOVA of an additive array. Its behaviour on simulated data with a known
truth is tests/test_margin_simulation.py."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from forgetray.metrics import margin
from forgetray.metrics.margin import Deltas, Interval
from forgetray.metrics.stage import (ACTUAL_FORGETTING, NO_FORGETTING, NOT_RESTORED, PSEUDO_FORGETTING, STAGES,
                                     transition_epoch)

Z975 = 1.959963984540054  # the standard normal's 97.5% quantile


# --- (a) the estimates --------------------------------------------------------------------------------------------


def test_estimates_of_one_trial_are_the_hand_values():
    base = [1, 1, 1, 0]       # acc 3/4
    sft = [0, 1, 0, 0]        # acc 1/4
    restored = [1, 1, 0, 0]   # acc 2/4
    control = [1, 1, 1, 1]    # acc 1
    found = margin.deltas(base, sft, restored, control)
    assert found.d_sft.estimate == pytest.approx(0.75 - 0.25)
    assert found.d_restored.estimate == pytest.approx(1.0 - 0.5)
    assert found.share.estimate == pytest.approx((0.5 - 0.25) / (1.0 - 0.25))
    assert (found.seeds, found.questions, found.level) == (1, 4, 0.95)


def test_estimates_of_replicates_are_the_means_over_every_seed_and_question():
    base = [[1, 1, 0], [1, 1, 0]]       # 4/6
    sft = [[1, 0, 0], [0, 0, 0]]        # 1/6
    restored = [[1, 1, 0], [0, 1, 0]]   # 3/6
    control = [[1, 1, 1], [1, 1, 0]]    # 5/6
    found = margin.deltas(np.array(base, dtype=bool), sft, restored, control, level=0.9)
    assert found.d_sft.estimate == pytest.approx(4 / 6 - 1 / 6)
    assert found.d_restored.estimate == pytest.approx(5 / 6 - 3 / 6)
    assert (found.seeds, found.questions, found.level) == (2, 3, 0.9)
    for interval in (found.d_sft, found.d_restored):
        assert interval.low <= interval.estimate <= interval.high


# --- (b) the bootstrap against independent quantities ---------------------------------------------------------------


def test_one_seed_interval_is_the_normal_interval_of_a_mean_of_n_differences():
    """One seed: the paired bootstrap of a mean of n = 400 differences (60 of +1, 20 of -1) has sd sqrt(var / n) with
    var the differences' population variance; its 95% interval is the normal one to within the lattice 1/n."""
    n = 400
    control = np.ones(n, dtype=bool)
    restored = np.ones(n, dtype=bool)
    restored[:60] = False                                  # +1 differences
    control[60:80] = False                                 # -1 differences
    x = control.astype(int) - restored
    sd = math.sqrt(x.var() / n)                            # 0.19 / 400
    found = margin.deltas(control, control, restored, control, n_resamples=20000, seed=3)
    assert found.d_restored.estimate == pytest.approx(0.1)
    assert found.d_restored.low == pytest.approx(0.1 - Z975 * sd, abs=0.003)
    assert found.d_restored.high == pytest.approx(0.1 + Z975 * sd, abs=0.003)


def test_two_questions_bootstrap_law_is_the_enumerated_one():
    """One seed, two questions with differences 0 and 1: a resample's mean is 0, 1/2 or 1 with probabilities
    1/4, 1/2, 1/4 (counts (2, 0), (1, 1), (0, 2) of the multinomial)."""
    draws = margin.resample_means({"x": np.array([[0, 1]])}, 40000, np.random.default_rng(0))["x"]
    freq = Counter(draws.tolist())
    assert set(freq) == {0.0, 0.5, 1.0}
    for value, p in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
        assert freq[value] / len(draws) == pytest.approx(p, abs=0.01)


def test_two_seeds_two_questions_bootstrap_law_is_the_enumerated_one():
    """Seeds and questions resampled independently, one draw shared by both matrices: the joint law of the two means
    enumerated over the 3 x 3 count pairs, each count vector (2, 0), (1, 1), (0, 2) with 1/4, 1/2, 1/4."""
    x = np.array([[0, 1], [1, 1]])
    y = np.array([[1, 0], [0, 0]])
    law = Counter()
    for c, pc in (((2, 0), 0.25), ((1, 1), 0.5), ((0, 2), 0.25)):
        for k, pk in (((2, 0), 0.25), ((1, 1), 0.5), ((0, 2), 0.25)):
            mean = lambda m: float(np.array(c) @ m @ np.array(k)) / 4  # noqa: E731
            law[(mean(x), mean(y))] += pc * pk
    draws = margin.resample_means({"x": x, "y": y}, 40000, np.random.default_rng(1))
    freq = Counter(zip(draws["x"].tolist(), draws["y"].tolist()))
    assert set(freq) == set(law)
    for pair, p in law.items():
        assert freq[pair] / 40000 == pytest.approx(p, abs=0.01)


@pytest.mark.parametrize("level, low, high", [(0.4, 0.5, 0.5), (0.6, 0.0, 1.0)])
def test_percentile_interval_of_two_questions(level, low, high):
    """Differences 0 and 1 (law above): the 30% and 70% quantiles are 1/2 (a quarter of the mass lies below it), the
    20% and 80% ones are 0 and 1."""
    found = margin.deltas([1, 1], [1, 1], [1, 0], [1, 1], level=level, n_resamples=20000)
    assert (found.d_restored.low, found.d_restored.high) == (low, high)


def test_replicate_interval_of_independent_cells_has_their_variance():
    """Every (seed, question) cell independent: the mean of S Q cells has variance p (1 - p) / (S Q). The crossed
    interval gets it (up to the truncated variance components' small upward bias); the plain two-level bootstrap
    (the default) is sqrt((S-1)/S + (Q-1)/Q + (S-1)(Q-1)/(S Q)) = 1.72 times as wide, counting the per-cell noise
    at the seed, question and cell levels (Owen 2007)."""
    rng = np.random.default_rng(5)
    s, q = 50, 400
    restored = rng.random((s, q)) < 0.9
    control = np.ones((s, q), dtype=bool)
    p = 1 - restored.mean()
    normal = Z975 * math.sqrt(p * (1 - p) / (s * q))
    crossed = margin.deltas(control, control, restored, control, n_resamples=4000, seed=1, crossed=True)
    assert (crossed.d_restored.high - crossed.d_restored.low) / 2 / normal == pytest.approx(1.05, abs=0.07)
    plain = margin.deltas(control, control, restored, control, n_resamples=4000, seed=1, crossed=False)
    owen = math.sqrt((s - 1) / s + (q - 1) / q + (s - 1) * (q - 1) / (s * q))  # E of the pigeonhole variance / iid
    assert (plain.d_restored.high - plain.d_restored.low) / 2 / normal == pytest.approx(owen, rel=0.05)


def additive(seed_effect, question_effect) -> tuple[np.ndarray, np.ndarray]:
    """control, restored with control - restored = a_s + b_q exactly (a in {0, 1}, b in {-1, 0}): no interaction."""
    a = np.asarray(seed_effect)[:, None]
    b = np.asarray(question_effect)[None, :]
    control = ~((a == 0) & (b == -1))
    restored = ~((a == 1) & (b == 0))
    assert ((control.astype(int) - restored) == a + b).all()
    return control, restored


def test_mean_variances_of_an_additive_array():
    """x = a_s + b_q: the ANOVA's interaction is 0, so the crossed variance of the mean is var(a)/S + var(b)/Q
    (sample variances) with Satterthwaite's df for MS_A + MS_B, and the two-level bootstrap's is the same with
    population variances (ddof 0); the latter against the variance of many bootstrap draws."""
    rng = np.random.default_rng(2)
    a = (rng.random(8) < 0.5).astype(int)
    b = -(rng.random(60) < 0.3).astype(int)
    control, restored = additive(a, b)
    x = control.astype(int) - restored
    target, bootstrap, df = margin.mean_variances(x)
    assert target == pytest.approx(a.var(ddof=1) / 8 + b.var(ddof=1) / 60)
    ms_a, ms_b = 60 * a.var(ddof=1), 8 * b.var(ddof=1)
    assert df == pytest.approx((ms_a + ms_b) ** 2 / (ms_a ** 2 / 7 + ms_b ** 2 / 59))
    assert bootstrap == pytest.approx(a.var() / 8 + b.var() / 60)
    draws = margin.resample_means({"x": x}, 100000, np.random.default_rng(0))["x"]
    assert draws.var() == pytest.approx(bootstrap, rel=0.02)


def test_replicate_interval_of_an_additive_array_is_its_t_interval():
    """An additive array's interval: the estimate +- t(df) sd, with the variance and Satterthwaite's df written out
    as in the test above (to 10%: the bootstrap draws keep their own shape)."""
    rng = np.random.default_rng(4)
    a = (rng.random(30) < 0.5).astype(int)
    b = -(rng.random(300) < 0.3).astype(int)
    control, restored = additive(a, b)
    found = margin.deltas(control, control, restored, control, n_resamples=8000, seed=2, crossed=True)
    ms_a, ms_b = 300 * a.var(ddof=1), 30 * b.var(ddof=1)
    df = (ms_a + ms_b) ** 2 / (ms_a ** 2 / 29 + ms_b ** 2 / 299)
    half = margin.t_quantile(0.975, df) * math.sqrt(a.var(ddof=1) / 30 + b.var(ddof=1) / 300)
    assert found.d_restored.estimate == pytest.approx(a.mean() + b.mean())
    assert found.d_restored.low == pytest.approx(found.d_restored.estimate - half, rel=0.1)
    assert found.d_restored.high == pytest.approx(found.d_restored.estimate + half, rel=0.1)


@pytest.mark.parametrize("seeds, questions, by_seed, df", [(4, 50, True, 3), (6, 40, False, 39)])
def test_mean_variances_of_one_effect(seeds, questions, by_seed, df):
    """Only seeds (or only questions) differ: the variance of the mean is that effect's sample variance over its
    count, with that count - 1 degrees of freedom (the other components truncate to 0)."""
    rng = np.random.default_rng(3)
    effect = (rng.random(seeds if by_seed else questions) < 0.5).astype(int)
    effect[:2] = (0, 1)
    x = np.broadcast_to(effect[:, None] if by_seed else effect[None, :], (seeds, questions))
    target, _, found_df = margin.mean_variances(x)
    assert target == pytest.approx(effect.var(ddof=1) / len(effect))
    assert found_df == pytest.approx(df)


def test_t_quantile_against_the_table():
    """Published two-sided 95% and 99% points (Student's t table: 12.706, 4.303, 2.228, 2.042; 4.032), the normal
    limit, and scipy where it is installed."""
    for df, p, t in ((1, 0.975, 12.706), (2, 0.975, 4.303), (10, 0.975, 2.228), (30, 0.975, 2.042),
                     (5, 0.995, 4.032), (math.inf, 0.975, Z975)):
        assert margin.t_quantile(p, df) == pytest.approx(t, abs=5e-4)
    assert margin.t_quantile(0.5, 3.0) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        margin.t_quantile(0.4, 3.0)
    stats = pytest.importorskip("scipy.stats")
    for df in (0.7, 1.0, 2.0, 2.5, 7.3, 40.0, 999.0, 1001.0, 1e5, 1e9):
        for p in (0.6, 0.9, 0.975, 0.99875, 0.99999):
            assert margin.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-6)


def test_crossed_bounds_stay_within_a_difference_of_accuracies():
    """3 seeds, one of them alone losing 10 of 20 questions (rows 0, 0, 1/2): the seed spread is nearly all the
    variance and it has 2 degrees of freedom, so t reaches past 1; D_R is clipped to [-1, 1]. The plain bootstrap's
    bounds are resample means of 0/1 differences, inside [0, 1] here, and never below 0 with no negative cell."""
    control = np.ones((3, 20), dtype=bool)
    restored = control.copy()
    restored[2, :10] = False
    level = margin.epoch_level(0.05, 3)
    crossed = margin.deltas(control, control, restored, control, level=level, crossed=True).d_restored
    plain = margin.deltas(control, control, restored, control, level=level, crossed=False).d_restored
    assert crossed.estimate == plain.estimate == pytest.approx(1 / 6)
    assert crossed.high == 1.0 and -1.0 < crossed.low < -0.3
    assert plain.low == 0.0 and plain.high < 1.0


def test_mean_variances_of_pure_interaction_truncates_at_zero():
    """[[1, 0], [0, 1]]: row and column means all 1/2, so MS_A = MS_B = 0 < MS_E = 1. Seed and question components
    truncate to 0 (untruncated, (MS_A + MS_B - MS_E) / 4 would be -1/4): the variance is MS_E / (S Q) = 1/4 with
    (S-1)(Q-1) = 1 degree of freedom. The bootstrap's, enumerated: count vectors (2, 0), (1, 1), (0, 2) with
    1/4, 1/2, 1/4 for seeds and for questions give the means 1 and 0 with 1/8 each and 1/2 with 3/4: variance 1/16."""
    assert margin.mean_variances(np.array([[1, 0], [0, 1]])) == pytest.approx((0.25, 1 / 16, 1.0))


def test_one_seed_is_the_paired_bootstrap_either_way():
    rng = np.random.default_rng(8)
    states = [rng.random(150) < p for p in (0.8, 0.6, 0.7, 0.8)]
    assert margin.deltas(*states, seed=4, crossed=True) == margin.deltas(*states, seed=4)


def test_mean_variances_needs_two_seeds_and_two_questions():
    with pytest.raises(ValueError, match="at least 2 seeds and 2 questions"):
        margin.mean_variances(np.ones((1, 5)))


# --- (c) classify at every boundary -------------------------------------------------------------------------------


def found(ds: tuple[float, float], dr: tuple[float, float]) -> Deltas:
    """Deltas with the given D_S and D_R intervals (estimates at their middles; share not used by the rule)."""
    nan = Interval(math.nan, math.nan, math.nan)
    return Deltas(d_sft=Interval(sum(ds) / 2, *ds), d_restored=Interval(sum(dr) / 2, *dr), share=nan, level=0.95,
                  seeds=1, questions=100)


M = 0.02
ABOVE = math.nextafter(M, 1.0)
BELOW = math.nextafter(M, 0.0)


@pytest.mark.parametrize("ds, dr, stage", [
    ((0.05, 0.09), (ABOVE, 0.05), ACTUAL_FORGETTING),        # low(D_R) just above delta
    ((-0.01, 0.01), (0.03, 0.04), ACTUAL_FORGETTING),        # actual wins over "no forgetting"
    ((-0.01, BELOW), (-0.01, 0.01), NO_FORGETTING),          # high(D_S) just below delta
    ((-0.01, BELOW), (-0.01, 0.05), NO_FORGETTING),          # ... whatever D_R straddles
    ((ABOVE, 0.09), (-0.01, BELOW), PSEUDO_FORGETTING),      # low(D_S) above, high(D_R) below
])
def test_decisive_verdicts(ds, dr, stage):
    verdict = margin.classify(found(ds, dr), M, restored_ok=True)
    assert (verdict.stage, verdict.why, verdict.margin) == (stage, "", M)


@pytest.mark.parametrize("ds, dr, names", [
    ((0.05, 0.09), (M, 0.05), ["D_R"]),       # low(D_R) == delta: not actual (strictly above is)
    ((-0.01, M), (-0.01, 0.01), ["D_S"]),     # high(D_S) == delta: not "no forgetting" (strictly below is)
    ((M, 0.09), (-0.01, 0.01), ["D_S"]),      # low(D_S) == delta: not pseudo
    ((0.05, 0.09), (-0.01, M), ["D_R"]),      # high(D_R) == delta: not pseudo
    ((0.01, 0.05), (0.0, 0.03), ["D_S", "D_R"]),
])
def test_touching_the_margin_is_inconclusive_and_why_names_the_interval(ds, dr, names):
    """An interval that touches delta straddles it (low <= delta <= high): every boundary is inconclusive, and `why`
    names the interval(s) that straddle, their bounds and the margin."""
    verdict = margin.classify(found(ds, dr), M, restored_ok=True)
    assert verdict.stage == margin.INCONCLUSIVE
    intervals = {"D_S": ds, "D_R": dr}
    for name in ("D_S", "D_R"):
        text = f"{name} [{intervals[name][0]:+.3f}, {intervals[name][1]:+.3f}]"
        assert (text in verdict.why) == (name in names)
    verb = "straddles" if len(names) == 1 else "straddle"
    assert verdict.why.endswith(f"{verb} 0.02: more questions or seeds settle it")
    if len(names) == 2:
        assert verdict.why.startswith("D_S [+0.010, +0.050] and D_R [+0.000, +0.030]")


def test_not_restored_comes_first():
    verdict = margin.classify(found((0.05, 0.09), (0.03, 0.05)), M, restored_ok=False)
    assert verdict.stage == NOT_RESTORED
    assert "PPL(R_e)" in verdict.why and "PPL(R_0)" in verdict.why


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.02, 1.5])
def test_margin_out_of_range(bad):
    with pytest.raises(ValueError, match="stage_margin must be in"):
        margin.classify(found((0.05, 0.09), (0.0, 0.01)), bad, restored_ok=True)


def test_every_label_is_a_margin_stage():
    labels = {margin.classify(found(ds, dr), M, ok).stage for ds, dr, ok in [
        ((0.05, 0.09), (0.03, 0.05), True), ((-0.01, 0.01), (0.0, 0.0), True), ((0.05, 0.09), (0.0, 0.01), True),
        ((0.0, 0.05), (0.0, 0.01), True), ((0.05, 0.09), (0.03, 0.05), False)]}
    assert labels == set(STAGES)


# --- (d) the PPL precondition --------------------------------------------------------------------------------------


@pytest.mark.parametrize("control, restored, tolerance, ok", [
    (10.0, 10.4, 0.05, True),
    (10.0, 9.6, 0.05, True),        # below R_0 within the tolerance
    (10.0, 10.6, 0.05, False),
    (10.0, 9.4, 0.05, False),       # below R_0 beyond it: two-sided (an overshoot is not a restoration)
    (8.0, 8.5, 0.0625, True),       # exactly at the tolerance (representable), either side
    (8.0, 7.5, 0.0625, True),
    (8.0, 8.0, 0.0, True),
    (8.0, 8.01, 0.0, False),
    (math.nan, 8.0, 0.05, False),
    (8.0, math.nan, 0.05, False),
    (0.0, 0.0, 0.05, False),        # a control PPL of 0 is no reference
    (8.0, 0.0, 0.05, False),
])
def test_within_control(control, restored, tolerance, ok):
    assert margin.within_control(control, restored, tolerance) is ok


def test_within_control_negative_tolerance():
    with pytest.raises(ValueError, match="non-negative"):
        margin.within_control(8.0, 8.0, -0.01)


# --- (e) validation -----------------------------------------------------------------------------------------------

GOOD = [1, 0, 1]


@pytest.mark.parametrize("kwargs, message", [
    ({"level": 0.0}, "level must be in"),
    ({"level": 1.0}, "level must be in"),
    ({"n_resamples": 99}, "n_resamples must be >= 100"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        margin.deltas(GOOD, GOOD, GOOD, GOOD, **kwargs)


@pytest.mark.parametrize("bad, message", [
    (np.ones((2, 2, 3)), r"restored must be \[questions\] or \[seeds, questions\]"),
    ([], r"restored must be \[questions\]"),
    (np.ones((2, 0)), r"restored must be \[questions\]"),
    ([1, 2, 0], "restored must be boolean or 0/1"),
    ([1, 0.5, 0], "restored must be boolean or 0/1"),
    ([1, 0], "same seeds x questions"),                       # 2 questions against 3
    ([[1, 0, 1], [1, 0, 1]], "same seeds x questions"),       # 2 seeds against 1
])
def test_bad_outcomes(bad, message):
    with pytest.raises(ValueError, match=message):
        margin.deltas(GOOD, GOOD, bad, GOOD)


def test_one_base_is_not_broadcast_over_the_seeds():
    """A [questions] base against [2, questions] replicates is an error, not a base silently shared by both seeds
    (every replicate has its own base: tile it explicitly if it is the same)."""
    two = [[1, 0, 1], [1, 1, 1]]
    with pytest.raises(ValueError, match="same seeds x questions"):
        margin.deltas(GOOD, two, two, two)
    assert margin.deltas(np.tile(GOOD, (2, 1)), two, two, two).seeds == 2


# --- (f) determinism ----------------------------------------------------------------------------------------------


def random_states(seed=0, s=3, q=200):
    rng = np.random.default_rng(seed)
    return [rng.random((s, q)) < p for p in (0.8, 0.6, 0.7, 0.8)]


def test_same_seed_same_intervals_other_seed_other_intervals():
    states = random_states()
    first, again = margin.deltas(*states, seed=7), margin.deltas(*states, seed=7)
    other = margin.deltas(*states, seed=8)
    assert first == again
    assert margin.deltas(*states, seed=7, crossed=True) == margin.deltas(*states, seed=7, crossed=True)
    assert (other.d_sft.low, other.d_sft.high) != (first.d_sft.low, first.d_sft.high)
    assert other.d_sft.estimate == first.d_sft.estimate


def test_epoch_seed_is_deterministic_and_differs_by_epoch():
    seeds = [margin.epoch_seed(3, epoch) for epoch in range(1, 11)]
    assert seeds == [margin.epoch_seed(3, epoch) for epoch in range(1, 11)]
    assert len(set(seeds)) == 10
    assert margin.epoch_seed(0, 1) != margin.epoch_seed(1, 0)
    states = random_states(1)
    one, two = (margin.deltas(*states, seed=margin.epoch_seed(3, e)) for e in (1, 2))
    assert (one.d_restored.low, one.d_restored.high) != (two.d_restored.low, two.d_restored.high)


# --- (g) the recoverable share ------------------------------------------------------------------------------------


def test_share_is_nan_when_nothing_is_clearly_lost_against_the_control():
    same = np.array([1, 0, 1, 1, 0, 1] * 20, dtype=bool)
    nothing_lost = margin.deltas(same, same, same, same)
    better = margin.deltas(same, np.ones_like(same), same, same)         # SFT_e above R_0
    for d in (nothing_lost, better):
        assert all(math.isnan(v) for v in (d.share.estimate, d.share.low, d.share.high))


def test_share_is_the_hand_value_when_the_loss_is_clear():
    """R_0 knows all 200, SFT_e loses 100 of them, R_e recovers 60: (0.8 - 0.5) / (1 - 0.5) = 0.6."""
    control = np.ones(200, dtype=bool)
    sft = control.copy()
    sft[:100] = False
    restored = sft.copy()
    restored[:60] = True
    d = margin.deltas(control, sft, restored, control)
    assert d.share.estimate == pytest.approx(0.6)
    assert d.share.low < 0.6 < d.share.high
    assert 0.4 < d.share.low and d.share.high < 0.8


def test_share_of_a_full_recovery_is_one_in_every_draw():
    """R_e == R_0: gain and gap are the same numbers in every resample because every difference shares the draw,
    so the share is 1 with the interval [1, 1] (separate draws would spread their ratio)."""
    rng = np.random.default_rng(6)
    control = rng.random((3, 200)) < 0.9
    sft = control & (rng.random((3, 200)) < 0.7)
    for crossed in (False, True):
        d = margin.deltas(control, sft, control, control, crossed=crossed)
        assert (d.share.estimate, d.share.low, d.share.high) == pytest.approx((1.0, 1.0, 1.0))


# --- (h) transition, (i) epoch level ------------------------------------------------------------------------------


@pytest.mark.parametrize("stages, epoch", [
    ({1: PSEUDO_FORGETTING, 2: ACTUAL_FORGETTING, 3: ACTUAL_FORGETTING}, 2),
    ({3: ACTUAL_FORGETTING, 2: ACTUAL_FORGETTING, 1: NO_FORGETTING}, 2),     # the first epoch, not the first key
    ({1: margin.INCONCLUSIVE, 2: NOT_RESTORED, 3: PSEUDO_FORGETTING}, None),
    ({}, None),
])
def test_transition(stages, epoch):
    assert transition_epoch(stages) == epoch  # the margin rule's stages, inconclusive among them


def test_transition_rejects_unknown_stages():
    with pytest.raises(ValueError, match="unknown stages"):
        transition_epoch({1: "forgotten"})


@pytest.mark.parametrize("alpha, epochs, level", [(0.05, 1, 0.95), (0.05, 4, 0.9875), (0.1, 5, 0.98)])
def test_epoch_level_is_bonferroni(alpha, epochs, level):
    assert margin.epoch_level(alpha, epochs) == pytest.approx(level)


@pytest.mark.parametrize("alpha, epochs, message", [(0.0, 3, "alpha"), (1.0, 3, "alpha"), (0.05, 0, "epochs")])
def test_epoch_level_rejects(alpha, epochs, message):
    with pytest.raises(ValueError, match=message):
        margin.epoch_level(alpha, epochs)


# --- the rule's table row and verdicts, and the crossed scaling at the smallest designs ---------------------------


def test_interval_columns_and_verdicts_by_hand():
    ds, dr = Interval(0.06, 0.04, 0.08), Interval(0.015, 0.005, 0.025)
    share = Interval(0.75, 0.5, 0.9)
    row = Deltas(d_sft=ds, d_restored=dr, share=share, level=0.98, seeds=3, questions=50)
    assert margin.interval_columns(row) == {
        "drop": 0.06, "drop_low": 0.04, "drop_high": 0.08, "residual": 0.015, "residual_low": 0.005,
        "residual_high": 0.025, "share": 0.75, "share_low": 0.5, "share_high": 0.9, "level": 0.98}
    # D_S [0.04, 0.08], D_R [0.005, 0.025]: at 0.03 pseudo (D_S above, D_R below); at 0.01 D_R straddles; at 0.02
    # D_R straddles; at 0.05 D_S straddles, D_R below
    assert margin.verdicts(row, 0.03, True) == {
        "stage": PSEUDO_FORGETTING, "why": "", "stage_at_0.01": margin.INCONCLUSIVE,
        "stage_at_0.02": margin.INCONCLUSIVE, "stage_at_0.05": margin.INCONCLUSIVE}
    inconclusive = margin.verdicts(row, 0.02, True)
    assert inconclusive["stage"] == margin.INCONCLUSIVE
    assert inconclusive["why"] == "D_R [+0.005, +0.025] straddles 0.02: more questions or seeds settle it"
    assert margin.verdicts(row, 0.003, True)["stage"] == ACTUAL_FORGETTING  # D_R's low 0.005 above 0.003
    assert margin.verdicts(row, 0.03, False) == {
        "stage": NOT_RESTORED, "why": "PPL(R_e) not within the tolerance of PPL(R_0)", "stage_at_0.01": NOT_RESTORED,
        "stage_at_0.02": NOT_RESTORED, "stage_at_0.05": NOT_RESTORED}


def test_every_verdict_carries_its_margin():
    assert margin.classify(found((0.05, 0.09), (0.03, 0.05)), 0.04, restored_ok=False).margin == 0.04
    assert margin.classify(found((0.01, 0.05), (0.0, 0.03)), 0.02, restored_ok=True).margin == 0.02


def test_within_control_default_tolerance_is_five_percent():
    assert margin.within_control(10.0, 10.4) and margin.within_control(10.0, 9.6)
    assert not margin.within_control(10.0, 10.6) and not margin.within_control(10.0, 9.4)


def _width_reference(x: np.ndarray, level: float) -> float:
    """sqrt(target / bootstrap variance) * t / z at the target's degrees of freedom (scipy's quantiles)."""
    stats = pytest.importorskip("scipy.stats")
    target, bootstrap, df = margin.mean_variances(x)
    p = 1 - (1 - level) / 2
    return math.sqrt(target / bootstrap) * stats.t.ppf(p, df) / stats.norm.ppf(p)


@pytest.mark.parametrize("shape", [(2, 30), (4, 2), (3, 7)])
def test_crossed_spread_is_scaled_by_the_variance_ratio_and_t_over_z(shape):
    """Two seeds and two questions are the smallest designs the crossed scaling applies to: each crossed draw is
    estimate + (plain draw - estimate) * factor, so the crossed bounds are the plain ones scaled about the estimate
    by the factor written out here with scipy."""
    rng = np.random.default_rng(sum(shape))
    control = np.ones(shape, dtype=bool)
    restored = rng.random(shape) < 0.6
    restored[0, 0], restored[1, 1] = False, True  # some spread in both seeds and questions
    level = 0.9
    plain = margin.deltas(control, control, restored, control, level=level, crossed=False).d_restored
    crossed = margin.deltas(control, control, restored, control, level=level, crossed=True).d_restored
    factor = _width_reference(control.astype(int) - restored, level)
    assert factor != pytest.approx(1.0, abs=1e-3)
    expected_low = max(plain.estimate + (plain.low - plain.estimate) * factor, -1.0)
    expected_high = min(plain.estimate + (plain.high - plain.estimate) * factor, 1.0)
    assert crossed.estimate == plain.estimate
    assert crossed.low == pytest.approx(expected_low, abs=1e-9)
    assert crossed.high == pytest.approx(expected_high, abs=1e-9)


def test_one_question_with_seeds_is_not_scaled():
    """3 seeds x 1 question: no question spread to estimate a crossed variance from, the plain two-level bootstrap
    stands (factor 1)."""
    control = np.ones((3, 1), dtype=bool)
    restored = np.array([[True], [False], [True]])
    crossed = margin.deltas(control, control, restored, control, crossed=True)
    assert crossed == margin.deltas(control, control, restored, control, crossed=False)


def test_t_quantile_beyond_1000_degrees_of_freedom_to_1e8():
    """The Cornish-Fisher branch (df > 1000) against scipy at 1e-8: its second term is ~3e-6 at df = 1001, so each of
    its coefficients shows; the truncation error (the third term) is 2.6e-9 there."""
    stats = pytest.importorskip("scipy.stats")
    for df in (1001.0, 1500.0):
        for p in (0.9, 0.975):
            assert margin.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), abs=1e-8, rel=0)


@pytest.mark.parametrize("p, df", [(1.0, 3.0), (0.4, 3.0), (0.9, 0.0), (0.9, -1.0)])
def test_t_quantile_domain(p, df):
    with pytest.raises(ValueError, match=rf"^needs 1/2 <= p < 1 and df > 0, got p={p}, df={df}$"):
        margin.t_quantile(p, df)


def _anova_reference(x: list[list[float]]) -> tuple[float, float]:
    """The truncated crossed-design variance of the mean and its Satterthwaite df, from two-way ANOVA mean squares
    computed with loops: s_a = max(0, (MS_A - MS_E) / Q), s_b = max(0, (MS_B - MS_E) / S), s_e = MS_E."""
    s, q = len(x), len(x[0])
    g = sum(sum(row) for row in x) / (s * q)
    r = [sum(x[i]) / q - g for i in range(s)]
    c = [sum(x[i][j] for i in range(s)) / s - g for j in range(q)]
    ms_a = q * sum(v * v for v in r) / (s - 1)
    ms_b = s * sum(v * v for v in c) / (q - 1)
    ms_e = sum((x[i][j] - g - r[i] - c[j]) ** 2 for i in range(s) for j in range(q)) / ((s - 1) * (q - 1))
    target = max(0.0, (ms_a - ms_e) / q) / s + max(0.0, (ms_b - ms_e) / s) / q + ms_e / (s * q)
    # S Q target as a linear combination of mean squares: MS_A and MS_B where kept, MS_E with 1 - (number kept)
    terms = [(ms_a, s - 1)] * (ms_a > ms_e) + [(ms_b, q - 1)] * (ms_b > ms_e)
    terms.append((ms_e * (1 - len(terms)), (s - 1) * (q - 1)))
    return target, (target * s * q) ** 2 / sum(m * m / d for m, d in terms)


@pytest.mark.parametrize("seed_spread, question_spread", [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_mean_variances_of_a_noisy_array_against_the_anova_by_hand(seed_spread, question_spread):
    """Seed and question effects on top of cell noise, each present or not: every truncation pattern."""
    rng = np.random.default_rng(int(seed_spread * 2 + question_spread))
    x = (seed_spread * 3 * rng.normal(size=(4, 1)) + question_spread * 3 * rng.normal(size=(1, 6))
         + rng.normal(size=(4, 6)))
    target, _, df = margin.mean_variances(x)
    want_target, want_df = _anova_reference(x.tolist())
    assert target == pytest.approx(want_target, rel=1e-12)
    assert df == pytest.approx(want_df, rel=1e-12)


def test_outcomes_are_boolean_and_every_input_is_named():
    assert margin.outcomes([1, 0, 1], "x").dtype == bool and margin.outcomes([1, 0, 1], "x").shape == (1, 3)
    with pytest.raises(ValueError, match=r"^x must be \[questions\] or \[seeds, questions\] with at least one of "
                                         r"each, got shape \(0, 5\)$"):
        margin.outcomes(np.ones((0, 5)), "x")  # no seeds
    for position, name in enumerate(("base", "sft", "restored", "control")):
        states = [GOOD] * 4
        states[position] = [1, 2, 0]
        with pytest.raises(ValueError, match=f"^{name} must be boolean or 0/1$"):
            margin.deltas(*states)


def test_deltas_defaults_and_the_smallest_resample_count():
    rng = np.random.default_rng(11)
    states = [rng.random((3, 40)) < p for p in (0.8, 0.6, 0.7, 0.8)]
    default = margin.deltas(*states)
    assert default == margin.deltas(*states, seed=0, crossed=True, n_resamples=margin.N_RESAMPLES, level=0.95)
    assert default != margin.deltas(*states, seed=1)
    assert default != margin.deltas(*states, crossed=False)
    assert margin.deltas(*states, n_resamples=100).level == 0.95  # 100 resamples are allowed
    with pytest.raises(ValueError, match="^n_resamples must be >= 100, got 99$"):
        margin.deltas(*states, n_resamples=99)


def test_crossed_bounds_are_clipped_below_at_minus_one_too():
    """The mirror of the clipping test: one of 3 seeds alone *gains* 10 of 20 questions over the control, so the
    crossed interval of D_R reaches below -1 before it is clipped to it."""
    restored = np.ones((3, 20), dtype=bool)
    control = restored.copy()
    control[2, :10] = False
    level = margin.epoch_level(0.05, 3)
    crossed = margin.deltas(control, control, restored, control, level=level, crossed=True).d_restored
    assert crossed.estimate == pytest.approx(-1 / 6) and crossed.low == -1.0 and 0.3 < crossed.high < 1.0


def test_resample_means_refuses_states_of_different_shapes():
    with pytest.raises(ValueError, match=r"^every state must answer the same seeds x questions, got shapes "
                                         r"\[\(2, 3\), \(2, 4\)\]$"):
        margin.resample_means({"a": np.ones((2, 3)), "b": np.ones((2, 4))}, 100, np.random.default_rng(0))
