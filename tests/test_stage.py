"""Paired significance tests and the stage rule (docs/methods.md §4) against hand-worked values and written-out references."""

import math
import re
from pathlib import Path

import numpy as np
import pytest

from forgetray import metrics


def outcomes(n: int, wrong: int, start: int = 0) -> np.ndarray:
    """n questions, all right except `wrong` consecutive ones from index `start`."""
    correct = np.ones(n, dtype=bool)
    correct[start : start + wrong] = False
    return correct


def exact_mcnemar_p(b01: int, b10: int) -> float:
    """Reference: two-sided exact McNemar p from the binomial formula written out."""
    n = b01 + b10
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b01, b10) + 1)) / 2**n
    return min(1.0, 2 * tail)


# --- McNemar -------------------------------------------------------------------------------------------------------


def test_mcnemar_counts_discordant_pairs_and_matches_the_binomial_formula():
    # 10 questions: 1 gained (a wrong, b right), 9 lost (a right, b wrong): p = 2 * (C(10,0) + C(10,1)) / 2^10.
    a = np.array([0] + [1] * 9 + [1] * 5 + [0] * 3, dtype=bool)
    b = np.array([1] + [0] * 9 + [1] * 5 + [0] * 3, dtype=bool)
    result = metrics.mcnemar(a, b)
    assert (result.n, result.b01, result.b10) == (18, 1, 9)
    assert result.delta == pytest.approx((6 - 14) / 18)
    assert result.p_value == pytest.approx(2 * 11 / 1024, rel=1e-12)
    assert result.p_value == pytest.approx(exact_mcnemar_p(1, 9), rel=1e-12)


@pytest.mark.parametrize("b01,b10", [(0, 1), (3, 3), (4, 7), (12, 30), (0, 25), (40, 2)])
def test_mcnemar_p_value_equals_the_written_out_reference(b01, b10):
    a = np.array([False] * b01 + [True] * b10 + [True] * 7)
    b = np.array([True] * b01 + [False] * b10 + [True] * 7)
    result = metrics.mcnemar(a, b)
    assert result.p_value == pytest.approx(exact_mcnemar_p(b01, b10), rel=1e-10)
    # The test is symmetric; swapping the states negates the delta.
    swapped = metrics.mcnemar(b, a)
    assert swapped.p_value == pytest.approx(result.p_value, rel=1e-12)
    assert swapped.delta == pytest.approx(-result.delta)


@pytest.mark.parametrize("b01,b10", [(0, 1), (1, 0), (3, 3), (4, 7), (12, 30), (0, 25), (40, 2), (97, 203)])
def test_mcnemar_and_sign_test_p_equal_scipys_binomtest(b01, b10):
    """metrics.significance keeps its exact binomial by hand (scipy is not a runtime dependency; see there): the
    same two-sided p as scipy.stats.binomtest, for McNemar, the sign test and the pooled McNemar's counts."""
    from scipy.stats import binomtest

    from forgetray.metrics.significance import _half_binomial_cdf, sign_test

    expected = binomtest(b01, b01 + b10, 0.5).pvalue
    a = np.array([False] * b01 + [True] * b10 + [True] * 7)
    b = np.array([True] * b01 + [False] * b10 + [True] * 7)
    assert metrics.mcnemar(a, b).p_value == pytest.approx(expected, rel=1e-9)
    assert sign_test(a.astype(float), b.astype(float)).p_value == pytest.approx(expected, rel=1e-9)
    assert min(1.0, 2 * _half_binomial_cdf(min(b01, b10), b01 + b10)) == pytest.approx(expected, rel=1e-9)


def test_ranks_equal_scipys_rankdata():
    """spearman's ranks by hand (average ranks for ties), against scipy.stats.rankdata."""
    from scipy.stats import rankdata

    from forgetray.metrics.significance import _ranks

    rng = np.random.default_rng(3)
    for values in (np.array([0.3, 0.1, 0.3, 0.2, 0.3, 0.0]), rng.integers(0, 5, 40).astype(float), rng.random(25)):
        assert _ranks(values).tolist() == pytest.approx(rankdata(values).tolist())


