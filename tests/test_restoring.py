"""Restoring-set selection: exact token budget, ascending perplexity, disjoint from the probing set, streaming."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from fixtures import WORDS, make_tokenizer
from forgetray.data.restoring import build_restoring_set, iter_pool, score_pool, select_budget, text_key


def test_select_budget_by_hand():
    ppl = np.array([3.0, 1.0, 2.0, 1.0])
    n_tokens = np.array([5, 4, 6, 3])
    line = np.array([1, 2, 3, 4])
    chosen, keep = select_budget(ppl, n_tokens, line, budget=10)
    # ppl 1 (line 2, 4 tok), ppl 1 (line 4, 3 tok), ppl 2 (line 3: 6 tok, cut to 3) -> 4 + 3 + 3 = 10
    assert chosen.tolist() == [1, 3, 2] and keep.tolist() == [4, 3, 3]
    chosen, keep = select_budget(ppl, n_tokens, line, budget=7)  # lands exactly on a boundary: nothing cut
    assert chosen.tolist() == [1, 3] and keep.tolist() == [4, 3]
    with pytest.raises(ValueError, match="fewer than the budget"):
        select_budget(ppl, n_tokens, line, budget=19)


def write_pool(path, texts):
    path.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def fake_scorer(texts):
    # Deterministic stand-in for the base model: "perplexity" from the text itself (independent of the ranking code).
    return [(float(sum(map(ord, t)) % 97) / 10.0 * max(1, len(t.split())), max(1, len(t.split()))) for t in texts]


def test_selection_matches_a_brute_force_reference_and_excludes_probes(tmp_path):
    tokenizer = make_tokenizer()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(300)]
    pool = write_pool(tmp_path / "pool.jsonl", texts)
    probes = set(texts[::7])  # the probing set: must never be selected
    exclude = frozenset(text_key(t) for t in probes)
    count = lambda ts: [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in ts]  # noqa: E731
    files = []
    for rank in range(2):  # two ranks, each scoring its share of the stream
        files.append(tmp_path / f"scores-{rank}.parquet")
        score_pool(fake_scorer, pool, files[-1], batch_size=16, shard=(rank, 2), exclude=exclude, count_tokens=count)
    budget = 700
    summary = build_restoring_set(pool, files, budget, tokenizer, tmp_path / "restoring")

    import datasets

    restoring = datasets.load_from_disk(str(tmp_path / "restoring"))
    assert sum(len(ids) for ids in restoring["input_ids"]) == budget == summary["tokens"]

    # Reference: load everything, sort by (ppl, line), take greedily, cut the last one.
    candidates = [(float(np.exp(nll / n)), line, t) for line, t in enumerate(texts, start=1) if t not in probes
                  for nll, n in [fake_scorer([t])[0]]]
    candidates.sort()
    want, total = [], 0
    for _, line, t in candidates:
        if total >= budget:
            break
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        want.append((line, ids[: budget - total]))
        total += len(want[-1][1])
    assert [(r["line"], r["input_ids"]) for r in restoring] == want
    assert not probes & {texts[line - 1] for line in restoring["line"]}
    assert list(restoring["ppl"]) == sorted(restoring["ppl"])


def test_iter_pool_shards_cover_every_line_once_and_names_bad_lines(tmp_path):
    pool = write_pool(tmp_path / "pool.jsonl", [f"text {i}" for i in range(10)])
    seen = [p["line"] for rank in range(3) for batch in iter_pool(pool, 4, (rank, 3)) for p in batch]
    assert sorted(seen) == list(range(1, 11))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected an object"):
        list(iter_pool(bad, 4))


def test_ranking_streams_the_pool(tmp_path):
    """Scoring a pool keeps only a batch in memory: peak Python allocations stay far below the file's size."""
    line = json.dumps({"text": " ".join(WORDS) * 3}) + "\n"
    pool = tmp_path / "big.jsonl"
    with open(pool, "w") as fh:
        for _ in range(40_000):
            fh.write(line)
    size = pool.stat().st_size
    tracemalloc.start()
    score_pool(lambda ts: [(1.0, 1)] * len(ts), pool, tmp_path / "s.parquet", batch_size=64,
               count_tokens=lambda ts: [1] * len(ts))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert size > 15e6 and peak < size / 20, (size, peak)
