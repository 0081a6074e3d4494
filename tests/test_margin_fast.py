"""`margin.resample_means` (restructured for the report's speed, issue 19) against the implementation it replaced,
kept here verbatim as the reference: the same seed must give the same draws, exactly for 0/1 outcomes (every partial
sum an integer) and to 1e-12 for arbitrary floats (only the summation order changed)."""

from __future__ import annotations

import numpy as np
import pytest

from forgetray.metrics import margin


def reference_resample_means(matrices, n_resamples, rng):
    """The former `resample_means`: c @ X first, then an einsum with the question counts."""
    (s, q), = {m.shape for m in matrices.values()}
    seeds = margin._counts(s, n_resamples, rng).astype(float) if s > 1 else np.ones((n_resamples, 1))
    questions = margin._counts(q, n_resamples, rng)
    names = list(matrices)
    stacked = np.concatenate([matrices[name].astype(float) for name in names], axis=1)
    per_question = (seeds @ stacked).reshape(n_resamples, len(names), q)
    means = np.einsum("bnq,bq->nb", per_question, questions) / (s * q)
    return dict(zip(names, means))


def reference_counts(n, n_resamples, rng):
    """The former `_counts` (offsets added into a new array)."""
    idx = rng.integers(0, n, size=(n_resamples, n)) + (n * np.arange(n_resamples))[:, None]
    return np.bincount(idx.ravel(), minlength=n_resamples * n).reshape(n_resamples, n)


@pytest.mark.parametrize("n", [1, 3, 300])
def test_counts_equal_the_former_ones(n):
    assert np.array_equal(margin._counts(n, 500, np.random.default_rng(n)),
                          reference_counts(n, 500, np.random.default_rng(n)))


@pytest.mark.parametrize("seeds", [1, 2, 3, 5])
@pytest.mark.parametrize("trial", range(4))
def test_zero_one_differences_give_bit_identical_draws(seeds, trial):
    # What `deltas` passes: differences of 0/1 outcomes, values in {-1, 0, 1}.
    rng = np.random.default_rng([seeds, trial])
    questions = int(rng.integers(2, 400))
    states = rng.random((4, seeds, questions)) < rng.random((4, 1, 1))
    matrices = {"a": states[0].astype(int) - states[1], "b": states[3].astype(int) - states[2],
                "c": states[2].astype(int) - states[1], "d": states[3].astype(int) - states[1]}
    fast = margin.resample_means(matrices, 300, np.random.default_rng(trial))
    slow = reference_resample_means(matrices, 300, np.random.default_rng(trial))
    assert list(fast) == list(slow)
    for name in matrices:
        assert np.array_equal(fast[name], slow[name]), name


@pytest.mark.parametrize("seeds", [1, 3, 4])
def test_arbitrary_floats_agree_to_1e_12(seeds):
    rng = np.random.default_rng(seeds)
    matrices = {name: rng.normal(size=(seeds, 57)) * 10 for name in "xyz"}
    fast = margin.resample_means(matrices, 400, np.random.default_rng(7))
    slow = reference_resample_means(matrices, 400, np.random.default_rng(7))
    for name in matrices:
        np.testing.assert_allclose(fast[name], slow[name], rtol=0, atol=1e-12)
        assert not np.allclose(fast[name], fast[name].mean())  # draws that vary: a real comparison


def _reference_deltas(monkeypatch, *args, **kwargs):
    """`deltas` with its draws from the reference `resample_means` on `default_rng(seed)`, as it drew them before."""
    with monkeypatch.context() as patch:
        patch.setattr(margin, "_seeded_counts", lambda seed, s, q, n_resamples: (seed, n_resamples))
        patch.setattr(margin, "_weighted_means",
                      lambda m, seed, n: reference_resample_means(m, n, np.random.default_rng(seed)))
        return margin.deltas(*args, **kwargs)


@pytest.mark.parametrize("cache_bytes", [margin._CACHE_BYTES, 0, 2_000_000])
def test_deltas_unchanged_on_replicates(monkeypatch, cache_bytes):
    # The whole interval path, pooled (3 seeds, crossed scaling) and one seed, against the reference draws; again
    # from the cache (a second grid point with the same seeds), and with a cache too small to hold them all.
    monkeypatch.setattr(margin, "_CACHE_BYTES", cache_bytes)
    monkeypatch.setattr(margin, "_cache", {})
    rng = np.random.default_rng(11)
    b, s, r, c = (rng.random((3, 120)) < p for p in (0.6, 0.45, 0.55, 0.58))
    expected = _reference_deltas(monkeypatch, b, s, r, c, seed=5)
    expected_one = _reference_deltas(monkeypatch, b[0], s[0], r[0], c[0], seed=6)
    for _ in range(2):
        for seed in (5, 6, 7):  # 7: another stream between, so that a small cache evicts
            found = margin.deltas(b, s, r, c, seed=seed)
            found_one = margin.deltas(b[0], s[0], r[0], c[0], seed=seed)
            if seed == 5:
                assert found == expected
            if seed == 6:
                assert found_one == expected_one
    assert expected != _reference_deltas(monkeypatch, b, s, r, c, seed=6)  # the seed matters: a real comparison
    assert sum(v.nbytes for counts in margin._cache.values() for v in counts if v is not None) <= cache_bytes