def test_mcnemar_without_discordant_pairs_gives_p_one():
    a = np.array([True, False, True, True, False])
    result = metrics.mcnemar(a, a.copy())
    assert (result.b01, result.b10, result.delta, result.p_value) == (0, 0, 0.0, 1.0)
    assert not metrics.significant_drop(a, a)


def test_all_discordant_in_one_direction():
    # k losses and no gains: p = 2 / 2^k, significant at 0.05 from k = 6 on (k = 5 gives 0.0625).
    base = np.ones(50, dtype=bool)
    assert metrics.mcnemar(base, outcomes(50, 5)).p_value == pytest.approx(0.0625)
    assert metrics.mcnemar(base, outcomes(50, 6)).p_value == pytest.approx(0.03125)
    assert not metrics.significant_drop(base, outcomes(50, 5))
    assert metrics.significant_drop(base, outcomes(50, 6))
    # Six gains are just as significant, but not a drop.
    assert not metrics.significant_drop(outcomes(50, 6), base)


def test_paired_inputs_are_validated():
    with pytest.raises(ValueError, match="same questions"):
        metrics.mcnemar([True, False], [True])
    with pytest.raises(ValueError, match="at least one"):
        metrics.mcnemar([], [])
    with pytest.raises(ValueError, match="boolean or 0/1"):
        metrics.mcnemar([0, 2], [1, 1])
    with pytest.raises(ValueError, match="unknown test"):
        metrics.significant_drop([True], [False], test="t-test")
    # 0/1 integers are accepted as correctness.
    assert metrics.mcnemar([1, 0, 1], [1, 1, 0]).b01 == 1


# --- paired bootstrap ----------------------------------------------------------------------------------------------


def test_bootstrap_ci_contains_the_true_delta_and_is_deterministic():
    # 400 questions: b loses 70 of a's right answers and gains 14, so delta = -56/400 = -0.14 exactly.
    a = np.zeros(400, dtype=bool)
    a[:280] = True
    b = a.copy()
    b[:70] = False
    b[300:314] = True
    ci = metrics.paired_bootstrap(a, b, n_resamples=5000, seed=7)
    assert ci.delta == pytest.approx(-0.14)
    assert ci.low < -0.14 < ci.high
    # The normal approximation of the paired difference: se = sqrt((0.21 - 0.14^2) / 400), half-width 1.96 se.
    half_width = 1.96 * math.sqrt((0.21 - 0.14**2) / 400)
    assert ci.high - ci.low == pytest.approx(2 * half_width, abs=0.01)
    assert metrics.paired_bootstrap(a, b, n_resamples=5000, seed=7) == ci
    assert metrics.paired_bootstrap(a, b, n_resamples=5000, seed=8) != ci


def test_bootstrap_matches_naive_index_resampling():
    # The counts shortcut must give the CI that resampling the same indices for both states gives.
    rng = np.random.default_rng(5)
    a = rng.random(200) < 0.6
    b = rng.random(200) < 0.5
    idx = np.random.default_rng(99).integers(0, 200, size=(4000, 200))
    naive = b[idx].mean(axis=1) - a[idx].mean(axis=1)
    low, high = np.quantile(naive, [0.05, 0.95])
    ci = metrics.paired_bootstrap(a, b, n_resamples=4000, seed=0, confidence=0.90)
    assert ci.low == pytest.approx(low, abs=0.01)
    assert ci.high == pytest.approx(high, abs=0.01)


def test_bootstrap_without_discordant_pairs_is_a_point():
    a = np.array([True, False, True])
    assert metrics.paired_bootstrap(a, a) == metrics.BootstrapResult(0.0, 0.0, 0.0)


def test_bootstrap_drop_decision():
    base = np.ones(200, dtype=bool)
    assert metrics.significant_drop(base, outcomes(200, 40), test="bootstrap")
    assert not metrics.significant_drop(base, outcomes(200, 2), test="bootstrap")
    assert not metrics.significant_drop(outcomes(200, 40), base, test="bootstrap")


# --- stage rule ----------------------------------------------------------------------------------------------------

BASE = np.ones(200, dtype=bool)


