"""The margin rule (docs/methods.md §4 and §10): a stage verdict about how much knowledge was lost, not about how many
questions or seeds were collected. Pure functions: numpy only, seeded and deterministic.

Per checkpoint e, with B the base, SFT_e the fine-tuned model, R_e its restoration and R_0 the control (the
untouched start put through the same restoration recipe), all on the same questions:
- drop `D_S = acc(B) - acc(SFT_e)`, residual `D_R = acc(R_0) - acc(R_e)` (positive = knowledge lost);
- recoverable share `(acc(R_e) - acc(SFT_e)) / (acc(R_0) - acc(SFT_e))`;
- intervals from a paired bootstrap over questions (the same question draws for every model); with replicates
  (outcomes of shape [seeds, questions]) a two-level bootstrap: seeds with replacement, then questions with
  replacement, one question draw shared by every seed and model, because the seeds answer the same questions and
  seed x question pairs are not independent observations; by default (`crossed`) its spread scaled to the crossed
  design's variance (`deltas`, `mean_variances`: the plain two-level bootstrap counts the seed x question noise about
  three times, so its 95% intervals covered 98-99.7% in the simulation) and widened by t for an estimated variance;
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
from statistics import NormalDist
from typing import Mapping

import numpy as np

from forgetray.metrics.stage import ACTUAL_FORGETTING, INCONCLUSIVE, NO_FORGETTING, NOT_RESTORED, PSEUDO_FORGETTING

REPORTED_MARGINS = (0.01, 0.02, 0.05)  # every table shows the verdict at each of these too (docs/methods.md §4)
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
    idx = rng.integers(0, n, size=(n_resamples, n))
    idx += (n * np.arange(n_resamples))[:, None]  # each resample its own bins; in place: no second [B, n] array
    return np.bincount(idx.ravel(), minlength=n_resamples * n).reshape(n_resamples, n)


def _resample_counts(s: int, q: int, n_resamples: int, rng: np.random.Generator) -> tuple[np.ndarray | None, np.ndarray]:
    """The seed counts (None when S = 1: every seed once) and the question counts of `resample_means`, in that order
    from `rng`."""
    seeds = _counts(s, n_resamples, rng) if s > 1 else None
    return seeds, _counts(q, n_resamples, rng)


def _weighted_means(matrices: Mapping[str, np.ndarray], seeds: np.ndarray | None, questions: np.ndarray) -> dict:
    """c @ X @ k / (S Q) for every matrix X under resample counts c (seeds) and k (questions)."""
    (s, q), = {m.shape for m in matrices.values()}
    names = list(matrices)
    # The question counts first, as one [B, Q] @ [Q, n x S] product (every state's seeds side by side), then the seed
    # counts over S columns: one small BLAS product instead of a [B, n, Q] intermediate and an einsum over it. With
    # 0/1 outcomes every partial sum is an integer well below 2^53, so the means are bit for bit those of the former
    # c @ X then @ k order (tests/test_margin_fast.py).
    stacked = np.concatenate([matrices[name].astype(float).T for name in names], axis=1)  # [Q, n x S]
    per_seed = (questions.astype(float) @ stacked).reshape(len(questions), len(names), s)
    sums = per_seed[:, :, 0] if seeds is None else (per_seed * seeds[:, None, :]).sum(axis=2)
    return dict(zip(names, sums.T / (s * q)))


def resample_means(matrices: Mapping[str, np.ndarray], n_resamples: int, rng: np.random.Generator) -> dict:
    """Bootstrap means of each [S, Q] matrix under one shared resampling: seed counts c (multinomial over S; all ones
    when S = 1) and question counts k (multinomial over Q); a resample's mean is c @ X @ k / (S Q), the same c and k
    for every matrix, so paired differences stay paired."""
    shapes = {m.shape for m in matrices.values()}
    if len(shapes) != 1:
        raise ValueError(f"every state must answer the same seeds x questions, got shapes {sorted(shapes)}")
    (s, q), = shapes
    return _weighted_means(matrices, *_resample_counts(s, q, n_resamples, rng))


# `deltas`' resample counts by (seed, S, Q, resamples). A replicated sweep runs every grid point with the same seeds
# (grids.Sweep: seed, seed + 1, ...) and judges the same epochs on the same questions, so the pooled table asks for
# the same few seeded draws at every grid point (`epoch_seed`); drawing them is most of a checkpoint's cost. Stored as
# the smallest unsigned type that holds a count (<= Q), at most _CACHE_BYTES in all, the oldest dropped first.
_CACHE_BYTES = 64 * 2**20
_cache: dict[tuple[int, int, int, int], tuple[np.ndarray | None, np.ndarray]] = {}


def _seeded_counts(seed: int, s: int, q: int, n_resamples: int) -> tuple[np.ndarray | None, np.ndarray]:
    key = (seed, s, q, n_resamples)
    if key not in _cache:
        dtype = np.min_scalar_type(max(s, q))
        counts = tuple(None if c is None else c.astype(dtype)
                       for c in _resample_counts(s, q, n_resamples, np.random.default_rng(seed)))
        for c in counts:
            if c is not None:
                c.setflags(write=False)  # shared by every later call with this seed
        size = sum(c.nbytes for c in counts if c is not None)
        while _cache and size + sum(c.nbytes for v in _cache.values() for c in v if c is not None) > _CACHE_BYTES:
            del _cache[next(iter(_cache))]
        if size <= _CACHE_BYTES:
            _cache[key] = counts
        return counts
    return _cache[key]


def mean_variances(x) -> tuple[float, float, float]:
    """The variance of the mean of an [S, Q] array (S >= 2) when seeds and questions are both random, the variance
    the two-level bootstrap gives it, and the degrees of freedom of the first: (target, bootstrap, df).

    Target: with a crossed design every cell is x_sq = mu + a_s + b_q + e_sq (seed effect, question effect, their
    interaction: the ANOVA decomposition of any array whose rows and columns are exchangeable), so
    var(mean) = s_a / S + s_b / Q + s_e / (S Q). From the two-way ANOVA's mean squares (one observation per cell),
    s_e = MS_E, s_a = (MS_A - MS_E) / Q, s_b = (MS_B - MS_E) / S, each component truncated at zero, the usual
    estimator; truncation only ever widens.
    Bootstrap: resampling seeds and questions independently (the "pigeonhole" bootstrap) gives the mean the variance
    sum_s (r_s - m)^2 / S^2 + sum_q (c_q - m)^2 / Q^2 + SS_E / (S Q)^2 (r, c: row and column means; exact in the
    limit of many resamples), whose expectation is about s_a (S-1)/S^2 + s_b / Q + (3 - 2/S) s_e / (S Q): it counts
    the interaction nearly three times (Owen 2007, "The pigeonhole bootstrap", Ann. Appl. Stat. 1:386) and the seed
    spread only (S-1)/S of the time.
    df: the target is a sum of mean squares (S Q target = MS_A + MS_B - MS_E, or the terms left after truncation),
    each chi-square with S-1, Q-1 and (S-1)(Q-1) degrees of freedom; Satterthwaite's (1946) approximation gives the
    sum's. With few seeds and a real seed spread it is small: 3 seeds tell the seed spread from 2 degrees of
    freedom."""
    x = np.asarray(x, dtype=float)
    s, q = x.shape
    if s < 2 or q < 2:
        raise ValueError(f"needs at least 2 seeds and 2 questions, got shape {x.shape}")
    grand = x.mean()
    rows = x.mean(axis=1) - grand
    cols = x.mean(axis=0) - grand
    ss_e = float(((x - grand - rows[:, None] - cols[None, :]) ** 2).sum())
    ms_a = q * float((rows ** 2).sum()) / (s - 1)
    ms_b = s * float((cols ** 2).sum()) / (q - 1)
    ms_e = ss_e / ((s - 1) * (q - 1))
    keep_a, keep_b = ms_a > ms_e, ms_b > ms_e  # components that survive truncation
    terms = [(ms_a, s - 1)] * keep_a + [(ms_b, q - 1)] * keep_b + [(ms_e * (1 - keep_a - keep_b), (s - 1) * (q - 1))]
    target = sum(ms for ms, _ in terms) / (s * q)  # = s_a / S + s_b / Q + s_e / (S Q), truncated
    spread = sum(ms ** 2 / df for ms, df in terms)
    df = (target * s * q) ** 2 / spread if spread > 0 else math.inf
    bootstrap = float((rows ** 2).sum()) / s**2 + float((cols ** 2).sum()) / q**2 + ss_e / (s * q) ** 2
    return target, bootstrap, df


def _beta_cf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz; Press et al., Numerical
    Recipes, 3rd ed., 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _t_upper(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom, t >= 0: I_{df / (df + t^2)}(df / 2, 1 / 2) / 2."""
    a, b, x = df / 2.0, 0.5, df / (df + t * t)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) \
        if 0.0 < x < 1.0 else 0.0
    if x == 1.0:
        return 0.5
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a / 2.0
    return (1.0 - front * _beta_cf(b, a, 1.0 - x) / b) / 2.0


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile for 1/2 <= p < 1 (numpy only, no scipy): Newton's method on the upper tail from the
    normal quantile, each step kept inside a bracket that bisection would shrink."""
    if not 0.5 <= p < 1.0 or not df > 0:
        raise ValueError(f"needs 1/2 <= p < 1 and df > 0, got p={p}, df={df}")
    z = NormalDist().inv_cdf(p)
    if df > 1e3:  # the Cornish-Fisher expansion's first two terms (within 1e-6 here, where the tail loses digits)
        return z + (z ** 3 + z) / (4.0 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96.0 * df ** 2)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    low, high = 0.0, max(z, 1.0)
    while _t_upper(high, df) > 1.0 - p:
        low, high = high, 2.0 * high
    t = min(max(z, low), high)
    for _ in range(100):
        excess = _t_upper(t, df) - (1.0 - p)  # > 0: t is below the quantile
        if excess > 0:
            low = t
        else:
            high = t
        density = math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))
        step = t + excess / density
        if not low <= step <= high:
            step = (low + high) / 2.0
        if abs(step - t) <= 1e-13 * max(t, 1.0):
            return step
        t = step
    return t


def _width_factor(x: np.ndarray, level: float) -> float:
    """How much to scale a two-level bootstrap distribution's spread about the estimate: to the crossed design's
    variance (`mean_variances`), and by t over normal quantile at the variance's degrees of freedom, because that
    variance is itself estimated (from 2 degrees of freedom for the seed spread with 3 seeds). 1 with one seed (the
    ordinary paired bootstrap over questions) or no spread."""
    if x.shape[0] < 2 or x.shape[1] < 2:
        return 1.0
    target, bootstrap, df = mean_variances(x)
    if bootstrap <= 0:
        return 1.0
    p = 1.0 - (1.0 - level) / 2.0
    return math.sqrt(target / bootstrap) * t_quantile(p, df) / NormalDist().inv_cdf(p)


def _interval(estimate: float, draws: np.ndarray, level: float) -> Interval:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return Interval(float(estimate), float(low), float(high))


def deltas(base, sft, restored, control, *, level: float = 0.95, n_resamples: int = N_RESAMPLES,
           seed: int = 0, crossed: bool = True) -> Deltas:
    """D_S, D_R and the recoverable share of one checkpoint with `level` intervals (module docstring). Inputs are
    per-question correctness, [questions] for one trial or [seeds, questions] for replicates (row k of every input
    is replicate k; the same question in every column).

    `crossed` (replicates only; the default, `crossed=False` the plain two-level bootstrap): each difference's
    two-level bootstrap distribution is scaled about its estimate before its percentiles are read (`_width_factor`):
    to the crossed design's variance (`mean_variances`), because the plain two-level bootstrap counts the seed x
    question interaction about three times, and per-cell noise (a question that one model gets right and another
    wrong by chance) is most of the variance of a small residual; and
    by Student's t over the normal quantile at that variance's degrees of freedom, because with 3 seeds the seed
    spread is estimated from 2. D_S and D_R bounds are then clipped to [-1, 1], the range of a difference of two
    accuracies (with 3 seeds and one of them alone losing, t at 2 degrees of freedom reaches past it). In
    tests/test_margin_simulation.py (2000 draws) the plain bootstrap covered a residual of 0.01 in 98.1-99.7% of
    draws and a ceiling's drop at 3 seeds in 91.7%; crossed, every cell in 92.2-96.9%. The scaling keeps the
    two-level draws' shape (skew) and pairing; the share is the ratio of the scaled gain and gap draws (each scaled
    to its own variance, so their covariance only approximately). One seed: the ordinary paired bootstrap over
    questions either way."""
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
    draws = _weighted_means(differences, *_seeded_counts(seed, *b.shape, n_resamples))  # = resample_means(..seed)
    crossed = crossed and b.shape[0] > 1  # one seed: the paired bootstrap over questions as it is
    if crossed:
        draws = {name: observed[name] + (draws[name] - observed[name]) * _width_factor(differences[name], level)
                 for name in differences}
    gap = _interval(observed["gap"], draws["gap"], level)
    if gap.low > 0:  # a drop below R_0 that the interval tells from zero: the ratio is bounded
        with np.errstate(divide="ignore", invalid="ignore"):  # a few draws beyond the interval may have gap 0
            share = _interval(observed["gain"] / observed["gap"], draws["gain"] / draws["gap"], level)
    else:  # nothing (clearly) lost relative to R_0: the share's interval would be unbounded
        share = Interval(math.nan, math.nan, math.nan)
    d_sft, d_restored = (_interval(observed[name], draws[name], level) for name in ("d_sft", "d_restored"))
    if crossed:
        d_sft, d_restored = (Interval(i.estimate, max(i.low, -1.0), min(i.high, 1.0)) for i in (d_sft, d_restored))
    return Deltas(d_sft=d_sft, d_restored=d_restored, share=share, level=level, seeds=b.shape[0],
                  questions=b.shape[1])


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


# The rule's quantities as table columns (stages.csv, the pooled table) and `stage/<key>` metrics
# (registry.INTERVAL_KEYS).
_INTERVALS = {"drop": "d_sft", "residual": "d_restored", "share": "share"}


def interval_columns(found: Deltas) -> dict[str, float]:
    """drop, drop_low, drop_high, residual, ..., share_high and level: one checkpoint's row of the margin rule."""
    out = {}
    for key, field in _INTERVALS.items():
        interval = getattr(found, field)
        out.update({key: interval.estimate, f"{key}_low": interval.low, f"{key}_high": interval.high})
    out["level"] = found.level
    return out


def verdicts(found: Deltas, stage_margin: float, restored_ok: bool) -> dict[str, str]:
    """The headline verdict (`stage`, `why`) and the verdict at each reported margin (`stage_at_<m>`)."""
    verdict = classify(found, stage_margin, restored_ok)
    out = {"stage": verdict.stage, "why": verdict.why}
    for m in REPORTED_MARGINS:
        out[f"stage_at_{m:g}"] = classify(found, m, restored_ok).stage
    return out
