"""Near ties of a half-precision model's multiple-choice scores, scored again in fp32 (`ProbeOptions.fp32_ties`).

A bf16 forward rounds every activation, so a continuation's log-likelihood is off by up to ~0.05-0.1 nats against the
same weights in fp32 (bench/README.md "bench_eval.py": 1B Llama on an H100, 0.11 at most). Only a prompt whose best
two continuations lie closer than that can change its prediction; such a prompt is scored again with the weights
upcast to fp32. The upcast is exact (every bf16 value is an fp32 value), so a re-scored prompt gets the fp32
prediction of these very weights, and the other prompts keep the bf16 one, which fp32 could not flip as long as the
rounding stays below the margin. The cost follows the model's indecision: a few percent of prompts for a model that
knows its answers.

The weights are swapped in place (`param.data`) and the very same tensors put back afterwards, so a DeepSpeed
ZeRO-0/1/2 engine's flat buffers, which its parameters view, stay intact; ZeRO-3 partitions the parameters across
ranks, so there this rule is refused.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch

HALF = (torch.bfloat16, torch.float16)


def is_half(model) -> bool:
    """Whether any floating-point parameter of the model is bf16 or fp16."""
    return any(p.dtype in HALF for p in model.parameters())


def near_ties(logprobs: Sequence[Sequence[float]], margin: float) -> list[int]:
    """Indices of the prompts whose best and second-best continuation differ by less than `margin` (nats)."""
    out = []
    for i, scores in enumerate(logprobs):
        if len(scores) > 1:
            best, second = sorted(scores, reverse=True)[:2]
            if best - second < margin:
                out.append(i)
    return out


@contextmanager
def full_precision(model):
    """Within: `model` computes as `model.float()` would (every bf16/fp16 parameter and buffer, e.g. rotary
    frequencies, holds an fp32 copy of its values); after: the original tensors, untouched."""
    params = [p for p in model.parameters() if p.dtype in HALF]
    if any(hasattr(p, "ds_id") for p in params):
        raise ValueError("fp32_ties cannot upcast a ZeRO-3 model (its parameters are partitioned across ranks); "
                         "use fp32_ties=0 or ZeRO stage <= 2")
    buffers = [(module, name, buf) for module in model.modules() for name, buf in module._buffers.items()
               if buf is not None and buf.dtype in HALF]
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.data.float()
        for module, name, buf in buffers:
            module._buffers[name] = buf.float()
        yield
    finally:
        for p, data in zip(params, saved):
            p.data = data
        for module, name, buf in buffers:
            module._buffers[name] = buf
