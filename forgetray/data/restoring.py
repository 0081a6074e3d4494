"""Restoring-set selection (docs/methods.md §2): rank a plain-text pool by perplexity under the base model and take the
lowest-perplexity passages until their tokens equal one IFT epoch's tokens.

The pool is streamed (a JSONL file far larger than RAM is never loaded whole): passages are scored batch by batch and
their scores appended to a Parquet file; only the small score table (line, tokens, perplexity) is sorted; a second
streaming pass writes the selected passages' token ids as an Arrow dataset (`datasets.Dataset.save_to_disk`), which
restoration trains on. Passages that also occur in the probing set are never candidates, so the two stay disjoint.

Token counting (our reading of "the token count of one IFT epoch"): the IFT side counts every token of the
tokenized training examples ([BOS] prompt response [EOS], after truncation to max_length); the pool side counts each
passage's text tokens (no special tokens). The last selected passage is cut so the total equals the budget exactly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from forgetray.data.jsonl import iter_jsonl

SCORE_SCHEMA = pa.schema([("line", pa.int64()), ("id", pa.string()), ("n_tokens", pa.int64()),
                          ("nll", pa.float64()), ("ppl", pa.float64())])


def text_key(text: str) -> str:
    """Identity of a passage's text, for disjointness checks without keeping texts in memory."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _pool_records(pool: str) -> Iterator[tuple[int, str, object]]:
    """(line number, where, parsed record) of a JSONL file, or of a hub dataset streamed (`hf:` names)."""
    from forgetray.data.hub import is_hub_name, iter_texts

    if is_hub_name(str(pool)):
        for lineno, text in enumerate(iter_texts(str(pool)), start=1):
            yield lineno, f"{pool}#{lineno}", {"text": text}
        return
    for lineno, record in iter_jsonl(pool):
        yield lineno, f"{pool}:{lineno}", record


def iter_pool(pool, batch_size: int, shard: tuple[int, int] = (0, 1),
              exclude: frozenset[str] = frozenset()) -> Iterator[list[dict]]:
    """Batches of {"line", "id", "text"} from a pool (JSONL path or `hf:` name): this rank's lines
    (line % world == rank), skipping texts whose `text_key` is in `exclude`. Malformed lines raise ValueError
    naming file:line."""
    rank, world = shard
    batch: list[dict] = []
    for lineno, where, record in _pool_records(pool):
        if (lineno - 1) % world != rank:
            continue
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{where}: expected an object with a string field 'text'")
        if exclude and text_key(text) in exclude:
            continue
        batch.append({"line": lineno, "id": str(record.get("id", lineno)), "text": text})
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_pool(score_batch: Callable[[Sequence[str]], Sequence[tuple[float, int]]], pool, out: Path, *,
               batch_size: int, shard: tuple[int, int] = (0, 1), exclude: frozenset[str] = frozenset(),
               count_tokens: Callable[[Sequence[str]], Sequence[int]]) -> int:
    """Score this rank's share of the pool into a Parquet file of SCORE_SCHEMA; returns the number of batches.

    `score_batch(texts)` -> (summed NLL, scored tokens) per passage (e.g. `probes.passage_nlls` on the base model);
    `count_tokens(texts)` -> text tokens per passage (what the budget counts)."""
    batches = 0
    with pq.ParquetWriter(str(out), SCORE_SCHEMA) as writer:
        for batch in iter_pool(pool, batch_size, shard, exclude):
            texts = [p["text"] for p in batch]
            scored = score_batch(texts)
            nll = np.array([s[0] for s in scored], dtype=np.float64)
            scored_tokens = np.array([s[1] for s in scored], dtype=np.float64)
            # A passage with nothing to score ranks last rather than first.
            ppl = np.where(scored_tokens > 0, np.exp(nll / np.maximum(scored_tokens, 1)), np.inf)
            writer.write_table(pa.table({
                "line": [p["line"] for p in batch], "id": [p["id"] for p in batch],
                "n_tokens": np.asarray(count_tokens(texts), dtype=np.int64), "nll": nll, "ppl": ppl,
            }, schema=SCORE_SCHEMA))
            batches += 1
    return batches


def select_budget(ppl: np.ndarray, n_tokens: np.ndarray, line: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Pure selection: indices of the chosen passages in ascending perplexity (ties: earlier line first) and the
    tokens kept of each, summing exactly to `budget` (only the last one is cut)."""
    if budget <= 0:
        raise ValueError(f"restoring budget must be positive, got {budget}")
    order = np.lexsort((line, ppl))
    order = order[n_tokens[order] > 0]
    cumulative = np.cumsum(n_tokens[order])
    total = int(cumulative[-1]) if len(cumulative) else 0
    if total < budget:
        raise ValueError(f"the restoring pool has {total} tokens outside the probing set, fewer than the budget "
                         f"of one IFT epoch ({budget} tokens)")
    count = int(np.searchsorted(cumulative, budget, side="left")) + 1  # first prefix reaching the budget
    chosen = order[:count]
    keep = n_tokens[chosen].copy()
    keep[-1] -= int(cumulative[count - 1]) - budget
    return chosen, keep


def build_restoring_set(pool, score_files: Sequence[Path], budget: int, tokenizer, out_dir: Path) -> dict:
    """Select from the merged scores and write the selection (token ids, cut to the kept length) as an Arrow
    dataset at `out_dir`, in ascending-perplexity order. Returns a summary for logging."""
    import datasets

    scores = pa.concat_tables([pq.read_table(str(f)) for f in score_files])
    line = scores["line"].to_numpy()
    chosen, keep = select_budget(scores["ppl"].to_numpy(), scores["n_tokens"].to_numpy(), line, budget)
    keep_by_line = {int(line[i]): (rank, int(k)) for rank, (i, k) in enumerate(zip(chosen, keep))}
    ppl = scores["ppl"].to_numpy()
    ppl_by_line = {int(line[i]): float(ppl[i]) for i in chosen}

    def rows():
        picked: list[dict] = []
        for batch in iter_pool(pool, batch_size=1024):
            for passage in batch:
                if passage["line"] in keep_by_line:
                    rank, k = keep_by_line[passage["line"]]
                    ids = tokenizer(passage["text"], add_special_tokens=False)["input_ids"][:k]
                    picked.append({"rank": rank, "line": passage["line"], "id": passage["id"],
                                   "ppl": ppl_by_line[passage["line"]], "input_ids": ids})
        # Only the selection is held (its tokens equal one IFT epoch, which fits in memory by construction).
        yield from sorted(picked, key=lambda r: r["rank"])

    dataset = datasets.Dataset.from_generator(rows, cache_dir=str(out_dir.parent / ".arrow-cache"))
    dataset.save_to_disk(str(out_dir))
    n_kept = int(sum(len(ids) for ids in dataset["input_ids"]))
    return {"passages": len(dataset), "tokens": n_kept, "budget": budget, "pool_scored": scores.num_rows,
            "max_ppl_selected": float(max(ppl_by_line.values())), "median_ppl_pool": float(np.median(ppl))}
