"""Validation of the instruction-vector settings (`iv_*`: IV-guided training and the dynamics probe, `iv_probe_*`);
`forgetray.spec` calls `check_iv` with its `need(condition, setting, message)`. Apart from spec.py to keep that file
short. Checked whether or not IV guidance or the probe is on, so a grid fails before any compute."""

from __future__ import annotations

from forgetray.iv.tasks import CORRUPTIONS

IV_SITES = ("layer", "attn")


def check_iv(cfg, need) -> None:
    need(cfg.iv_layer >= 0, "iv_layer", "must be >= 0 (a decoder layer index)")
    need(cfg.iv_heads >= 1, "iv_heads", "must be >= 1")
    need(cfg.iv_site in IV_SITES, "iv_site", f"must be one of {IV_SITES}")
    for name in ("iv_kl_first", "iv_kl_all", "iv_mse", "iv_kl_first_threshold", "iv_kl_all_threshold",
                 "iv_mse_threshold", "iv_degree"):
        need(getattr(cfg, name) >= 0, name, "must be >= 0")
    need(cfg.iv_temperature > 0, "iv_temperature", "must be > 0")
    need(0 <= cfg.iv_progressive_start <= cfg.iv_progressive_end <= 1, "iv_progressive_start",
         f"and iv_progressive_end (= {cfg.iv_progressive_end!r}) need 0 <= start <= end <= 1")
    need(cfg.iv_prompts >= 1, "iv_prompts", "must be >= 1")
    need(cfg.iv_corrupted >= 1, "iv_corrupted", "must be >= 1")
    need(cfg.iv_corruption in CORRUPTIONS, "iv_corruption", f"must be one of {CORRUPTIONS}")
    _check_iv_probe(cfg, need)
    if not cfg.iv_task:
        return
    need(bool(cfg.iv_task.strip()), "iv_task", "must name a task ('' = off)")
    # The reference pass needs full weights on the rank (the frozen copy, or the adapters disabled) and its loss
    # replaces the plain step's: SAM's two-pass step does not take it.
    need(cfg.zero_stage <= 2, "zero_stage", "must be <= 2 with IV-guided training (iv_task): the reference pass "
         "and the injected vector need the full weights on every rank")
    need(cfg.sam_rho == 0, "sam_rho", "must be 0 with IV-guided training (iv_task): a SAM step does not compute the "
         "IV-guided loss")


def _check_iv_probe(cfg, need) -> None:
    need(cfg.iv_probe_layer >= 0, "iv_probe_layer", "must be >= 0 (a decoder layer index)")
    need(cfg.iv_probe_heads >= 1, "iv_probe_heads", "must be >= 1")
    need(cfg.iv_probe_degree >= 0, "iv_probe_degree", "must be >= 0")
    if cfg.iv_probe_other_task:
        need(bool(cfg.iv_probe_other_task.strip()), "iv_probe_other_task", "must name a task ('' = off)")
        need(bool(cfg.iv_probe_task), "iv_probe_other_task", "needs iv_probe_task: its vector is injected into "
             "that task's prompts, as a control for the task's own vector")
        need(cfg.iv_probe_other_task != cfg.iv_probe_task, "iv_probe_other_task", "must differ from iv_probe_task "
             "(a control is another task's vector)")
    if not cfg.iv_probe_task:
        return
    need(bool(cfg.iv_probe_task.strip()), "iv_probe_task", "must name a task ('' = off)")
    # Each rank extracts from its share of the prompts (unequal forward counts) and o_proj is called on its own to
    # make the vector: both need full weights on every rank.
    need(cfg.zero_stage <= 2, "zero_stage", "must be <= 2 with the IV dynamics probe (iv_probe_task): the "
         "extraction needs the full weights on every rank")
