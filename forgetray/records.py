"""What a trial's MLflow run records about it: its params (every setting, where the inputs were found, every
phase's settings), its name and description, its input datasets; the run itself is created once and re-attached on
resume (its id is stored beside the trial's checkpoints)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from forgetray.keys import _model_name, trial_key
from forgetray.plan import Phase
from forgetray.grids import flatten
from forgetray.spec import TrialConfig
from forgetray.tracking import Tracker
from forgetray.tracking_history import forget_history
from forgetray.ui import TAG_GRID_POINT

RUN_ID_FILE = "mlflow_run_id"


def trial_params(trial: TrialConfig, resolved: dict, phases: list[Phase]) -> dict:
    """The flattened resolved config: what MLflow shows as the trial's params. Restorations share one set of
    settings, logged once as `phase.restore.*`."""
    from forgetray.train.deepspeed_config import deepspeed_config

    ift = next(p for p in phases if p.kind == "ift")
    shown = {p.name if p.kind != "restore" else "restore": p for p in phases}
    phase_params = {}
    for name, phase in shown.items():
        phase_params.update({f"phase.{name}.{k.split('.', 1)[1]}": v for k, v in phase.params().items()})
    return {
        **flatten({
            "trial": trial.to_dict(),
            "resolved": {
                "model": resolved["model"],
                "dataset": resolved["dataset"],
                "benchmarks": {name: {"path": b["path"], "score": b["score"]}
                               for name, b in resolved["benchmarks"].items()},
                "probe_set": resolved["probe_set"],
                "restore_pool": resolved.get("restore_pool") or "none",
            },
            "deepspeed": deepspeed_config(ift, trial.zero_stage, trial.precision),
        }),
        **phase_params,
    }


def _short(value) -> str:
    """A setting's value as a run name shows it: 5e-3 not 0.005, a path by its file stem, lists compact."""
    if isinstance(value, float):
        plain = f"{value:g}"
        mantissa, _, exponent = f"{value:e}".partition("e")
        sci = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return sci if len(sci) < len(plain) and float(sci) == value else plain
    if isinstance(value, str):  # a path or hub id by its last part, a data file without its extension
        last = value.rstrip("/").split("/")[-1]
        stem, _, ext = last.rpartition(".")
        return stem if stem and ext in ("json", "jsonl", "csv", "parquet", "txt") else last
    if isinstance(value, (list, tuple)):
        return ",".join(_short(v) for v in value) if all(not isinstance(v, (dict, list)) for v in value) \
            else json.dumps(value, separators=(",", ":"))[:40]
    return str(value)


def varying_settings(trials: list[dict]) -> list[str]:
    """The settings whose values differ between the sweep's trials (in TrialConfig's order)."""
    return [k for k in trials[0] if len({json.dumps(t.get(k), sort_keys=True) for t in trials}) > 1]


SEP = "\u00b7"  # between a run name's parts: `small\u00b7alpaca\u00b7s1`


def _follows(trials: list[dict], key: str, other: str) -> bool:
    """Whether `key`'s value is fixed by `other`'s (lr=per("dataset", ...)): naming both tells nothing more."""
    seen: dict[str, str] = {}
    for t in trials:
        a, b = json.dumps(t.get(other), sort_keys=True), json.dumps(t.get(key), sort_keys=True)
        if seen.setdefault(a, b) != b:
            return False
    return True


def _labels(trials: list[dict], key: str) -> dict[str, str]:
    """Each value of a swept setting (by its JSON) -> how a run name shows it. A name (model, data) shows bare and
    without the prefix all its values share (`organism-tiny`, `organism-small` -> `tiny`, `small`): that prefix is
    what pushed the part that differs out of the UI's name column. A number or a flag shows as `key=value`."""
    values = {json.dumps(t.get(key), sort_keys=True): t.get(key) for t in trials}
    shown = {k: _short(v) for k, v in values.items()}
    if len(set(shown.values())) < len(shown):  # two paths with one stem: the whole values
        shown = {k: str(v) for k, v in values.items()}
    if not all(isinstance(v, str) for v in values.values()):
        return {k: f"{key}={v}" for k, v in shown.items()}
    prefix = os.path.commonprefix(list(shown.values()))
    cut = max(prefix.rfind(c) for c in "-_./") + 1  # at a separator, never inside a word
    if len(shown) > 1 and all(len(v) > cut for v in shown.values()):
        shown = {k: v[cut:] for k, v in shown.items()}
    return shown


def name_parts(trial: TrialConfig, trials: list[dict]) -> list[str]:
    """The parts of a trial's run name without its seed: one per swept setting (TrialConfig's order), leaving out
    the seed and any setting another shown one fixes; the model's name when nothing else is swept. They name its
    grid point."""
    mine, shown = trial.to_dict(), []
    for key in varying_settings(trials):
        if key != "seed" and not any(_follows(trials, key, other) for other in shown):
            shown.append(key)
    return [_labels(trials, k)[json.dumps(mine[k], sort_keys=True)] for k in shown] or [_model_name(trial)]


