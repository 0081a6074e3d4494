"""Paired significance tests on per-question correctness (docs/methods.md §4): pure functions, no I/O.

Both model states answer the same questions, so the tests are paired: McNemar's exact test on the discordant
questions, and a paired bootstrap of the accuracy difference. Inputs are boolean array-likes of shape [N] (0/1
integers and CPU torch tensors are accepted); `a` is the reference state (e.g. base), `b` the other (e.g. SFT_e),
and every delta is acc(b) - acc(a).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TESTS = ("mcnemar", "bootstrap")


@dataclass(frozen=True)
class McNemarResult:
    """n questions; b01 = a wrong & b right, b10 = a right & b wrong; delta = acc(b) - acc(a); two-sided p."""

    n: int
    b01: int
    b10: int
    delta: float
    p_value: float


@dataclass(frozen=True)
class BootstrapResult:
    """Observed delta = acc(b) - acc(a) and its percentile confidence interval [low, high]."""

    delta: float
    low: float
    high: float


def _paired(a_correct, b_correct) -> tuple[np.ndarray, np.ndarray]:
    """Both correctness vectors as boolean [N] arrays, checked to describe the same N > 0 questions."""
    arrays = []
    for name, values in (("a_correct", a_correct), ("b_correct", b_correct)):
        arr = np.asarray(values)
        if arr.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional (one entry per question), got shape {arr.shape}")
        if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must be boolean or 0/1")
        arrays.append(arr.astype(bool))
    a, b = arrays
    if a.shape != b.shape:
        raise ValueError(f"paired tests need the same questions: a_correct {a.shape} vs b_correct {b.shape}")
    if a.size == 0:
        raise ValueError("paired tests need at least one question")
    return a, b


# Why by hand and not scipy.stats (binomtest, rankdata), which give the same numbers (tests/test_stage.py checks
# McNemar, the sign test and the ranks against them): scipy is not a runtime dependency of forgetray (only of its
# tests), and `import scipy.stats` alone takes 0.9 s on the 2-core test machine (numpy already loaded), three times
# what loading this module, margin and pooled takes, numpy included (0.3 s), in every process that judges stages.


def _half_binomial_cdf(k: int, n: int) -> float:
    """P[X <= k] for X ~ Binomial(n, 1/2), exactly: sum_{i<=k} C(n, i) / 2^n in integers, rounded once at the end.

    Exact integers keep tiny p-values accurate (2 * this is scipy.stats.binomtest(k, n, 0.5).pvalue for k <= n/2).
    """
    term = total = 1
    for i in range(k):
        term = term * (n - i) // (i + 1)  # C(n, i + 1) from C(n, i); the division is exact
        total += term
    return total / 2**n  # int / int is correctly rounded however large the integers are


def mcnemar(a_correct, b_correct) -> McNemarResult:
    """Exact two-sided McNemar test: a binomial test of b01 against Binomial(b01 + b10, 1/2).

    p = min(1, 2 * P[X <= min(b01, b10)]); with no discordant question p = 1 (the states cannot be told apart).
    """
    a, b = _paired(a_correct, b_correct)
    b01 = int(np.count_nonzero(~a & b))
    b10 = int(np.count_nonzero(a & ~b))
    discordant = b01 + b10
    p_value = 1.0 if discordant == 0 else min(1.0, 2.0 * _half_binomial_cdf(min(b01, b10), discordant))
    return McNemarResult(n=int(a.size), b01=b01, b10=b10, delta=(b01 - b10) / a.size, p_value=p_value)


def paired_bootstrap(
    a_correct, b_correct, n_resamples: int = 10_000, seed: int = 0, confidence: float = 0.95
) -> BootstrapResult:
    """Percentile bootstrap CI for acc(b) - acc(a), resampling question indices (the same ones for both states).

    The resampled delta depends only on how many drawn questions have b - a = -1, 0 and +1, so instead of drawing
    an [n_resamples, N] index matrix each resample draws those three counts from the multinomial they follow
    under index resampling: the same distribution in O(n_resamples) memory, whatever N is.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    a, b = _paired(a_correct, b_correct)
    n = a.size
    worse = np.count_nonzero(a & ~b)  # b - a = -1
    better = np.count_nonzero(~a & b)  # b - a = +1
    shares = np.array([worse, n - worse - better, better], dtype=np.float64) / n
    counts = np.random.default_rng(seed).multinomial(n, shares, size=n_resamples)
    deltas = (counts[:, 2] - counts[:, 0]) / n
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(deltas, [tail, 1.0 - tail])
    return BootstrapResult(delta=float(better - worse) / n, low=float(low), high=float(high))