@pytest.mark.parametrize("test", ["mcnemar", "bootstrap"])
def test_pseudo_forgetting_when_restoration_brings_the_answers_back(test):
    result = metrics.classify_checkpoint(BASE, outcomes(200, 40), outcomes(200, 2), 10.0, 10.2, test=test)
    assert result.stage == metrics.PSEUDO_FORGETTING
    assert result.d_sft == pytest.approx(-0.2)
    assert result.d_restored == pytest.approx(-0.01)
    assert result.restored_ok
    if test == "mcnemar":
        assert result.p_sft == pytest.approx(2 / 2**40)
        assert result.p_restored == pytest.approx(0.5)
    else:
        assert result.p_sft is None and result.p_restored is None


@pytest.mark.parametrize("test", ["mcnemar", "bootstrap"])
def test_actual_forgetting_when_restoration_does_not(test):
    result = metrics.classify_checkpoint(BASE, outcomes(200, 40), outcomes(200, 40, start=100), 10.0, 10.0, test=test)
    assert result.stage == metrics.ACTUAL_FORGETTING
    assert result.d_restored == pytest.approx(-0.2)


def test_actual_forgetting_takes_precedence_over_an_unchanged_sft_model():
    result = metrics.classify_checkpoint(BASE, BASE, outcomes(200, 40), 10.0, 10.0)
    assert result.stage == metrics.ACTUAL_FORGETTING


def test_no_forgetting_when_nothing_changes():
    result = metrics.classify_checkpoint(BASE, BASE, BASE, 10.0, 10.0)
    assert result.stage == metrics.NO_FORGETTING
    assert (result.d_sft, result.p_sft, result.p_restored) == (0.0, 1.0, 1.0)


def test_restoration_precondition():
    sft, restored = outcomes(200, 40), outcomes(200, 2)
    not_restored = metrics.classify_checkpoint(BASE, sft, restored, 10.0, 10.6)
    assert not_restored.stage == metrics.NOT_RESTORED and not not_restored.restored_ok
    assert not_restored.d_sft == pytest.approx(-0.2)  # deltas are still reported
    below_base = metrics.classify_checkpoint(BASE, sft, restored, 10.0, 8.0)
    assert below_base.restored_ok and below_base.stage == metrics.PSEUDO_FORGETTING
    assert metrics.is_restored(20.0, 21.0)  # exactly 5% above is within 5%
    assert not metrics.is_restored(10.0, 1.06 * 10.0)
    assert not metrics.is_restored(10.0, float("nan"))
    assert metrics.is_restored(10.0, 10.9, ppl_tolerance=0.1)


def test_fixed_threshold_variant():
    fixed = metrics.classify_fixed
    assert fixed(0.50, 0.45, 0.49, 10.0, 10.0).stage == metrics.PSEUDO_FORGETTING
    assert fixed(0.50, 0.45, 0.47, 10.0, 10.0).stage == metrics.ACTUAL_FORGETTING
    assert fixed(0.50, 0.49, 0.50, 10.0, 10.0).stage == metrics.NO_FORGETTING
    # A delta of exactly -tau (0.48 - 0.50 is -0.020000000000000018 in floats) is not a drop.
    assert fixed(0.50, 0.48, 0.48, 10.0, 10.0).stage == metrics.NO_FORGETTING
    assert fixed(0.50, 0.45, 0.49, 10.0, 10.0, tau=0.1).stage == metrics.NO_FORGETTING
    result = fixed(0.50, 0.45, 0.47, 10.0, 10.6)
    assert result.stage == metrics.NOT_RESTORED
    assert (result.p_sft, result.p_restored) == (None, None)
    assert result.d_sft == pytest.approx(-0.05) and result.d_restored == pytest.approx(-0.03)


def test_transition_epoch_is_the_first_actual_epoch():
    stages = {
        4: metrics.ACTUAL_FORGETTING,
        1: metrics.NO_FORGETTING,
        3: metrics.ACTUAL_FORGETTING,
        2: metrics.PSEUDO_FORGETTING,
    }
    assert metrics.transition_epoch(stages) == 3
    assert metrics.transition_epoch({1: metrics.NO_FORGETTING, 2: metrics.NOT_RESTORED}) is None
    assert metrics.transition_epoch({}) is None
    with pytest.raises(ValueError, match="unknown stages"):
        metrics.transition_epoch({1: "forgotten"})


