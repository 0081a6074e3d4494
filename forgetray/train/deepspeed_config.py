"""The DeepSpeed config of a trial, derived from its TrialConfig (recorded in full as MLflow params)."""

from __future__ import annotations

from forgetray.spec import TrialConfig

GRAD_CLIP = 1.0  # the Hugging Face Trainer's default max_grad_norm; the papers do not state one


def deepspeed_config(trial: TrialConfig) -> dict:
    """The dict passed to `deepspeed.initialize`. The optimizer (torch AdamW) and the lr schedule are created by
    forgetray and handed to DeepSpeed, so the same code runs on its CPU and CUDA accelerators."""
    zero: dict = {"stage": trial.zero_stage}
    if trial.zero_stage == 3:
        # Gather full weights when saving, so every checkpoint has a plain HF model next to the ZeRO shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": trial.batch_size,
        "train_micro_batch_size_per_gpu": trial.micro_batch,
        "gradient_accumulation_steps": trial.grad_accum,
        "gradient_clipping": GRAD_CLIP,
        "zero_optimization": zero,
        "bf16": {"enabled": trial.precision == "bf16"},
        "fp16": {"enabled": trial.precision == "fp16"},
        "steps_per_print": 10**9,  # forgetray reports progress itself
        "wall_clock_breakdown": False,
    }


def optimizer_settings(trial: TrialConfig) -> dict:
    """What the client optimizer and schedule are (METHODS.md §1/§5: AdamW(0.9, 0.999, eps 1e-8))."""
    return {
        "type": "AdamW",
        "lr": trial.lr,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": trial.weight_decay,
        "schedule": trial.lr_schedule,
        "warmup_ratio": trial.warmup_ratio,
    }