def grid_point(trial: TrialConfig, trials: list[dict]) -> str:
    """The trial's grid point as the UI groups by it (tag forgetray.grid_point): its run name without the seed."""
    return SEP.join(name_parts(trial, trials))


def run_name(trial: TrialConfig, trials: list[dict]) -> str:
    """The trial run's name in the MLflow UI: short values of what differs between the sweep's trials, the seed last
    (`small\u00b7alpaca\u00b7s1`), so the UI's truncated name column still tells trials apart. `trial_key` stays the
    trial's id (tag forgetray.trial); the description lists every swept setting with its whole value."""
    seeds = len({t.get("seed") for t in trials}) > 1
    return SEP.join([*name_parts(trial, trials), *([f"s{trial.seed}"] if seeds else [])])


def trial_note(trial: TrialConfig, trials: list[dict]) -> str:
    """The trial run's description (markdown): what was swept, what `step` means per chart section, artifacts."""
    from forgetray.tracking import metric_guide

    mine = trial.to_dict()
    swept = ", ".join(f"`{k}` = {mine[k]!r}" for k in varying_settings(trials)) or "nothing (a single trial)"
    return (f"forgetray trial `{trial_key(trial)}`: model `{trial.model}`, IFT data `{trial.dataset}`, "
            f"{trial.epochs} epoch(s) (a checkpoint and a probe after each). Swept: {swept}. Every setting is a "
            "`trial.*` parameter; where the inputs were found, `resolved.*`; the inputs are the run's datasets.\n\n"
            "What `step` means, by chart section:\n\n" + metric_guide() + "\n\n"
            "Artifacts: `probes/<state>/...` one row per question (Parquet, with a CSV copy the UI previews), "
            "`stages/` the forgetting stage of each checkpoint. Tags `forgetray.stage.epoch_NNN` name the stages.")


def _digest_of(path: str, kind: str) -> str:
    """A short content digest of a local file or folder (names, sizes and the first 64 MiB of each file); of the
    name for a hub dataset (its revision is the hub's)."""
    sha = hashlib.sha256()
    local = Path(path)
    if kind == "hub" or not local.exists():
        sha.update(path.encode())
        return sha.hexdigest()[:8]
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
    for file in files:
        sha.update(f"{file.relative_to(local) if local.is_dir() else file.name}:{file.stat().st_size}".encode())
        with open(file, "rb") as handle:
            sha.update(handle.read(64 * 1024**2))
    return sha.hexdigest()[:8]


def trial_datasets(resolved: dict) -> list[dict]:
    """The trial's inputs as MLflow datasets: the IFT data (context `training`), prior phases' data
    (`prior_<k>`), the benchmarks (`evaluation`), the probing set (`probing`), the restoring pool (`restoring`)."""
    entries = [("training", resolved["dataset"], None)]
    entries += [(f"prior_{k}", data, None) for k, data in enumerate(resolved.get("prior_datasets") or [], 1)]
    entries += [("evaluation", bench, key) for key, bench in resolved["benchmarks"].items()]
    entries += [("probing", resolved["probe_set"], None)]
    if resolved.get("restore_pool"):
        entries.append(("restoring", resolved["restore_pool"], None))
    out = []
    for context, data, key in entries:
        kind, path = data.get("kind", "local"), str(data["path"])
        rows = next((data[f] for f in ("records", "questions", "passages") if data.get(f) is not None), None)
        out.append({"name": key or _short(str(data["name"])), "source": path, "context": context,
                    "digest": _digest_of(path, kind), "source_type": "hugging_face" if kind == "hub" else "local",
                    "profile": {"num_rows": rows} if rows is not None else {}})
    return out


def attach_trial_run(tracker: Tracker, context: dict, trial: TrialConfig, resolved: dict, trial_dir,
                     phases: list[Phase]) -> str:
    """The trial's MLflow run: created once, its id stored with the trial's checkpoints, reused on resume."""
    from forgetray import storage

    id_file = storage.join(trial_dir, RUN_ID_FILE)
    run_id = (storage.read_text(id_file) or "").strip() or None
    # A driver killed between creating the run and storing its id left the run without the file: reuse it.
    run_id = run_id or tracker.find_trial_run(context["parent_run_id"], trial.config_hash())
    if run_id:
        tracker.reopen(run_id)
        forget_history(tracker, run_id)  # it will log more: its history table (if any) is no longer complete
        tracker.set_tag(run_id, TAG_GRID_POINT, grid_point(trial, context["trials"]))  # runs from before the tag
        storage.write_text(id_file, run_id + "\n")
        return run_id
    run_id = tracker.start_trial_run(context["sweep_name"], context["parent_run_id"], trial_key(trial),
                                     trial.config_hash(), trial_params(trial, resolved, phases),
                                     run_name=run_name(trial, context["trials"]),
                                     description=trial_note(trial, context["trials"]),
                                     tags={TAG_GRID_POINT: grid_point(trial, context["trials"])})
    tracker.log_datasets(run_id, trial_datasets(resolved))
    storage.write_text(id_file, run_id + "\n")
    return run_id