# README's metric table, row `stage/code` (and `stage/fixed_code`): "-1 not restored, 0 no, 1 pseudo, 2 actual
# forgetting". Written out here by hand, with the stage names as strings, so renaming a stage or renumbering a code
# in the code is caught.
DOCUMENTED_STAGE_CODES = {"inconclusive": -2, "not_restored": -1, "no_forgetting": 0, "pseudo_forgetting": 1,
                          "actual_forgetting": 2}
README = Path(__file__).resolve().parent.parent / "README.md"


def test_stage_codes_are_the_documented_ones():
    assert metrics.STAGE_CODES == DOCUMENTED_STAGE_CODES
    assert set(metrics.STAGES) == set(DOCUMENTED_STAGE_CODES)
    # ...and README still says so: parse the "-1 not restored, 0 no, ..." of the `stage/code` row.
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `stage/code`"))
    words = {"inconclusive": "inconclusive", "not restored": "not_restored", "no": "no_forgetting",
             "pseudo": "pseudo_forgetting", "actual": "actual_forgetting"}
    in_readme = {words[w]: int(c) for c, w in
                 re.findall(r"(-?\d+) (inconclusive|not restored|no|pseudo|actual)\b", row)}
    assert in_readme == DOCUMENTED_STAGE_CODES, row


def test_stage_codes_logged_and_decoded_back():
    """What classify_trial logs to MLflow for each stage, and what the report reads back from those numbers."""
    import pandas as pd

    from forgetray import trial_stages
    from forgetray.report import TrialData

    names = list(DOCUMENTED_STAGE_CODES)
    epochs = list(range(1, len(names) + 1))
    table = pd.DataFrame({"epoch": epochs, "stage": names, "stage_fixed": names[::-1], "stage_test": names[1:] + names[:1],
                          **{f"stage_at_{m}": names for m in ("0.01", "0.02", "0.05")},
                          **{key: 0.25 for key in ("drop", "drop_low", "drop_high", "residual", "residual_low",
                                                   "residual_high", "share", "share_low", "share_high", "level")},
                          "d_sft": 0.0, "d_restored": 0.0, "p_sft": None, "p_restored": None})

    class Recorder:
        def __init__(self):
            self.metrics, self.tags = {}, {}

        def log_metrics(self, run_id, values, step):
            self.metrics[step] = dict(values)

        def set_tag(self, run_id, key, value):
            self.tags[key] = value

        def log_table(self, run_id, table, path):
            pass

    tracker = Recorder()
    trial_stages._log(tracker, "run", "bench", table, None)
    for epoch, name, fixed, tested in zip(epochs, names, names[::-1], names[1:] + names[:1]):
        assert tracker.metrics[epoch]["stage/code"] == DOCUMENTED_STAGE_CODES[name]
        assert tracker.metrics[epoch]["stage/code_at_0.05"] == DOCUMENTED_STAGE_CODES[name]
        assert tracker.metrics[epoch]["stage/fixed_code"] == DOCUMENTED_STAGE_CODES[fixed]
        assert tracker.metrics[epoch]["stage/test_code"] == DOCUMENTED_STAGE_CODES[tested]
        assert tracker.metrics[epoch]["stage/residual_high"] == 0.25
    assert tracker.tags["forgetray.transition_epoch"] == 5  # the first epoch classified actual forgetting

    # The report reads the numbers back (as floats, as MLflow returns them) from the metrics alone, no stage tags.
    history: dict[str, dict[int, float]] = {}
    for epoch, values in tracker.metrics.items():
        for metric, value in values.items():
            history.setdefault(metric, {})[epoch] = float(value)
    trial = TrialData(name="t", run_id="run", status="FINISHED", settings={}, benchmarks=[], scores={},
                      history=history, tags={})
    for epoch, name, fixed in zip(epochs, names, names[::-1]):
        assert trial.stage(epoch) == name
        assert trial.stage(epoch, fixed=True) == fixed


