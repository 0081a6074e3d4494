"""Validation of the instruction-vector dynamics probe's settings (`iv_probe_*`; `forgetray.spec` calls it with its
`need(condition, setting, message)`). Apart from spec.py to keep that file short; imports nothing of forgetray."""

from __future__ import annotations


def check_iv_probe(cfg, need) -> None:
    """Checked whether or not the probe is on, so a grid fails before any compute."""
    need(cfg.iv_probe_layer >= 0, "iv_probe_layer", "must be >= 0 (a decoder layer index)")
    need(cfg.iv_probe_heads >= 1, "iv_probe_heads", "must be >= 1")
    need(cfg.iv_probe_degree >= 0, "iv_probe_degree", "must be >= 0")
    if not cfg.iv_probe_task:
        return
    need(bool(cfg.iv_probe_task.strip()), "iv_probe_task", "must name a task ('' = off)")
    # Each rank extracts from its share of the prompts (unequal forward counts) and o_proj is called on its own to
    # make the vector: both need full weights on every rank.
    need(cfg.zero_stage <= 2, "zero_stage", "must be <= 2 with the IV dynamics probe (iv_probe_task): the "
         "extraction needs the full weights on every rank")
