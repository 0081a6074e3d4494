"""within_strata_correlation (forgetray.metrics.significance): the correlation of two measurements across seeds x
epochs controlled for the epoch, with the seed as the unit of its permutation test; checked against this test's own
demeaning and a full enumeration of the seed permutations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from forgetray.metrics.significance import within_strata_correlation


def _grid(values: np.ndarray) -> tuple[list, list, list]:
    """A units x strata matrix as flat (value, stratum, unit) lists, in a shuffled order (the function must pair
    by labels, not by position)."""
    cells = [(values[u, s], s + 1, u) for u in range(values.shape[0]) for s in range(values.shape[1])]
    order = np.random.default_rng(7).permutation(len(cells))
    cells = [cells[i] for i in order]
    return [c[0] for c in cells], [c[1] for c in cells], [c[2] for c in cells]


def test_against_own_demeaning_and_every_seed_permutation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4))
    y = 0.6 * x + rng.normal(size=(5, 4))
    xs, strata, units = _grid(x)
    ys, _, _ = _grid(y)
    got = within_strata_correlation(xs, ys, strata, units)
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)

    def r(a, b):
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    assert got.r == pytest.approx(r(xc, yc))
    perms = list(itertools.permutations(range(5)))
    want = sum(abs(r(xc, yc[list(p)])) >= abs(r(xc, yc)) - 1e-12 for p in perms) / len(perms)
    assert got.p_value == pytest.approx(want) and got.exact and got.permutations == 120 and got.units == 5


def test_a_shared_epoch_trend_is_not_a_correlation():
    rng = np.random.default_rng(1)
    trend = np.arange(4.0) * 3  # both measurements grow with the epoch in every seed
    x = trend + rng.normal(scale=0.1, size=(6, 4))
    y = trend + rng.normal(scale=0.1, size=(6, 4))  # independent of x within each epoch
    xs, strata, units = _grid(x)
    ys, _, _ = _grid(y)
    assert np.corrcoef(xs, ys)[0, 1] > 0.99  # pooled over the checkpoints, the trend looks like a correlation
    got = within_strata_correlation(xs, ys, strata, units)
    assert abs(got.r) < 0.5 and got.p_value > 0.05 and got.permutations == 720


def test_seeds_that_drift_more_forget_more_is_found_and_its_p_is_bounded_by_the_seeds():
    drift = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])[:, None] + np.zeros((1, 3))  # per seed, the same each epoch
    x = drift + np.arange(3.0)
    y = 2 * drift + np.arange(3.0) * 5
    xs, strata, units = _grid(x)
    ys, _, _ = _grid(y)
    got = within_strata_correlation(xs, ys, strata, units)
    assert got.r == pytest.approx(1.0)
    assert got.p_value == pytest.approx(2 / 720)  # only the identity and the reversal reach |r| = 1: 6 seeds' floor


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="every unit measured once"):
        within_strata_correlation([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 1, 1, 2, 2], [0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match=">= 3 units"):
        within_strata_correlation([1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 1, 2], [0, 0, 1, 1])
    flat = within_strata_correlation([1, 1, 1], [1, 2, 3], [1, 1, 1], [0, 1, 2])
    assert np.isnan(flat.r) and flat.p_value == 1.0
    sampled = within_strata_correlation(np.arange(9.0), np.arange(9.0) ** 2, [1] * 9, list(range(9)),
                                        max_permutations=500)
    assert not sampled.exact and sampled.permutations == 500 and 1 / 501 <= sampled.p_value < 0.02


def test_sampled_p_is_the_seeded_share_plus_one():
    """More than max_permutations unit orders: p = (count + 1) / (permutations + 1) over the permutations of seed
    `seed`'s generator (default 0), counted here against this test's own demeaning."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(9, 2))
    y = 0.3 * x + rng.normal(size=(9, 2))
    xs, strata, units = _grid(x)
    ys, _, _ = _grid(y)
    got = within_strata_correlation(xs, ys, strata, units, max_permutations=200)
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    r = float((xc * yc).sum() / np.sqrt((xc**2).sum() * (yc**2).sum()))
    draws = np.random.default_rng(0)
    count = sum(abs(float((xc * yc[draws.permutation(9)]).sum() / np.sqrt((xc**2).sum() * (yc**2).sum())))
                >= abs(r) - 1e-12 for _ in range(200))
    assert 0 < count < 200  # a p between the bounds, where the seed matters
    assert got.r == pytest.approx(r)
    assert got.p_value == pytest.approx((count + 1) / 201) and not got.exact and got.permutations == 200
    assert within_strata_correlation(xs, ys, strata, units, max_permutations=200, seed=0) == got
    assert within_strata_correlation(xs, ys, strata, units, max_permutations=200, seed=5).p_value != got.p_value
    # a perfect correlation of 9 units: no random order of 200 reaches it (2 of 9! do): p = 1 / 201 exactly
    perfect = within_strata_correlation(np.arange(9.0), np.arange(9.0), [1] * 9, list(range(9)),
                                        max_permutations=200)
    assert perfect.r == pytest.approx(1.0) and perfect.p_value == 1 / 201


def test_exact_up_to_max_permutations_inclusive():
    # 3 units have 3! = 6 orders, all enumerated at max_permutations=6; x = y unevenly spaced: only the identity
    # reaches |r| = 1 (the reversal gives r = -0.93), so p = 1/6
    got = within_strata_correlation([1.0, 2.0, 4.0], [1.0, 2.0, 4.0], [1, 1, 1], [0, 1, 2], max_permutations=6)
    assert got.exact and got.permutations == 6 and got.p_value == pytest.approx(1 / 6)
    sampled = within_strata_correlation([1.0, 2.0, 4.0], [1.0, 2.0, 4.0], [1, 1, 1], [0, 1, 2], max_permutations=5)
    assert not sampled.exact and sampled.permutations == 5
    # 8 units (8! = 40320 orders) are enumerated by default
    assert within_strata_correlation(np.arange(8.0), np.arange(8.0) ** 3, [1] * 8, list(range(8))).exact


def test_constant_side_and_bad_inputs_by_message():
    flat = within_strata_correlation([1, 1, 1], [1, 2, 3], [1, 1, 1], [0, 1, 2])
    assert (flat.p_value, flat.units, flat.permutations, flat.exact) == (1.0, 3, 0, True)
    with pytest.raises(ValueError, match="^within_strata_correlation needs x, y, strata and units of one length$"):
        within_strata_correlation([1, 2, 3, 4], [1, 2, 3], [1, 1, 1, 1], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="^within_strata_correlation needs x, y, strata and units of one length$"):
        within_strata_correlation([[1, 2, 3]], [[1, 2, 3]], [[1, 1, 1]], [[0, 1, 2]])  # one length, but not 1-d
    for x, y in (([1, None, 3], [1, 2, 3]), ([1, 2, 3], [1, float("nan"), 3]), ([1, 2, 3], [None, 2, 3])):
        with pytest.raises(ValueError, match=r"^within_strata_correlation: a value is missing \(nan\)$"):
            within_strata_correlation(x, y, [1, 1, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="^within_strata_correlation needs every unit measured once at every stratum$"):
        within_strata_correlation([1, 2, 3, 4], [1, 2, 3, 4], [1, 1, 1, 2], [0, 1, 2, 0])
