"""Knowledge and perplexity metrics (docs/methods.md §3) as pure functions: no model, no I/O.

Two kinds of input:
- functions of the model's distribution at the first answer position take logits or option probabilities as torch
  tensors (any leading shape, options/vocabulary on the last axis) and return float64 tensors;
- functions of scores take array-likes and return numpy arrays or Python floats.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def letter_probabilities(logits: torch.Tensor, letter_token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Probability of each option letter at the answer position: [..., V] logits -> [..., K] probabilities.

    Option k's probability is the sum of the full-vocabulary softmax probabilities of all its token variants
    (" A" and "A" are merged), so the letters' probabilities stay comparable with the rest of the vocabulary.
    """
    probs = torch.softmax(torch.as_tensor(logits).double(), dim=-1)
    columns = [probs[..., list(ids)].sum(dim=-1) for ids in letter_token_ids]
    return torch.stack(columns, dim=-1)


def format_probability(option_probs: torch.Tensor) -> torch.Tensor:
    """P_fmt: the probability mass the model puts on any option letter (all variants), [..., K] -> [...]."""
    return torch.as_tensor(option_probs).double().sum(dim=-1)


def entropy_vocab(logits: torch.Tensor) -> torch.Tensor:
    """H_V in nats of the softmax over the whole vocabulary, [..., V] -> [...]."""
    log_p = torch.log_softmax(torch.as_tensor(logits).double(), dim=-1)
    p = log_p.exp()
    # A token with probability 0 (logit -inf) contributes 0, not 0 * -inf = nan.
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=-1)


def entropy_options(option_probs: torch.Tensor) -> torch.Tensor:
    """H_opt in nats over the K options after renormalising their probabilities to sum to 1, [..., K] -> [...]."""
    p = torch.as_tensor(option_probs).double()
    q = p / p.sum(dim=-1, keepdim=True)
    return -torch.special.xlogy(q, q).sum(dim=-1)


def token_logprobs(logits: torch.Tensor, targets) -> torch.Tensor:
    """Log-probability of each target token under the logits that predict it: [T, V] and [T] -> [T] float64.

    The log-softmax runs in float32 (enough for one token, half the memory of float64 over a large vocabulary);
    the result is float64 so that sums over many tokens do not lose precision.
    """
    logits = torch.as_tensor(logits)
    targets = torch.as_tensor(targets, dtype=torch.long, device=logits.device)
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return log_p.gather(-1, targets[:, None])[:, 0].double()


def option_likelihood_predictions(logprob_sums, char_lengths) -> tuple[np.ndarray, np.ndarray]:
    """lm-eval's `acc` and `acc_norm` predictions from per-option scores, both [N, K] -> ([N], [N]) option indices.

    `acc` picks the option with the highest summed token log-probability; `acc_norm` divides each sum by the
    option's length in characters first. Ties go to the first option (numpy argmax, as lm-eval). Questions with
    fewer options can be padded with a log-probability of -inf (and any positive length).
    """
    scores = np.asarray(logprob_sums, dtype=np.float64)
    lengths = np.asarray(char_lengths, dtype=np.float64)
    if scores.shape != lengths.shape or scores.ndim != 2:
        raise ValueError(f"logprob_sums {scores.shape} and char_lengths {lengths.shape} must be the same [N, K] shape")
    if np.any(lengths <= 0):
        raise ValueError("char_lengths must be positive (acc_norm divides by them)")
    return scores.argmax(axis=1), (scores / lengths).argmax(axis=1)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """Corpus-level perplexity exp(sum NLL / number of scored tokens); inf when that overflows."""
    if n_tokens <= 0:
        raise ValueError(f"perplexity needs at least one scored token, got n_tokens={n_tokens}")
    try:
        return math.exp(float(nll_sum) / n_tokens)
    except OverflowError:  # a diverged model should give an infinite perplexity, not crash a sweep
        return math.inf


def accuracy(correct) -> float:
    """Micro accuracy: the fraction of True in a boolean array (nan when it is empty)."""
    values = np.asarray(correct, dtype=bool)
    return float(values.mean()) if values.size else math.nan
