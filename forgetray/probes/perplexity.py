"""Probing-set perplexity (docs/methods.md §3) and the per-passage NLLs it sums, which restoring-pool ranking also uses.

A passage is [BOS] + its tokens, cut to max_length tokens in all; every token after the first is scored (BOS has no
prediction; without BOS the first token has none).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from forgetray import metrics
from forgetray.probes.options import ProbeOptions, with_fields
from forgetray.probes.shards import shard_indices
from forgetray.probes.tokens import bos_prefix, encode, forward, padding_id

# Log-softmax over at most this many logits at once: vectorised over rows (per-row Python calls dominated small
# models), bounded in memory for large vocabularies and long passages.
_LOGITS_PER_CHUNK = 2**26


@torch.no_grad()
def probe_perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    options: ProbeOptions = ProbeOptions(),
    **fields: Any,
) -> tuple[float, int]:
    """Summed NLL (float64) and number of scored tokens over this rank's share (`options.shard`) of `texts`.
    `fields`: the keyword form of `options` (`probes.options`).

    Sum both over ranks, then `metrics.perplexity`.
    """
    options = with_fields(options, fields, "probe_perplexity")
    texts = list(texts)
    indices, n_real = shard_indices(len(texts), options.shard)
    scored = passage_nlls(model, tokenizer, [texts[i] for i in indices], options)[:n_real]  # less the padding copies
    return float(sum(nll for nll, _ in scored)), int(sum(n for _, n in scored))


def passage_sequences(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """The token ids the perplexity probe runs for each passage: [BOS] + tokens, cut to max_length."""
    bos = bos_prefix(tokenizer)
    return [(bos + ids)[:max_length] for ids in encode(tokenizer, list(texts))]


def passage_nlls(
    model,
    tokenizer,
    texts: Sequence[str],
    options: ProbeOptions = ProbeOptions(),
    **fields: Any,
) -> list[tuple[float, int]]:
    """(summed NLL, scored tokens) of each passage, in order (all of `texts`: `options.shard` is not applied). What
    probing perplexity sums and what restoring-pool ranking sorts by. `fields`: the keyword form of `options`."""
    options = with_fields(options, fields, "passage_nlls")
    batch_size = options.batch_size
    pad_id = padding_id(tokenizer)
    seqs = passage_sequences(tokenizer, texts, options.max_length)
    out: list[tuple[float, int]] = []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start : start + batch_size]
        # An empty passage (no BOS, no text) still takes its slot, as a pad token, so batch counts stay equal.
        logits = forward(model, [seq or [pad_id] for seq in batch], pad_id, options.device)
        out.extend(sequence_nlls(logits, batch, pad_id))
    return out


def sequence_nlls(logits: torch.Tensor, seqs: list[list[int]], pad_id: int) -> list[tuple[float, int]]:
    """(summed NLL, scored tokens) per right-padded sequence: every token after the first is scored."""
    rows, width, vocab = logits.shape
    targets = torch.full((rows, max(width - 1, 1)), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, max(width - 1, 1)), dtype=torch.float64)
    for row, seq in enumerate(seqs):
        if len(seq) >= 2:
            targets[row, : len(seq) - 1] = torch.tensor(seq[1:], dtype=torch.long)
            mask[row, : len(seq) - 1] = 1.0
    if width < 2:
        return [(0.0, 0)] * rows
    nll = torch.zeros(rows, dtype=torch.float64)
    step = max(1, _LOGITS_PER_CHUNK // ((width - 1) * vocab))
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        logp = metrics.token_logprobs(logits[lo:hi, :-1].reshape(-1, vocab), targets[lo:hi].reshape(-1))
        nll[lo:hi] = -(logp.view(hi - lo, width - 1).cpu() * mask[lo:hi]).sum(1)
    return [(float(nll[row]), max(len(seq) - 1, 0)) for row, seq in enumerate(seqs)]
