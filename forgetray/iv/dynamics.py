"""Instruction-vector dynamics of a checkpoint against the base (issue 12 item 3; docs/methods.md §8), as pure
computation on a model and tensors:

- `cosine`: the checkpoint's vector against the base's (float64);
- `head_overlap`: |A ∩ B| / k of two top-k head sets;
- `correct`: greedy first-answer-token correctness per prompt, optionally with a vector injected at one layer
  (re-injection of the base vector: a training-free restoration);
- `answer_logprobs`: log P(answer | prompt) per prompt, summed over the answer's tokens (the knowledge probability
  P(y|x) on the bare query, the instruction probability P(y_c|c,x) on the instruction + demonstrations + query).

A batch is a mapping as in `forgetray.iv.vector` (input_ids, attention_mask, positions = the last prompt token,
answer_ids = the first answer token); `answer_logprobs` takes batches of whole sequences (prompt then answer) with
`answer_start` (B,) (the answer's first index) and `answer_len` (B,).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from forgetray.iv.vector import answered_correctly, batch_positions, inject_vector

Batch = Mapping[str, Tensor]


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two vectors in float64 (0 if either is zero)."""
    a, b = a.double().flatten(), b.double().flatten()
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator else 0.0


def head_overlap(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """|A ∩ B| / k for two top-k head lists of (layer, head) (k = len(a); the lists must be equally long)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"head sets must be non-empty and of one size, got {len(a)} and {len(b)}")
    return len({tuple(h) for h in a} & {tuple(h) for h in b}) / len(a)


def random_like(vector: Tensor, count: int, seed: int) -> list[Tensor]:
    """`count` random directions (seeded Gaussian) scaled to `vector`'s norm: the control an instruction vector must
    beat (a vector that does no better than these carries nothing of the task)."""
    generator = torch.Generator().manual_seed(seed)
    draws = [torch.randn(vector.shape, generator=generator, dtype=torch.float64) for _ in range(count)]
    norm = vector.double().norm()
    return [(d / d.norm() * norm).to(vector.dtype).to(vector.device) for d in draws]


@torch.no_grad()
def correct(model: nn.Module, batches: Iterable[Batch], vector: Tensor | None = None, layer: int = 0,
            degree: float = 1.0, site: str = "layer") -> Tensor:
    """(N,) bool over the batches' rows: the greedy next token at the last prompt token is the first answer token;
    with `vector`, degree x vector is added at `layer` at that same position (`inject_vector`)."""
    out = []
    for batch in batches:
        injected = inject_vector(model, vector, layer, batch_positions(batch), degree, site) \
            if vector is not None else contextlib.nullcontext()
        with injected:
            out.append(answered_correctly(model, batch))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


@torch.no_grad()
def answer_logprobs(model: nn.Module, batches: Iterable[Batch]) -> Tensor:
    """(N,) float64: log P(answer | prompt) per row, the sum over the answer's tokens of the log-softmax at the
    position before each (teacher-forced)."""
    out = []
    for batch in batches:
        ids = batch["input_ids"]
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        for row in range(ids.shape[0]):
            start, length = int(batch["answer_start"][row]), int(batch["answer_len"][row])
            if start < 1 or length < 1:
                raise ValueError(f"row {row}: an answer needs a prompt before it and a token (start {start}, "
                                 f"length {length})")
            targets = ids[row, start:start + length].to(logp.device)
            out.append(logp[row, start - 1:start - 1 + length].gather(-1, targets[:, None]).sum().double().cpu())
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)
