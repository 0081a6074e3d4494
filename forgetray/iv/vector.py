"""Instruction (function) vectors: mean head activations, causal indirect effects, top heads, the vector, injection.

Following Todd et al., "Function vectors in large language models" (ericwtodd/function_vectors) as used by Jiang et
al. for instruction vectors (GangweiJiang/FvForgetting):
- mean activations: per head, the o_proj-input slice at the last prompt token, averaged over clean prompts (rows a
  batch marks `keep`, e.g. `answered_correctly`);
- CIE of head (l, h): on corrupted prompts, P(first answer token) with that head's slice at the last token replaced
  by its clean mean, minus P(first answer token) unpatched; averaged over prompts (function_vectors
  src/compute_indirect_effect.py:14-90, activation_replacement_per_class_intervention);
- the vector: sum over the top-k heads of o_proj(x_h), x_h zero but for head h's slice = its mean (function_vectors
  src/utils/extract_utils.py:305-363, compute_function_vector). Bias: we take o_proj(x_h) - o_proj(0), the head's linear
  contribution only, so an o_proj bias is added neither k times nor once: every forward adds it anyway, whatever
  the heads carry. (Todd's code calls out_proj(x) per head, which adds a bias k times; Llama's o_proj has none.)

A batch is a mapping with input_ids and attention_mask (B, S), and optionally positions (B,) (default: the last
attended token), answer_ids (B,) (the first answer token; needed for CIE and correctness) and keep (B,) bool.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from forgetray.iv.heads import (Head, decoder_layers, head_layout, last_token_positions, o_projs, patch_heads,
                                record_heads)

Batch = Mapping[str, Tensor]


def batch_positions(batch: Batch) -> Tensor:
    positions = batch.get("positions")
    return last_token_positions(batch["attention_mask"]) if positions is None else positions


def _logits(model: nn.Module, batch: Batch) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def answer_probs(logits: Tensor, positions: Tensor, answer_ids: Tensor) -> Tensor:
    """P(answer_ids[b]) under the softmax of logits at (b, positions[b]), in float32 or wider."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    at = logits[rows, positions.to(logits.device)]
    probs = torch.softmax(at.to(torch.promote_types(at.dtype, torch.float32)), dim=-1)
    return probs[rows, answer_ids.to(logits.device)]


@torch.no_grad()
def answered_correctly(model: nn.Module, batch: Batch) -> Tensor:
    """Rows whose greedy next token at the position is the first answer token: the "clean" prompts."""
    logits = _logits(model, batch)
    rows = torch.arange(logits.shape[0], device=logits.device)
    predicted = logits[rows, batch_positions(batch).to(logits.device)].argmax(dim=-1)
    return (predicted == batch["answer_ids"].to(predicted.device)).cpu()


@torch.no_grad()
def mean_head_activations(model: nn.Module, batches: Iterable[Batch]) -> Tensor:
    """(n_layers, n_heads, head_dim): every head's o_proj-input slice at the position, averaged over kept rows."""
    total, count = None, 0
    for batch in batches:
        positions = batch_positions(batch)
        with record_heads(model, positions) as record:
            _logits(model, batch)
        acts = record.all()  # (B, L, H, D)
        keep = batch.get("keep")
        if keep is not None:
            acts = acts[keep.to(acts.device).bool()]
        acts = acts.to(torch.promote_types(acts.dtype, torch.float32))
        total = acts.sum(dim=0) if total is None else total + acts.sum(dim=0)
        count += acts.shape[0]
    if not count:
        raise ValueError("no clean prompts: every batch was empty or had no kept row")
    return total / count


