"""Sharpness-aware minimization (docs/methods.md §5), the maths only: the weight perturbation from a gradient.

SAM (Foret et al. 2021) takes the gradient g at w, moves to w + e with

    e = rho * g / ||g||_2                              (SAM)
    e = rho * w^2 * g / ||w * g||_2                    (adaptive SAM, ASAM: Kwon et al. 2021, T_w = |w|)

and lets the base optimizer step from w with the gradient taken at w + e. The norm is over *all* parameters: the
caller passes the full, rank-averaged gradient (`forgetray.train.sam_step` all-reduces it first), so the radius is
rho however many ranks there are (the CF code's per-shard norm makes it rho * sqrt(world_size)).
"""

from __future__ import annotations

from typing import Sequence

import torch

EPS = 1e-12  # guards the division when the gradient is exactly zero (then e = 0)


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """||concat(tensors)||_2 in float64 (the sum of squares over millions of entries loses bits in float32)."""
    return torch.sqrt(sum((t.detach().double() ** 2).sum() for t in tensors))


def perturbation(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], rho: float,
                 adaptive: bool = False) -> list[torch.Tensor]:
    """The SAM step e for each parameter (float32 or the parameter's dtype if wider); `grads[i]` is the gradient
    of the loss w.r.t. `params[i]` at the current weights, already averaged over ranks."""
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    if len(params) != len(grads):
        raise ValueError(f"{len(params)} parameters but {len(grads)} gradients")
    dtype = [torch.promote_types(p.dtype, torch.float32) for p in params]
    if adaptive:
        scaled = [p.detach().to(dt).abs() * g.to(dt) for p, g, dt in zip(params, grads, dtype)]  # T_w g
        scale = rho / (global_norm(scaled) + EPS)
        return [(p.detach().to(dt).abs() * s * scale).to(dt) for p, s, dt in zip(params, scaled, dtype)]
    scale = rho / (global_norm(grads) + EPS)
    return [(g.to(dt) * scale).to(dt) for g, dt in zip(grads, dtype)]


def perturbed(w: torch.Tensor, e: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """w + e in `dtype` (w's by default), computed in float32 (or wider) from `w` — the fp32 master or the
    weights themselves — and rounded once: in bf16/fp16 adding e to the weights in place would round e first and the
    sum again. In float32 it is the same value as w + e."""
    dtype = dtype or w.dtype
    wide = torch.promote_types(torch.promote_types(w.dtype, e.dtype), torch.float32)
    return (w.detach().to(wide) + e.to(wide)).to(dtype)
