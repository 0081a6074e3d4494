"""Exact memorization (Tirumala et al. 2022; docs/methods.md §3) as pure torch functions: no model, no I/O.

Teacher-forced on a causal LM: the logits at position t-1 predict the token at t, so label t counts as memorized
when argmax(logits[:, t-1]) == labels[:, t]. Positions whose label is the ignore index (-100: prompt, padding) are
not counted; neither is position 0, which nothing predicts (as in Hugging Face's shifted loss). Batches are
reduced to counts, so a dataset's EM is em_ratio of the summed counts, not a mean of per-batch ratios.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100


def exact_memorization(
    logits_or_predictions: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[int, int]:
    """(memorized positions, scored positions) for one batch.

    Takes logits [B, L, V] or already-argmaxed integer predictions [B, L] (the argmax needs the whole vocabulary,
    so a caller may reduce on the device first), and labels [B, L] with `ignore_index` on unscored positions.
    """
    labels = torch.as_tensor(labels)
    scores = torch.as_tensor(logits_or_predictions)
    if scores.dim() == 3:
        predictions = scores.argmax(dim=-1)
    elif scores.dim() == 2:
        if scores.is_floating_point() or scores.is_complex():
            raise ValueError("two-dimensional input must be integer token predictions; pass logits as [B, L, V]")
        predictions = scores
    else:
        raise ValueError(f"expected logits [B, L, V] or predictions [B, L], got shape {tuple(scores.shape)}")
    if labels.dim() != 2 or predictions.shape != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must be [B, L] matching predictions {tuple(predictions.shape)}")
    predicted = predictions[:, :-1]
    targets = labels[:, 1:].to(predictions.device)
    scored = targets != ignore_index
    memorized = scored & (predicted == targets)
    return int(memorized.sum().item()), int(scored.sum().item())


def em_ratio(n_memorized: int, n_positions: int) -> float:
    """EM: the fraction of scored positions that are memorized (nan when nothing was scored)."""
    if not 0 <= n_memorized <= n_positions:
        raise ValueError(f"need 0 <= n_memorized <= n_positions, got {n_memorized} and {n_positions}")
    return n_memorized / n_positions if n_positions else math.nan