@torch.no_grad()
def causal_indirect_effect(model: nn.Module, batches: Iterable[Batch], mean_activations: Tensor,
                           layers: Sequence[int] | None = None) -> Tensor:
    """(n_layers, n_heads) mean CIE over the corrupted prompts of `batches` (layers not listed stay 0).

    One forward per head per batch: the cost is n_layers x n_heads forwards of the corrupted set."""
    layout = head_layout(model)
    layers = range(layout.n_layers) if layers is None else layers
    total = torch.zeros(layout.n_layers, layout.n_heads, dtype=torch.float64)
    count = 0
    for batch in batches:
        positions, answers = batch_positions(batch), batch["answer_ids"]
        corrupted = answer_probs(_logits(model, batch), positions, answers)
        for layer in layers:
            for head in range(layout.n_heads):
                with patch_heads(model, {(layer, head): mean_activations[layer, head]}, positions):
                    patched = answer_probs(_logits(model, batch), positions, answers)
                total[layer, head] += (patched - corrupted).sum().double().cpu()
        count += positions.shape[0]
    if not count:
        raise ValueError("no corrupted prompts")
    return total / count


def top_heads(cie: Tensor, k: int = 10) -> list[tuple[int, int, float]]:
    """The k heads of highest mean CIE as (layer, head, score), best first; ties keep (layer, head) order."""
    if not 1 <= k <= cie.numel():
        raise ValueError(f"k must be in [1, {cie.numel()}], got {k}")
    order = torch.sort(cie.flatten(), descending=True, stable=True).indices[:k]
    n_heads = cie.shape[1]
    return [(int(i) // n_heads, int(i) % n_heads, float(cie.flatten()[i])) for i in order]


@torch.no_grad()
def instruction_vector(model: nn.Module, mean_activations: Tensor, heads: Iterable[Head | tuple[int, int, float]]
                       ) -> Tensor:
    """(hidden,) sum over heads of o_proj's linear contribution from that head's mean slice (bias excluded)."""
    layout = head_layout(model)
    projs = o_projs(model)
    vector = None
    for layer, head, *_ in heads:
        proj = projs[layer]
        param = next(proj.parameters())
        x = torch.zeros(2, layout.n_heads, layout.head_dim, dtype=param.dtype, device=param.device)
        x[0, head] = mean_activations[layer, head].to(param.dtype)
        out = proj(x.reshape(2, -1))
        contribution = out[0] - out[1]  # o_proj(x_h) - o_proj(0): drops any bias
        vector = contribution if vector is None else vector + contribution
    if vector is None:
        raise ValueError("no heads given")
    return vector


@contextmanager
def inject_vector(model: nn.Module, vector: Tensor, layer: int, positions: Tensor, degree: float = 1.0,
                  site: str = "layer") -> Iterator[None]:
    """Add degree * vector to the residual stream at one position per sequence, in forwards inside the block.

    site="layer": to the hidden-state output of decoder layer `layer` (Todd et al.; function_vectors
    src/utils/intervention_utils.py:98, add_function_vector on the layer outputs). site="attn": to the output of that
    layer's o_proj, i.e. the residual stream after attention, before the MLP (what FvForgetting's trainer hooks:
    src/tuning/trainer/base.py:98, :128 and :781-807). A forward shorter than the positions (a cached decoding step) is
    left alone. The addition is out of place, so autograd through the model is unaffected.
    """
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} outside the model's {len(layers)} layers")
    if site not in ("layer", "attn"):
        raise ValueError(f"site must be 'layer' or 'attn', got {site!r}")
    module = layers[layer] if site == "layer" else layers[layer].self_attn.o_proj

    def add(hidden: Tensor) -> Tensor:
        pos = positions.to(hidden.device)
        if hidden.shape[1] <= int(pos.max()):
            return hidden
        delta = torch.zeros_like(hidden)
        delta[torch.arange(hidden.shape[0], device=hidden.device), pos] = (degree * vector).to(hidden.dtype)
        return hidden + delta

    def hook(module, args, output):
        if isinstance(output, tuple):  # older transformers return (hidden, ...) from a decoder layer
            return (add(output[0]),) + tuple(output[1:])
        return add(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
