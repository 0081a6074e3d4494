"""Training shared across the trials of a sweep (pure: no Ray, MLflow, DeepSpeed or torch).

Three kinds (README "Training shared across trials"):
- **prior phases**: the trials whose prior fine-tuning phases are the same (same model, phases, seed, precision,
  ZeRO stage, device and probe suite: `start_identity`) start from one trained start, trained once per sweep
  (`forgetray.trial` keys its folder with `keys.prior_start_key`, the same parts with resolved paths);
- **epoch prefixes**: trials that differ only in `epochs` share one IFT trajectory when a shorter run is a prefix
  of the longer one (`prefix_shareable`): the longest is trained (the leader) and every shorter grid point (a
  follower) takes its results from the leader's checkpoint at its own epoch;
- **worker groups** (`cohorts`): a grid point's replicates run in turn in one Ray Train run, so the worker
  processes, their imports and the loaded data serve them all; each keeps its own MLflow run and checkpoints.

`training_epochs` counts the epochs a sweep trains with and without both (what `forgetray validate` prints).
"""

from __future__ import annotations

import json

from forgetray import plan as planning
from forgetray.metrics import registry
from forgetray.spec import TrialConfig

PREFIX_SCHEDULES = ("constant", "step")  # the lr of a step depends on its epoch, never on the total


def prefix_shareable(trial: TrialConfig) -> tuple[bool, str]:
    """(True, "") if the trial's first e epochs are exactly a trial with `epochs=e`; else (False, why). Nothing else
    of the IFT phase reads the total: the data order is seeded per epoch, SAM / Wise-FT / rehearsal act per step or
    per checkpoint, the restoring set's budget is one epoch, and each restoration starts from its own checkpoint."""
    if trial.lr_schedule not in PREFIX_SCHEDULES:
        return False, f"lr_schedule {trial.lr_schedule!r} depends on the total steps"
    if trial.warmup_ratio > 0:
        return False, f"warmup_ratio {trial.warmup_ratio:g} makes the warm-up a share of the total steps"
    if trial.iv_task and trial.iv_progressive:
        return False, "iv_progressive makes the vector's degree a share of the total steps"
    return True, ""


def _without_epochs(trial: TrialConfig) -> str:
    data = trial.to_dict()
    del data["epochs"]
    return json.dumps(data, sort_keys=True)


def trajectories(trials: list[TrialConfig], share: bool = True) -> list[list[int]]:
    """Groups of trial indices that share one IFT trajectory: the leader (most epochs) first, then the followers by
    epochs. Unshareable trials (or all, with `share=False`) are groups of one. Groups in the order of their leader."""
    groups: dict[str, list[int]] = {}
    for i, trial in enumerate(trials):
        key = _without_epochs(trial) if share and prefix_shareable(trial)[0] else f"alone-{i}"
        groups.setdefault(key, []).append(i)
    out = [sorted(members, key=lambda i: -trials[i].epochs) for members in groups.values()]
    return sorted(out, key=lambda g: g[0])


def cohorts(trials: list[TrialConfig], leaders: list[int], slots: int, share: bool = True) -> list[list[int]]:
    """Groups of trial indices (trajectory leaders only) that one Ray Train worker group runs in turn, each in the
    order of `leaders`: the trials that differ only in their seed (a grid point's replicates). While there are fewer
    groups than `slots` (the trials the cluster runs at once), the largest group is halved, so that sharing never
    leaves a slot idle that separate trials would have used. `share=False`: every leader alone."""
    groups: dict[str, list[int]] = {}
    for i in leaders:
        data = trials[i].to_dict()
        del data["seed"]
        key = json.dumps(data, sort_keys=True) if share else f"alone-{i}"
        groups.setdefault(key, []).append(i)
    out = list(groups.values())
    while len(out) < slots:
        largest = max(out, key=len)
        if len(largest) < 2:
            break
        half = (len(largest) + 1) // 2
        out[out.index(largest):out.index(largest) + 1] = [largest[:half], largest[half:]]
    return sorted(out, key=lambda g: leaders.index(g[0]))


def unshared_reasons(trials: list[TrialConfig]) -> list[str]:
    """One line per reason why trials that differ only in `epochs` are not shared."""
    groups: dict[str, list[TrialConfig]] = {}
    for trial in trials:
        groups.setdefault(_without_epochs(trial), []).append(trial)
    reasons = {prefix_shareable(g[0])[1] for g in groups.values() if len(g) > 1 and not prefix_shareable(g[0])[0]}
    return [f"epochs grid not shared: {why}" for why in sorted(reasons)]


def start_identity(trial: TrialConfig) -> str:
    """What the IFT phase's start depends on when the trial has prior phases (by the names the trial gives): the
    model, the prior phases as planned (data, optimizer, batching, methods), seed, precision, ZeRO stage and
    device (they change the numerics), and the probe suite (the start folder keeps the continual probes too)."""
    phases = [p.to_dict() for p in planning.plan(trial) if p.kind == "prior"]
    return json.dumps({"model": trial.model, "phases": phases, "datasets": [dict(p)["dataset"]
                                                                           for p in trial.prior_phases],
                       **start_settings(trial), "probes": probe_settings(trial)}, sort_keys=True)


def start_settings(trial: TrialConfig) -> dict:
    """The trial settings besides the phases that shape the prior phases' weights."""
    return {"seed": trial.seed, "precision": trial.precision, "zero_stage": trial.zero_stage,
            "device": "gpu" if trial.gpus_per_worker else "cpu"}