def test_sign_test_against_the_binomial_by_hand_and_scipy():
    from scipy.stats import binomtest

    from forgetray.metrics.significance import sign_test

    a = [0.5, 0.6, 0.7, 0.8, 0.9, 0.4, 0.3, 0.2]
    b = [0.6, 0.7, 0.8, 0.9, 0.9, 0.5, 0.2, 0.3]  # 6 up, 1 down, 1 tie
    r = sign_test(a, b)
    assert (r.n, r.positive, r.negative) == (7, 6, 1)
    assert r.p_value == pytest.approx(2 * (1 + 7) / 2**7)  # 2 x P[X <= 1], X ~ Bin(7, 1/2), by hand
    assert r.p_value == pytest.approx(binomtest(6, 7, 0.5).pvalue)
    assert r.mean_delta == pytest.approx(sum(y - x for x, y in zip(a, b)) / 8)
    assert sign_test([1, 2], [1, 2]).p_value == 1.0
    with pytest.raises(ValueError, match="missing"):
        sign_test([1, float("nan")], [1, 2])


def test_spearman_rho_and_its_permutation_p_against_full_enumeration():
    import itertools

    from scipy.stats import spearmanr

    from forgetray.metrics.significance import spearman

    x = [0.1, 0.4, 0.35, 0.8, 0.7, 0.9, 0.2]
    y = [3.0, 2.5, 2.6, 1.0, 1.5, 1.0, 2.0]  # a tie in y
    rho, p = spearman(x, y, permutations=20000, seed=1)
    assert rho == pytest.approx(spearmanr(x, y).statistic)
    # the exact p: every one of the 7! orderings of y
    exact = [spearmanr(x, perm).statistic for perm in itertools.permutations(y)]
    exact_p = sum(abs(r) >= abs(rho) - 1e-12 for r in exact) / len(exact)
    assert p == pytest.approx(exact_p, abs=0.005)
    assert spearman([1, 2, 3], [5, 5, 5]) == (pytest.approx(float("nan"), nan_ok=True), 1.0)


def test_fixed_threshold_settings_reach_the_rule():
    fixed = metrics.classify_fixed
    # tau = 0 is allowed: any loss at all is a drop, no change is none
    assert fixed(0.50, 0.49, 0.50, 10.0, 10.0, tau=0.0).stage == metrics.PSEUDO_FORGETTING
    assert fixed(0.50, 0.50, 0.50, 10.0, 10.0, tau=0.0).stage == metrics.NO_FORGETTING
    with pytest.raises(ValueError, match="tau must be non-negative, got -0.01"):
        fixed(0.50, 0.45, 0.49, 10.0, 10.0, tau=-0.01)
    # the PPL tolerance is the caller's: 10% above base is restored at tolerance 0.2, not at the default 0.05
    loose = fixed(0.50, 0.45, 0.49, 10.0, 11.0, ppl_tolerance=0.2)
    assert loose.restored_ok is True and loose.stage == metrics.PSEUDO_FORGETTING
    strict = fixed(0.50, 0.45, 0.49, 10.0, 11.0)
    assert strict.restored_ok is False and strict.stage == metrics.NOT_RESTORED


def test_classify_checkpoint_passes_its_settings_to_both_tests_and_the_precondition():
    # Base right on all 200; 5 questions lost: McNemar p = 2 / 2^5 = 0.0625, a drop at alpha 0.1, none at 0.05.
    lost5, lost2 = outcomes(200, 5), outcomes(200, 2)
    assert metrics.classify_checkpoint(BASE, lost5, lost2, 10.0, 10.0).stage == metrics.NO_FORGETTING
    assert metrics.classify_checkpoint(BASE, lost5, lost2, 10.0, 10.0, alpha=0.1).stage == metrics.PSEUDO_FORGETTING
    assert metrics.classify_checkpoint(BASE, BASE, lost5, 10.0, 10.0, alpha=0.1).stage == metrics.ACTUAL_FORGETTING
    # the tolerance reaches the PPL precondition: 10% above base is restored at 0.2 only
    loose = metrics.classify_checkpoint(BASE, lost5, lost2, 10.0, 11.0, alpha=0.1, ppl_tolerance=0.2)
    assert loose.restored_ok is True and loose.stage == metrics.PSEUDO_FORGETTING
    assert metrics.classify_checkpoint(BASE, lost5, lost2, 10.0, 11.0).stage == metrics.NOT_RESTORED


