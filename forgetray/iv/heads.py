"""Per-head attention activations of Llama-like models: where they are, how to read them and how to overwrite them.

A head's activation is its slice of the input of `self_attn.o_proj` (Todd et al.'s "head output" before the output
projection): o_proj's input at one token is n_heads slices of head_dim, concatenated in head order. Hooks are plain
torch hooks on o_proj (pre-hooks) and on decoder layers (forward hooks), so they also see a LoRA-wrapped o_proj.

Positions are one token index per sequence (B,), e.g. the last prompt token: `last_token_positions` reads it from an
attention mask (left or right padding), `last_prompt_positions` from training labels (-100 on the prompt).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

Head = tuple[int, int]  # (layer, head)


@dataclass(frozen=True)
class HeadLayout:
    n_layers: int
    n_heads: int
    head_dim: int


def decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    """model.model.layers of a Llama-like causal LM (a PEFT wrapper is looked through via get_base_model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    ok = layers is not None and len(layers) > 0
    if not ok or not all(hasattr(getattr(layer, "self_attn", None), "o_proj") for layer in layers):
        raise ValueError(f"{type(base).__name__} is not a supported architecture: instruction vectors need a "
                         "Llama-like model with model.model.layers[i].self_attn.o_proj")
    return layers


def o_projs(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn.o_proj for layer in decoder_layers(model)]


def head_layout(model: nn.Module) -> HeadLayout:
    """Layers, heads and head_dim, from the config; checked against o_proj's input width."""
    layers = decoder_layers(model)  # first: an unsupported model fails here, with its name
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    n_heads = getattr(config, "num_attention_heads", None)
    if not n_heads:
        raise ValueError(f"{type(base).__name__}: config has no num_attention_heads")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    proj = layers[0].self_attn.o_proj
    weight = proj.base_layer.weight if hasattr(proj, "base_layer") else proj.weight  # LoRA wraps the Linear
    if weight.shape[1] != n_heads * head_dim:
        raise ValueError(f"{type(base).__name__}: o_proj takes {weight.shape[1]} inputs, not num_attention_heads x "
                         f"head_dim = {n_heads} x {head_dim}")
    return HeadLayout(len(layers), n_heads, head_dim)


def last_token_positions(attention_mask: Tensor) -> Tensor:
    """Index of each row's last attended token: works for left and right padding alike."""
    mask = attention_mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("a row of the attention mask is all padding")
    index = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, index, -1).max(dim=1).values


def last_prompt_positions(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """The token before each row's first answer label (labels aligned with input_ids, the prompt set to
    ignore_index, as Hugging Face causal LMs take them): its logits predict the first answer token.
    FvForgetting src/tuning/trainer/base.py:112 takes the same index."""
    answer = labels != ignore_index
    if not answer.any(dim=1).all():
        raise ValueError("a row of labels has no answer token")
    first = answer.int().argmax(dim=1)
    if (first == 0).any():
        raise ValueError("a row's answer starts at position 0: there is no prompt token before it")
    return first - 1


def _rows(positions: Tensor) -> Tensor:
    return torch.arange(positions.shape[0], device=positions.device)


@contextmanager
def record_heads(model: nn.Module, positions: Tensor, heads: Sequence[Head] | None = None) -> Iterator["HeadRecord"]:
    """Record o_proj inputs at one position per sequence during the forward passes inside the block.

    heads=None records every head (record.all() -> (B, n_layers, n_heads, head_dim)); otherwise only the listed
    heads (record.stack() -> (B, k, head_dim), in the listed order). Autograd is kept, so the same record serves the
    training-time MSE term; wrap in torch.no_grad() for measurement. The last forward inside the block wins.
    """
    layout = head_layout(model)
    record = HeadRecord(layout, heads)
    handles = []
    for layer, proj in enumerate(o_projs(model)):
        if heads is not None and layer not in {l for l, _ in heads}:
            continue

        def hook(module, args, layer=layer):
            x = args[0]
            pos = positions.to(x.device)
            record.inputs[layer] = x[_rows(pos), pos].reshape(x.shape[0], layout.n_heads, layout.head_dim)

        handles.append(proj.register_forward_pre_hook(hook))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


class HeadRecord:
    def __init__(self, layout: HeadLayout, heads: Sequence[Head] | None):
        self.layout, self.heads, self.inputs = layout, heads, {}

    def all(self) -> Tensor:
        missing = [l for l in range(self.layout.n_layers) if l not in self.inputs]
        if missing:
            raise RuntimeError(f"no forward pass reached layers {missing}")
        return torch.stack([self.inputs[l] for l in range(self.layout.n_layers)], dim=1)

    def stack(self) -> Tensor:
        if self.heads is None:
            raise RuntimeError("stack() is for a record of listed heads; use all()")
        return torch.stack([self.inputs[l][:, h] for l, h in self.heads], dim=1)


@contextmanager
def patch_heads(model: nn.Module, values: dict[Head, Tensor], positions: Tensor) -> Iterator[None]:
    """Replace heads' o_proj-input slices at one position per sequence with given values (head_dim each, the same
    for every sequence), in the forward passes inside the block; everything else is computed as usual."""
    layout = head_layout(model)
    by_layer: dict[int, list[tuple[int, Tensor]]] = {}
    for (layer, head), value in values.items():
        if not (0 <= layer < layout.n_layers and 0 <= head < layout.n_heads):
            raise ValueError(f"head ({layer}, {head}) outside {layout.n_layers} layers x {layout.n_heads} heads")
        by_layer.setdefault(layer, []).append((head, value))
    handles = []
    projs = o_projs(model)
    for layer, items in by_layer.items():

        def hook(module, args, items=items):
            x = args[0]
            pos = positions.to(x.device)
            rows = _rows(pos)
            # out of place: the caller's tensor and autograd history stay intact
            patched = x.reshape(*x.shape[:-1], layout.n_heads, layout.head_dim).clone()
            for head, value in items:
                patched[rows, pos, head] = value.to(x.dtype).to(x.device)
            return (patched.reshape(x.shape),) + tuple(args[1:])

        handles.append(projs[layer].register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