def probe_settings(trial: TrialConfig) -> list:
    """The probe-suite settings of the continual probes a[t][b] (besides the benchmark files themselves)."""
    batching = [trial.probe_batch_tokens] if trial.probe_batch_tokens else []  # at 0: keys as before it existed
    return [list(trial.benchmarks), sorted(trial.primary_score), trial.n_shot, trial.bos, trial.letter_rule,
            trial.probe_max_length, trial.probe_batch_size] + batching


def training_epochs(trials: list[TrialConfig], share_trajectories: bool = True) -> dict:
    """Epochs of training the sweep needs: {"without": n, "with": m, "prior": (n, m), "ift": (n, m), "restore":
    (n, m)}. Prior phases: their epochs, once per trial / once per distinct start. IFT: once per trial / once per
    trajectory. Restorations (one epoch-sized pass over the restoring set per checkpoint): once per checkpoint of
    every trial / of every trajectory."""
    prior = sum(sum(dict(p)["epochs"] for p in t.prior_phases) for t in trials)
    starts = {start_identity(t): sum(dict(p)["epochs"] for p in t.prior_phases) for t in trials if t.prior_phases}
    groups = trajectories(trials, share_trajectories)
    ift = (sum(t.epochs for t in trials), sum(trials[g[0]].epochs for g in groups))
    restore = (sum(t.epochs for t in trials if t.restore_pool),
               sum(trials[g[0]].epochs for g in groups if trials[g[0]].restore_pool))
    counts = {"prior": (prior, sum(starts.values())), "ift": ift, "restore": restore}
    return {"without": sum(a for a, _ in counts.values()), "with": sum(b for _, b in counts.values()), **counts}


def describe(trials: list[TrialConfig], share_trajectories: bool = True) -> list[str]:
    """`forgetray validate`'s lines about shared training."""
    n = training_epochs(trials, share_trajectories)
    parts = [f"{label}: {n[key][0]} -> {n[key][1]}" for key, label in
             (("prior", "prior phases trained once per start"), ("ift", "epoch prefixes"),
              ("restore", "restorations once per checkpoint")) if n[key][0]]
    lines = [f"training epochs: {n['without']} without sharing, {n['with']} with"
             + (f" ({'; '.join(parts)})" if parts else "")]
    if not share_trajectories:
        lines.append("epochs grid not shared: share_trajectories=False")
    else:
        lines += unshared_reasons(trials)
    return lines


# Recomputed for a follower from its own settings, never copied: its stages (`stages.classify_trial`) and its
# continual summaries at T (`trial.log_continual`; a[T] is its own last checkpoint).
RECOMPUTED = (registry.STAGE_CODE, registry.STAGE_AT_MARGIN, registry.STAGE_INTERVAL, registry.STAGE_TEST_CODE,
              registry.STAGE_FIXED_CODE, registry.STAGE_D_SFT, registry.STAGE_D_RESTORED,
              registry.STAGE_P_SFT, registry.STAGE_P_RESTORED, registry.CONTINUAL_FORGETTING, registry.CONTINUAL_BWT)


def follower_metrics(history: dict[str, dict[int, float]], epochs: int, leader_epochs: int,
                     prior_phases: int) -> dict[int, dict[str, float]]:
    """What a follower with `epochs` takes from its leader's run (`history`: name -> {step: value}), by step, by
    what the registry says `step` means: per-epoch metrics up to its epoch (0 = base included); optimizer-step
    metrics up to the end of its epoch (the last one is the leader's epoch end, equal epochs); the prior phases'
    losses; the continual probes a[t] of t = 0..k (a[T] is recomputed); restoring trajectories of its checkpoints.
    Undeclared metrics (system/*: the leader's machine) and RECOMPUTED ones are not taken."""
    recomputed = {m.pattern for m in RECOMPUTED}
    optimizer_steps = [max(h) for name, h in history.items() if h and _meaning(name) == "optimizer step"]
    per_epoch = max(optimizer_steps) // leader_epochs if optimizer_steps else 0
    out: dict[int, dict[str, float]] = {}
    for name, values in history.items():
        found = registry.parse(name)
        if found is None or found[0].pattern in recomputed:
            continue
        metric, fields = found
        keep = {"epoch": lambda step: step <= epochs,
                "optimizer step": lambda step: step <= per_epoch * epochs,
                "phase epoch": lambda step: True,
                "restoring step": lambda step: int(fields["epoch"]) <= epochs,
                "fine-tuning step": lambda step: step <= prior_phases}[metric.step]
        for step, value in values.items():
            if keep(step):
                out.setdefault(step, {})[name] = value
    return out


def _meaning(name: str) -> str | None:
    found = registry.parse(name)
    return found[0].step if found else None


def follower_artifact(path: str, epochs: int) -> bool:
    """Whether a leader's artifact folder (`probes/base`, `probes/control`, `probes/sft/epoch_NNN`,
    `probes/restored/epoch_NNN`) is a follower's too; stage tables are recomputed."""
    parts = path.split("/")
    if parts[:2] in (["probes", "base"], ["probes", "control"]):  # step 0: the start and its control R_0
        return True
    return len(parts) >= 3 and parts[0] == "probes" and parts[2].startswith("epoch_") \
        and int(parts[2][len("epoch_"):]) <= epochs
