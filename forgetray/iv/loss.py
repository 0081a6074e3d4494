"""IV-guided training loss (Jiang et al., FvForgetting): cross-entropy plus thresholded distillation terms that keep
the fine-tuned model's outputs near those of the reference model with the instruction vector injected.

    total = ce + w_first * thr(KL_T(first answer token), thr) + w_all * thr(KL_T(all positions), thr)
               + w_mse * sum over top heads of thr(MSE(head), thr_mse)

Conventions, all as in the released trainer (GangweiJiang/FvForgetting, src/tuning/trainer/base.py):
- KL_T (KD_loss, base.py:238-243): F.kl_div(log_softmax(ref / T), softmax(model / T), reduction="batchmean"), that
  is KL(p_model || p_ref) with both softened by T, NOT multiplied by T^2, and the gradient flows through p_model
  (the "target" of kl_div). "batchmean" divides the sum by the first dimension only: for the all-positions term the
  KL is summed over every position (padding and prompt included) and divided by the batch size.
- Thresholds (base.py:155, :158, :176): a term counts only above its threshold as x * [x > thr] (not
  max(0, x - thr)): below it the term and its gradient are 0, above it the whole x counts.
- MSE (base.py:173-176, pr_loss_type "ind"): per head, F.mse_loss of its o_proj-input slice at the last prompt token
  against the reference's, thresholded head by head, then summed over heads. The released trainer takes the reference
  heads from the adapters-disabled model WITHOUT the vector (base.py:134-141), the reference logits WITH it
  (base.py:121-130).
Defaults: w_first 20, w_all 0.1, w_mse 1.0 (scripts/train/seq0_fvg.sh alpha1-3), T = 2 (base.py:153), thr 0.1,
thr_mse 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class IVLossWeights:
    w_first: float = 20.0
    w_all: float = 0.1
    temperature: float = 2.0
    thr: float = 0.1
    w_mse: float = 1.0  # 0 switches the head term off
    thr_mse: float = 0.01
    thr_all: float | None = None  # the all-positions KL's own threshold; None: `thr`, as the released trainer

    def __post_init__(self):
        for name in ("w_first", "w_all", "thr", "w_mse", "thr_mse") + (("thr_all",) if self.thr_all is not None
                                                                       else ()):
            if not getattr(self, name) >= 0:  # also rejects NaN
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")


def kl_t(model_logits: Tensor, ref_logits: Tensor, temperature: float = 2.0) -> Tensor:
    """KL(softmax(model / T) || softmax(ref / T)) summed over all but the first dimension, divided by its size."""
    dtype = torch.promote_types(model_logits.dtype, torch.float32)  # bf16 logits: the softmax in float32
    log_p_model = F.log_softmax(model_logits.to(dtype) / temperature, dim=-1)
    log_p_ref = F.log_softmax(ref_logits.to(dtype) / temperature, dim=-1)
    # kl_div(input=log p_ref, target=p_model) in log space: the same value, without log(0) for underflowing probs
    return F.kl_div(log_p_ref, log_p_model, reduction="batchmean", log_target=True)


def above(x: Tensor, threshold: float) -> Tensor:
    """x where x > threshold, else 0 (value and gradient)."""
    return torch.where(x > threshold, x, torch.zeros_like(x))


def iv_guided_loss(ce: Tensor, logits: Tensor, ref_logits: Tensor, positions: Tensor,
                   weights: IVLossWeights = IVLossWeights(), heads: Tensor | None = None,
                   ref_heads: Tensor | None = None) -> dict[str, Tensor]:
    """The total and each term (raw and as counted), for logging.

    logits, ref_logits: (B, S, V); positions: (B,) the last prompt token (its logits predict the first answer
    token; `last_prompt_positions`); heads, ref_heads: (B, k, head_dim) the top heads' slices at those positions
    (needed when w_mse > 0). Returns loss, ce, kl_first, kl_all, mse (raw) and kl_first_term, kl_all_term, mse_term
    (weighted, after the thresholds).
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and reference logits {tuple(ref_logits.shape)} differ")
    ref_logits = ref_logits.detach()
    rows = torch.arange(logits.shape[0], device=logits.device)
    pos = positions.to(logits.device)
    kl_first = kl_t(logits[rows, pos], ref_logits[rows, pos], weights.temperature)
    kl_all = kl_t(logits, ref_logits, weights.temperature)
    out = {"ce": ce, "kl_first": kl_first, "kl_all": kl_all,
           "kl_first_term": weights.w_first * above(kl_first, weights.thr),
           "kl_all_term": weights.w_all * above(kl_all, weights.thr if weights.thr_all is None
                                                else weights.thr_all)}
    if weights.w_mse > 0:
        if heads is None or ref_heads is None:
            raise ValueError("w_mse > 0 needs heads and ref_heads")
        if heads.shape != ref_heads.shape:
            raise ValueError(f"heads {tuple(heads.shape)} and reference heads {tuple(ref_heads.shape)} differ")
        diff = heads - ref_heads.detach()
        per_head = (diff.to(torch.promote_types(diff.dtype, torch.float32)) ** 2).mean(dim=(0, 2))  # mse per head
        out["mse"] = per_head.sum()
        out["mse_term"] = weights.w_mse * above(per_head, weights.thr_mse).sum()
    else:
        out["mse"] = out["mse_term"] = torch.zeros((), device=logits.device)
    out["loss"] = ce + out["kl_first_term"] + out["kl_all_term"] + out["mse_term"]
    return out
