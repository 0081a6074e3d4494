"""One SAM optimizer step under the DeepSpeed engine (docs/methods.md §5; the maths is `forgetray.methods.sam`).

Per optimizer step (one global batch, possibly several gradient-accumulation micro-batches per rank):

1. the gradient at w over this rank's micro-batches, by plain autograd on the bare module (so none of DeepSpeed's
   gradient hooks fire and its accumulation state is untouched), scaled like DeepSpeed scales it (1 / accumulation
   steps) and averaged over the ranks by an all-reduce: the *global* gradient, identical on every rank;
2. e from that gradient (its global norm); the unperturbed weights are kept (a copy in their own dtype), and the
   weights become w + e computed in float32 and rounded once to their dtype (`methods.sam.perturbed`: in bf16 an
   in-place add would round e to bf16 first and the sum again);
3. the ordinary DeepSpeed forward/backward on every micro-batch at w + e (DeepSpeed reduces the gradients as usual);
4. the weights copied back (exactly, not by subtracting e) before the engine's optimizer step, so the base optimizer
   steps from w with the gradient taken at w + e. If anything fails after step 2, the weights are put back first.

Two forward/backward passes per optimizer step. ZeRO-3 partitions the parameters themselves, so step 2 would need
gathered weights: `TrialConfig` refuses sam_rho > 0 with zero_stage 3.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from forgetray.methods.sam import perturbation, perturbed


def model_loss(model, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def sam_step(engine, micro_batches: Sequence[dict], rho: float, adaptive: bool, world: int,
             loss_of=model_loss) -> list[torch.Tensor]:
    """Run one SAM optimizer step over `micro_batches` (this rank's share of the global batch); returns the
    losses at the perturbed weights (what the optimizer stepped on), one per micro-batch. `loss_of(model, batch)`:
    the phase's loss (`forgetray.train.losses.lm_loss`)."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    grads = _global_gradient(engine.module, params, micro_batches, world, loss_of)
    e = perturbation(params, grads, rho, adaptive)
    del grads
    saved = [p.detach().clone() for p in params]
    restored = False

    def restore() -> None:
        nonlocal restored
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        restored = True

    losses = []
    try:
        with torch.no_grad():
            for p, step in zip(params, e):  # w + e rounded once in the weights' dtype (bf16: from fp32)
                p.copy_(perturbed(p, step))
        del e
        for i, batch in enumerate(micro_batches):
            loss = loss_of(engine, batch)
            engine.backward(loss)
            losses.append(loss.detach().float())
            if i == len(micro_batches) - 1:
                restore()  # before the optimizer step: it must step from w
            engine.step()  # steps the optimizer at the accumulation boundary (the last micro-batch) only
    finally:
        if not restored:
            restore()
    return losses


def _global_gradient(module, params: list[torch.Tensor], micro_batches: Sequence[dict], world: int,
                     loss_of=model_loss):
    """The gradient DeepSpeed would compute for this global batch: mean over micro-batches, mean over ranks."""
    grads = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]
    for batch in micro_batches:
        loss = loss_of(module, batch) / len(micro_batches)
        for g, d in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
            if d is not None:
                g.add_(d)
    if world > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    return grads
