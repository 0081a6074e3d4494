"""LoRA (PEFT) as the fine-tuning option of a phase (`forgetray.plan.Lora`): the model a phase loads is wrapped with
`peft.get_peft_model` before the DeepSpeed engine is built, so only the adapters (A, B per target module) train
and the base weights stay frozen, bit for bit.

Everything downstream of a phase sees the *merged* model W + (alpha / r) * B @ A, under the base model's own
parameter names: the checkpoint's `model/` (what probes, restoration, Wise-FT and users load), Wise-FT's mix, the
weights handed from a prior phase to the next. `merged_state_dict` computes it without touching the training
module (peft's `merge_adapter` + `unmerge_adapter` would add and subtract the delta in place: the base weights
would come back only up to rounding). The checkpoint's `adapter/` holds the adapter alone, in peft's format.

`adapter_disabled(model)` is the reference model without a second copy: inside it the forward pass is the base
model's, exactly (peft routes around the adapters), e.g. for a KL or IV-guided reference during LoRA training.
"""

from __future__ import annotations

import contextlib
import sys

import torch

ADAPTER = "default"  # peft's name of the one adapter a phase trains
ADAPTER_DIR = "adapter"  # in a checkpoint of a LoRA phase: the adapter in peft's format (next to `model/`)


def is_lora(model) -> bool:
    """Whether `model` is a peft-wrapped model (a LoRA phase's training module). Only `wrap` imports peft (~1 CPU-s
    per worker, measured): where it is not loaded, no model is wrapped, and a full fine-tune never loads it."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def wrap(model, lora):
    """`model` with LoRA adapters of `lora` (a `forgetray.plan.Lora`) on its target modules; `model` itself when
    `lora.rank` is 0 (full fine-tuning). Only the adapters require gradients afterwards."""
    if not lora.rank:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.targets), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"lora_targets {list(lora.targets)}: {e}") from None


def _lora_layers(model) -> dict:
    """{base parameter name of the layer's weight: the LoRA layer} of a peft model."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    return {f"{name}.weight": module for name, module in base.named_modules() if isinstance(module, LoraLayer)}


def plain_key(key: str) -> str:
    """A peft base model's parameter name as the plain model names it (`...q_proj.base_layer.weight` ->
    `...q_proj.weight`)."""
    return key.replace(".base_layer.", ".")


def merged_state_dict(model) -> dict:
    """The merged model's state dict under the plain model's keys: every base tensor, plus the adapter's delta
    (peft's `get_delta_weight`: (alpha / r) * B @ A) on the LoRA targets, computed in float32 and cast to the
    weight's dtype. The training module is not modified. A plain model's own state dict if `model` is not peft."""
    if not is_lora(model):
        return dict(model.state_dict())
    layers = _lora_layers(model)
    out = {}
    for key, value in model.get_base_model().state_dict().items():
        if ".lora_" in key:
            continue
        key = plain_key(key)
        if key in layers:
            delta = layers[key].get_delta_weight(ADAPTER).detach().to(torch.float32)
            value = (value.detach().to(torch.float32) + delta.to(value.device)).to(value.dtype)
        out[key] = value
    return out


def base_weights(model) -> dict:
    """A CPU copy of the frozen base weights of a peft model, under the plain model's keys."""
    return {plain_key(k): v.detach().to("cpu", copy=True)
            for k, v in model.get_base_model().state_dict().items() if ".lora_" not in k}


def load_base_weights(model, state: dict) -> None:
    """Copy `state` (plain keys, e.g. a Wise-FT mix) into the base weights of a peft model (the adapters are left
    as they are)."""
    params = {plain_key(k): v for k, v in model.get_base_model().state_dict().items() if ".lora_" not in k}
    missing = sorted(set(params) - set(state))
    if missing:
        raise ValueError(f"state has no tensor for base weight {missing[0]!r}")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key].to(param.device, param.dtype))


def merge_and_unload(model):
    """The plain model a LoRA phase leaves (the adapter merged in; what the next phase loads); `model` if plain."""
    return model.merge_and_unload() if is_lora(model) else model


@contextlib.contextmanager
def adapter_disabled(model):
    """Inside the block, `model` (a peft model, or a DeepSpeed engine around one) computes the base model's forward
    pass exactly: the reference model of LoRA training without a second copy of the weights. No-op for a plain
    model (there is no adapter to disable)."""
    module = getattr(model, "module", model)
    if not is_lora(module):
        yield model
        return
    with module.disable_adapter():
        yield model


def save_adapter(model, out) -> None:
    """The adapter alone, in peft's format (`adapter_config.json`, `adapter_model.safetensors`), at `out`."""
    model.save_pretrained(out, safe_serialization=True)
