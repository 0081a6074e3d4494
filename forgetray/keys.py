"""The keys of what a sweep computes once and shares between trials: a trial's id, and the cache keys of the
base model's probes, its exact memorization and the restoring set (each names everything the result depends on)."""

from __future__ import annotations

import hashlib
import json

from forgetray import plan as planning
from forgetray import sharing
from forgetray.spec import TrialConfig


def trial_key(trial: TrialConfig) -> str:
    return f"{trial.short_name()}-{trial.config_hash()}"


def cohort_key(trials: list[TrialConfig]) -> str:
    """The folder of a worker group's Ray Train run (`sharing.cohorts`): its first trial's name and all of theirs."""
    return f"{trials[0].short_name()}-x{len(trials)}-{_digest([trial_key(t) for t in trials])}"


def _digest(parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def _model_name(trial: TrialConfig) -> str:
    return trial.model.rstrip("/").split("/")[-1]


def start_key(trial: TrialConfig, resolved: dict) -> dict:
    """What makes the IFT phase's starting weights: the model, and the prior phases with all they train with (also
    the ZeRO stage and device, which change their numerics: `sharing.start_settings`)."""
    phases = [p.to_dict() for p in planning.plan(trial) if p.kind == "prior"]
    key = {"model": resolved["model"]["path"], "precision": trial.precision, "seed": trial.seed,
           "prior_phases": [[p, data["path"]] for p, data in zip(phases, resolved["prior_datasets"])]}
    if phases:  # without prior phases the start is the model itself (and the keys stay those of earlier sweeps)
        key.update(sharing.start_settings(trial))
    return key


def prior_start_key(trial: TrialConfig, resolved: dict) -> str:
    """The folder of the trained start a trial with prior phases shares with the trials of the sweep that have the
    same one (`<execution>/start/<key>/`): its weights, and the continual probes a[t][b] taken along the prior
    phases, so the probe suite too (`sharing.start_identity` is the same by the names the trial gives)."""
    parts = {"start": start_key(trial, resolved),
             "benchmarks": {k: [v["path"], v["score"]] for k, v in resolved["benchmarks"].items()},
             "probe": sharing.probe_settings(trial)}
    return f"{_model_name(trial)}-{_digest(parts)}"


def base_eval_key(trial: TrialConfig, resolved: dict) -> str:
    """What the base model's probes depend on: the starting weights and the probe suite (not the IFT data)."""
    parts = {
        "start": start_key(trial, resolved),
        "benchmarks": {k: [v["path"], v["score"]] for k, v in resolved["benchmarks"].items()},
        "probe_set": resolved["probe_set"]["path"],
        "probe": [trial.n_shot, trial.probe_passages, trial.probe_max_length],
    }
    if trial.iv_probe_task:  # the dynamics probe is part of the base's probes (absent: keys as before it)
        parts["iv_probe"] = [iv_probe_key(trial, resolved), trial.iv_probe_layer, trial.iv_probe_degree,
                             trial.probe_batch_size]
    return f"{_model_name(trial)}-{_digest(parts)}"


def base_em_key(trial: TrialConfig, resolved: dict) -> str:
    """What the base model's exact memorization depends on: the starting weights and the IFT examples scored."""
    parts = {"start": start_key(trial, resolved), "dataset": resolved["dataset"]["path"],
             "max_length": trial.max_length, "em_examples": trial.em_examples, "batch": trial.probe_batch_size}
    return f"{_model_name(trial)}-{_digest(parts)}"


def restoring_key(trial: TrialConfig, resolved: dict) -> str:
    """What the restoring set depends on: start model, pool, the passages probed (excluded), the IFT data (the token
    budget)."""
    parts = [start_key(trial, resolved), resolved["restore_pool"]["path"], resolved["probe_set"]["path"],
             trial.probe_passages, resolved["dataset"]["path"], trial.max_length, trial.probe_max_length]
    return f"{_model_name(trial)}-{_digest(parts)}"


def control_key(trial: TrialConfig, resolved: dict) -> str:
    """What the control R_0 (the IFT phase's start restored by the trial's restoration recipe, docs/methods.md §4)
    depends on: the restoring set, the recipe (the restoration phase's optimizer, batching, length, passes and the
    tolerance that ends them), the seed (data order), the numerics, and the probes it gets (the base's). Trials that
    differ in anything else (IFT rate, epochs, methods) share one R_0."""
    phase = planning.restore_phase(trial, 1).to_dict()
    recipe = {k: v for k, v in phase.items() if k not in ("name", "restores_epoch")}
    parts = {"restoring": restoring_key(trial, resolved), "recipe": recipe, "seed": trial.seed,
             "passes": [trial.restore_max_passes, trial.ppl_tolerance], "numerics": sharing.start_settings(trial),
             "probes": base_eval_key(trial, resolved)}
    return f"{_model_name(trial)}-{_digest(parts)}"


def iv_key(trial: TrialConfig, resolved: dict) -> str:
    """What the instruction vector depends on: the starting weights, the task, the prompts (how many, the seed, the
    BOS rule, truncation) and the number of heads. Not the injection layer or site, nor the loss settings: trials
    that differ only in those share one extraction."""
    return _extraction_key(trial, resolved, resolved["iv_task"], trial.iv_heads)


def iv_probe_key(trial: TrialConfig, resolved: dict) -> str:
    """The dynamics probe's base vector: the same extraction (and so the same folder as `iv_key`'s when the task
    and the number of heads agree). With iv_probe_other_task the folder also holds that task's vector (other/), so
    it is keyed by both (and is not IV guidance's folder)."""
    return _extraction_key(trial, resolved, resolved["iv_probe_task"], trial.iv_probe_heads,
                           resolved.get("iv_probe_other_task"))


def _extraction_key(trial: TrialConfig, resolved: dict, task: dict, heads: int, other: dict | None = None) -> str:
    parts = {"start": start_key(trial, resolved), "task": [task["kind"], task["path"], task["name"]],
             "prompts": [trial.iv_prompts, trial.iv_corrupted, trial.iv_corruption, trial.seed, resolved["bos"],
                         trial.max_length],
             "heads": heads}
    if other:  # absent: keys as before the control existed
        parts["other"] = [other["kind"], other["path"], other["name"]]
    return f"{_model_name(trial)}-{_digest(parts)}"