def test_is_restored_at_zero_tolerance_and_its_error():
    assert metrics.is_restored(10.0, 10.0, ppl_tolerance=0.0)
    assert not metrics.is_restored(10.0, 10.000001, ppl_tolerance=0.0)
    with pytest.raises(ValueError, match="ppl_tolerance must be non-negative, got -0.1"):
        metrics.is_restored(10.0, 10.0, ppl_tolerance=-0.1)


def test_bootstrap_and_drop_settings_are_validated_at_their_bounds():
    a, b = outcomes(20, 0), outcomes(20, 3)
    one = metrics.paired_bootstrap(a, b, n_resamples=1)  # a single resample is allowed: both bounds are its delta
    assert one.low == one.high
    with pytest.raises(ValueError, match="^n_resamples must be positive, got 0$"):
        metrics.paired_bootstrap(a, b, n_resamples=0)
    for confidence in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"^confidence must be in \(0, 1\), got {confidence}$"):
            metrics.paired_bootstrap(a, b, confidence=confidence)
    for alpha in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"^alpha must be in \(0, 1\), got {alpha}$"):
            metrics.significant_drop(a, b, alpha=alpha)


def test_mcnemar_drop_needs_p_strictly_below_alpha():
    # 5 of 200 lost, none gained: p = 2 / 2^5 = 0.0625 exactly
    assert metrics.mcnemar(BASE, outcomes(200, 5)).p_value == 0.0625
    assert not metrics.significant_drop(BASE, outcomes(200, 5), alpha=0.0625)
    assert metrics.significant_drop(BASE, outcomes(200, 5), alpha=0.0625 + 1e-9)


def test_bootstrap_drop_is_the_upper_bound_of_its_own_interval():
    """significant_drop(test="bootstrap") is paired_bootstrap's (1 - alpha) interval with the same draws, for every
    seed and resample count: on a borderline case (6 lost, 1 gained of 100) the decision changes with them."""
    a = np.ones(100, dtype=bool)
    b = outcomes(100, 6)
    a[99] = False  # question 99: a wrong, b right
    decisions = set()
    for seed in range(12):
        for n_resamples, alpha in ((40, 0.05), (40, 0.2), (200, 0.05)):
            ci = metrics.paired_bootstrap(a, b, n_resamples=n_resamples, seed=seed, confidence=1 - alpha)
            got = metrics.significant_drop(a, b, alpha=alpha, test="bootstrap", n_resamples=n_resamples, seed=seed)
            assert got == (ci.high < 0), (seed, n_resamples, alpha)
            decisions.add(got)
    assert decisions == {True, False}
    # the defaults: 10,000 resamples from seed 0
    assert metrics.paired_bootstrap(a, b) == metrics.paired_bootstrap(a, b, n_resamples=10_000, seed=0)
    assert metrics.paired_bootstrap(a, b, n_resamples=40) != metrics.paired_bootstrap(a, b, n_resamples=40, seed=1)