def significant_drop(
    a_correct,
    b_correct,
    alpha: float = 0.05,
    test: str = "mcnemar",
    *,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> bool:
    """True iff b is significantly worse than a at level alpha.

    mcnemar: delta < 0 and the two-sided p < alpha. bootstrap: the upper bound of the (1 - alpha) percentile CI is
    below 0 (n_resamples and seed only matter for the bootstrap).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if test == "mcnemar":
        result = mcnemar(a_correct, b_correct)
        return result.delta < 0 and result.p_value < alpha
    if test == "bootstrap":
        ci = paired_bootstrap(a_correct, b_correct, n_resamples=n_resamples, seed=seed, confidence=1.0 - alpha)
        return ci.high < 0
    raise ValueError(f"unknown test {test!r}; expected one of {TESTS}")


# --- across checkpoints: paired values, and a rank correlation -------------------------------------------------

@dataclass(frozen=True)
class SignTestResult:
    """Pairs (a_i, b_i): `positive` with b > a, `negative` with b < a (ties dropped); mean_delta = mean(b - a) over
    all pairs; two-sided exact p."""

    n: int
    positive: int
    negative: int
    mean_delta: float
    p_value: float


def sign_test(a, b) -> SignTestResult:
    """Exact two-sided sign test of paired real values (e.g. one accuracy per seed x checkpoint, under two
    conditions): a binomial test of the positive differences among the non-zero ones; p = 1 without any."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"sign_test needs two equal-length, non-empty 1-d sequences, got {a.shape} and {b.shape}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("sign_test: a value is missing (nan)")
    delta = b - a
    positive, negative = int((delta > 0).sum()), int((delta < 0).sum())
    n = positive + negative
    p_value = 1.0 if n == 0 else min(1.0, 2.0 * _half_binomial_cdf(min(positive, negative), n))
    return SignTestResult(n=n, positive=positive, negative=negative, mean_delta=float(delta.mean()), p_value=p_value)


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank (scipy.stats.rankdata's default, "average")."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x, y, permutations: int = 10000, seed: int = 0) -> tuple[float, float]:
    """Spearman's rank correlation of paired values and its two-sided permutation p-value: the share of `permutations`
    seeded shuffles of y whose |rho| is at least the observed one ((count + 1) / (permutations + 1)). nan, 1.0 when
    either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size < 3:
        raise ValueError(f"spearman needs two equal-length 1-d sequences of >= 3 values, got {x.shape}, {y.shape}")
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan"), 1.0
    rho = float(np.corrcoef(rx, ry)[0, 1])
    rng = np.random.default_rng(seed)
    shuffled = np.array([np.corrcoef(rx, rng.permutation(ry))[0, 1] for _ in range(permutations)])
    return rho, float(((np.abs(shuffled) >= abs(rho) - 1e-12).sum() + 1) / (permutations + 1))


@dataclass(frozen=True)
class UnitCorrelation:
    """Pearson's r of x and y after each stratum's mean is taken out of both (the partial correlation given the
    strata as a factor), and its two-sided p with the units as the exchangeable draws."""

    r: float
    p_value: float
    units: int
    permutations: int  # the unit permutations the p counts (every one when `exact`)
    exact: bool


def within_strata_correlation(x, y, strata, units, max_permutations: int = 40320, seed: int = 0) -> UnitCorrelation:
    """Correlation of paired values measured on every unit (e.g. a seed) at every stratum (e.g. an epoch), controlled
    for the strata: x and y less their stratum's mean, so a trend all units share along the strata (both growing
    with the epoch) counts for nothing. The p moves y's values with their unit as a whole (a unit's measurements at
    the strata are not independent draws; the units are): the share of unit permutations whose |r| is at least the
    observed one, over all of them when there are at most `max_permutations` (8 units), else over that many seeded
    ones ((count + 1) / (n + 1)). r is nan and p 1 when either side is constant within the strata."""
    import itertools
    import math

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    strata, units = np.asarray(strata), np.asarray(units)
    if not (x.shape == y.shape == strata.shape == units.shape) or x.ndim != 1:
        raise ValueError("within_strata_correlation needs x, y, strata and units of one length")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("within_strata_correlation: a value is missing (nan)")
    unit_ids, stratum_ids = np.unique(units), np.unique(strata)
    if len(unit_ids) < 3:
        raise ValueError(f"within_strata_correlation needs >= 3 units, got {len(unit_ids)}")
    cells = {(u, s): i for i, (u, s) in enumerate(zip(units.tolist(), strata.tolist()))}
    if len(cells) != len(x) or len(x) != len(unit_ids) * len(stratum_ids):
        raise ValueError("within_strata_correlation needs every unit measured once at every stratum")
    order = [[cells[(u, s)] for s in stratum_ids.tolist()] for u in unit_ids.tolist()]
    xm, ym = x[order], y[order]  # units x strata
    xc, yc = xm - xm.mean(axis=0), ym - ym.mean(axis=0)
    scale = math.sqrt(float((xc**2).sum() * (yc**2).sum()))
    n = len(unit_ids)
    if scale == 0:
        return UnitCorrelation(float("nan"), 1.0, n, 0, True)
    r = float((xc * yc).sum()) / scale
    exact = math.factorial(n) <= max_permutations
    if exact:
        perms = [list(p) for p in itertools.permutations(range(n))]
    else:
        rng = np.random.default_rng(seed)
        perms = [rng.permutation(n) for _ in range(max_permutations)]
    rs = np.array([float((xc * yc[p]).sum()) / scale for p in perms])
    count = int((np.abs(rs) >= abs(r) - 1e-12).sum())
    p_value = count / len(perms) if exact else (count + 1) / (len(perms) + 1)
    return UnitCorrelation(r, p_value, n, len(perms), exact)
