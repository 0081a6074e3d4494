"""The DeepSpeed config of a phase, derived from its batching and the trial's distribution settings (recorded in
full as MLflow params)."""

from __future__ import annotations

from forgetray.plan import Phase


def deepspeed_config(phase: Phase, zero_stage: int, precision: str) -> dict:
    """The dict passed to `deepspeed.initialize`. The optimizer (torch AdamW) and the lr schedule are created by
    forgetray and handed to DeepSpeed, so the same code runs on its CPU and CUDA accelerators."""
    batching = phase.batching
    zero: dict = {"stage": zero_stage}
    if zero_stage == 3:
        # Gather full weights when saving, so every checkpoint has a plain HF model next to the ZeRO shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": batching.batch_size,
        "train_micro_batch_size_per_gpu": batching.micro_batch,
        "gradient_accumulation_steps": batching.grad_accum,
        "gradient_clipping": phase.optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,  # forgetray reports progress itself
        "wall_clock_breakdown": False,
    }