def test_sign_test_inputs_by_message():
    from forgetray.metrics.significance import sign_test

    one = sign_test([0.5], [0.25])  # a single pair is a (powerless) test
    assert (one.n, one.negative, one.p_value) == (1, 1, 1.0)
    shape_error = r"^sign_test needs two equal-length, non-empty 1-d sequences, got "
    with pytest.raises(ValueError, match=shape_error + r"\(3,\) and \(2,\)$"):
        sign_test([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=shape_error + r"\(1, 2\) and \(1, 2\)$"):
        sign_test([[1, 2]], [[1, 3]])
    with pytest.raises(ValueError, match=shape_error + r"\(0,\) and \(0,\)$"):
        sign_test([], [])
    for a, b in (([1, None], [1, 2]), ([1, 2], [None, 2])):  # None is a missing value, like nan
        with pytest.raises(ValueError, match=r"^sign_test: a value is missing \(nan\)$"):
            sign_test(a, b)


def test_paired_inputs_are_named_in_their_errors():
    with pytest.raises(ValueError, match=r"^a_correct must be one-dimensional \(one entry per question\), got shape "
                                         r"\(1, 2\)$"):
        metrics.mcnemar([[1, 0]], [1, 0])
    with pytest.raises(ValueError, match=r"^b_correct must be one-dimensional"):
        metrics.mcnemar([1, 0], [[1, 0]])
    with pytest.raises(ValueError, match="^a_correct must be boolean or 0/1$"):
        metrics.mcnemar([2, 0], [1, 0])
    with pytest.raises(ValueError, match="^b_correct must be boolean or 0/1$"):
        metrics.mcnemar([1, 0], [1, 0.5])
    with pytest.raises(ValueError, match="^paired tests need at least one question$"):
        metrics.mcnemar([], [])


def test_mcnemar_p_of_thousands_of_discordant_pairs_against_scipy():
    """1000 against 1100 discordant questions: the binomial coefficients pass 10^600, beyond a float (exact integers
    keep the p-value finite and right)."""
    stats = pytest.importorskip("scipy.stats")
    a = np.array([True] * 1000 + [False] * 1100 + [True] * 50)
    b = np.array([False] * 1000 + [True] * 1100 + [True] * 50)
    result = metrics.mcnemar(a, b)
    assert (result.b10, result.b01) == (1000, 1100)
    assert result.p_value == pytest.approx(stats.binomtest(1000, 2100, 0.5).pvalue, rel=1e-9)


def test_spearman_inputs_defaults_and_constant_sides():
    from forgetray.metrics.significance import spearman

    x, y = [1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5]
    rho, p = spearman(x, y)
    assert (rho, p) == spearman(x, y, permutations=10000, seed=0)
    assert spearman(x, y, permutations=200) != spearman(x, y, permutations=200, seed=1)
    assert rho == pytest.approx(1 - 6 * 6 / (6 * 35))  # 1 - 6 sum d^2 / (n (n^2 - 1)), d = +-1 for each of 6
    for bad_x, bad_y, shapes in (([1, 2, 3], [1, 2], r"\(3,\), \(2,\)"), ([[1, 2, 3]], [[1, 2, 3]], r"\(1, 3\), \(1, 3\)"),
                                 ([1, 2], [1, 2], r"\(2,\), \(2,\)")):
        with pytest.raises(ValueError, match=rf"^spearman needs two equal-length 1-d sequences of >= 3 values, got "
                                             rf"{shapes}$"):
            spearman(bad_x, bad_y)
    # ranks 1..n have a spread; a constant side has none: rho undefined, p = 1 (either side)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])[0]) and spearman([1, 2, 3], [5, 5, 5])[1] == 1.0
    assert spearman([1.0, 2.0, 3.0], [3.0, 1.0, 2.0])[0] == pytest.approx(-0.5)


def test_spearman_permutation_p_counts_ties_with_rho_and_adds_one():
    """3 values: 2 of the 6 orders of y reach |rho| = 1 (itself and its reversal); p = (count + 1) / (permutations + 1)
    with the count taken here over seed 0's shuffles."""
    from forgetray.metrics.significance import spearman

    draws = np.random.default_rng(0)
    count = sum(abs(np.corrcoef([1, 2, 3], draws.permutation([1.0, 2.0, 3.0]))[0, 1]) >= 1 - 1e-12
                for _ in range(300))
    assert 60 < count < 140
    assert spearman([1, 2, 3], [1, 2, 3], permutations=300) == (pytest.approx(1.0), (count + 1) / 301)
    # ties: x's ranks (1.5, 1.5, 3.5, 3.5) have standard deviation exactly 1, a spread like any other
    rho, _ = spearman([1, 1, 2, 2], [1, 2, 3, 4], permutations=50)
    assert rho == pytest.approx(np.corrcoef([1.5, 1.5, 3.5, 3.5], [1, 2, 3, 4])[0, 1])
