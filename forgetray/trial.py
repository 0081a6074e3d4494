"""The trial driver: the function Ray Tune runs for one point of the grid.

1. attach the trial to its MLflow run (re-attaching on resume), with every phase's settings as params;
2. plan the trial's phases (`forgetray.plan`) and run them, one Ray Train `TorchTrainer` per group of phases whose
   workers run `train.worker.phase_worker` under DeepSpeed: the prior fine-tuning phases with the IFT phase (a
   checkpoint per epoch; the base model's probes and the restoring set are computed there, once per sweep), then
   the restorations of the IFT checkpoints, groups concurrently;
3. stages: each checkpoint classified no / pseudo / actual forgetting from the per-question results (`stages.py`);
4. continual-learning summaries (METHODS.md §9): once the training phases are done, the matrix a[t][b] is read back
   from the run and completed, and forgetting per benchmark and backward transfer are logged (`log_continual`).

Every trainer's storage folder is derived from the trial's config hash, so a re-run of the same trial (Tune retry,
`--resume`) finds Ray Train's snapshots there and continues from the last checkpoints; finished restorations leave a
marker and are not repeated.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from forgetray import plan as planning
from forgetray.metrics import continual, registry
from forgetray.plan import Phase
from forgetray.spec import TrialConfig, flatten
from forgetray.tracking import TAG_ERROR, Tracker

RUN_ID_FILE = "mlflow_run_id"
# Written when a trial has finished (its run is FINISHED): a later execution (`--resume` after a driver that was
# killed before Tune recorded the trial as done) returns at once instead of running the trial again.
DONE_FILE = "trial_done"


def failure_reason(exc: BaseException) -> str:
    """One line saying why a trial failed: the innermost worker error's type and message when Ray wrapped it
    (Ray Train's WorkerGroupError / ControllerError, Ray's task errors), else the exception's own first line."""
    import re

    inner = getattr(exc, "worker_failures", None)
    if inner:
        exc = next(iter(inner.values()))
    exc = getattr(exc, "controller_failure", None) or getattr(exc, "cause", None) or exc
    text = f"{type(exc).__name__}: {exc}"
    found = re.findall(r"^\s*((?:[\w.]+\.)?\w+(?:Error|Exception|Loss|Unavailable)(?:\([^)]*\))?: .+)$", text,
                       re.MULTILINE)
    line = found[-1].strip() if found else text.splitlines()[0]
    return line[:500]


def trial_key(trial: TrialConfig) -> str:
    return f"{trial.short_name()}-{trial.config_hash()}"


def _digest(parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def _model_name(trial: TrialConfig) -> str:
    return trial.model.rstrip("/").split("/")[-1]


def start_key(trial: TrialConfig, resolved: dict) -> dict:
    """What makes the IFT phase's starting weights: the model, and the prior phases with all they train with."""
    phases = [p.to_dict() for p in planning.plan(trial) if p.kind == "prior"]
    return {"model": resolved["model"]["path"], "precision": trial.precision, "seed": trial.seed,
            "prior_phases": [[p, data["path"]] for p, data in zip(phases, resolved["prior_datasets"])]}


def base_eval_key(trial: TrialConfig, resolved: dict) -> str:
    """What the base model's probes depend on: the starting weights and the probe suite (not the IFT data)."""
    parts = {
        "start": start_key(trial, resolved),
        "benchmarks": {k: [v["path"], v["score"]] for k, v in resolved["benchmarks"].items()},
        "probe_set": resolved["probe_set"]["path"],
        "probe": [trial.n_shot, trial.probe_passages, trial.probe_max_length],
    }
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


def run_name(trial: TrialConfig, trials: list[dict]) -> str:
    """The trial run's name in the MLflow UI: the swept settings first (`lr=5e-3 dataset=organism-math`), then
    the model, so the UI's truncated name column still tells trials apart. `trial_key` stays the trial's id (tag
    forgetray.trial)."""
    mine = trial.to_dict()
    swept = [f"{k}={_short(mine[k])}" for k in varying_settings(trials) if k != "model"]
    return " ".join([*swept, _model_name(trial)])


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


def attach_trial_run(tracker: Tracker, context: dict, trial: TrialConfig, resolved: dict, trial_dir: Path,
                     phases: list[Phase]) -> str:
    """The trial's MLflow run: created once, its id stored with the trial's checkpoints, reused on resume."""
    id_file = trial_dir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    # A driver killed between creating the run and storing its id left the run without the file: reuse it.
    run_id = run_id or tracker.find_trial_run(context["parent_run_id"], trial.config_hash())
    if run_id:
        tracker.reopen(run_id)
        trial_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
        return run_id
    run_id = tracker.start_trial_run(context["sweep_name"], context["parent_run_id"], trial_key(trial),
                                     trial.config_hash(), trial_params(trial, resolved, phases),
                                     run_name=run_name(trial, context["trials"]),
                                     description=trial_note(trial, context["trials"]))
    tracker.log_datasets(run_id, trial_datasets(resolved))
    trial_dir.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id + "\n")
    return run_id


def run_trial(config: dict) -> None:
    """Tune trainable. `config` = {"trial_index": i, "context": {...}} (plain data, see sweep.run_sweep)."""
    from forgetray import stages

    context, index = config["context"], config["trial_index"]
    trial = TrialConfig.from_dict(context["trials"][index])
    resolved = context["resolved"][index]
    execution_dir = Path(context["execution_dir"])
    trial_dir = execution_dir / "trials" / trial_key(trial)
    phases = planning.plan(trial)
    tracker = Tracker(context["tracking_uri"])
    if (trial_dir / DONE_FILE).is_file():  # finished by an earlier execution: not run again
        run_id = (trial_dir / RUN_ID_FILE).read_text().strip()
        if tracker.get_run(run_id).info.status != "FINISHED":  # killed between the marker and ending the run
            tracker.end_run(run_id, ok=True)
        return
    run_id = attach_trial_run(tracker, context, trial, resolved, trial_dir, phases)
    dirs = {
        "trial_dir": str(trial_dir),
        "base_eval_dir": str(execution_dir / "base_eval" / base_eval_key(trial, resolved)),
        "base_em_dir": str(execution_dir / "base_em" / base_em_key(trial, resolved)),
        "restoring_dir": str(execution_dir / "restoring" / restoring_key(trial, resolved))
        if resolved.get("restore_pool") else None,
    }
    training, *restorations = planning.groups(trial, phases)
    ok = False
    try:
        _fit(trial, resolved, dirs, context, run_id, "ift", training)
        if trial.delete_finished_state:  # the IFT phase is done: nothing resumes from its DeepSpeed state again
            from forgetray.train.checkpoints import drop_state

            for checkpoint in sorted((trial_dir / "ift").glob("epoch_*")):
                drop_state(checkpoint)
        # Right after training: the summaries need nothing from the restorations, and a restoration that fails
        # then does not cost them.
        log_continual(tracker, run_id, trial, resolved, phases)
        if restorations:
            _restore_all(trial, resolved, dirs, context, run_id, restorations)
            checkpoints = sorted((trial_dir / "ift").glob("epoch_*"))
            stages.classify_trial(tracker, run_id, trial, resolved, dirs, checkpoints)
        ok = True
        (trial_dir / DONE_FILE).write_text(run_id + "\n")
    except BaseException as exc:  # the run says why (the console summary prints the same line)
        reason = failure_reason(exc)
        if "TrackingUnavailable" not in reason:  # a store that is gone is not waited for again
            try:
                tracker.set_tag(run_id, TAG_ERROR, reason)
            except Exception:  # noqa: BLE001 (the trial's own error is what must surface)
                pass
        raise
    finally:
        tracker.end_run(run_id, ok=ok)


def log_continual(tracker: Tracker, run_id: str, trial: TrialConfig, resolved: dict,
                  phases: list[Phase]) -> dict[str, float]:
    """Complete the continual-learning matrix and log its summaries at T (returns what it logged).

    a[t][b] = `continual/<b>/knowledge` at step t: t = 0..k were probed by the workers (trials with k prior phases);
    a[T] (T = k + 1) is the IFT phase's last checkpoint (`sft/<b>/knowledge`) and, without prior phases, a[0] is the
    base model (`base/<b>/knowledge`): those are logged here under the matrix's name, so the matrix reads from one
    metric. Then `continual/<b>/forgetting` and `continual/bwt` at step T. What the run already has at a step is not
    logged again (a re-run of the trial); what is missing (a failed probe) is left out of the summaries."""
    benches = list(resolved["benchmarks"])  # metric keys, in the order of trial.benchmarks
    steps = planning.fine_tuning_steps(phases)
    last = len(steps)  # T
    cell = {b: registry.CONTINUAL_KNOWLEDGE.name(bench=b) for b in benches}
    forgetting = {b: registry.CONTINUAL_FORGETTING.name(bench=b) for b in benches}
    sources = {b: (registry.KNOWLEDGE.name(state="base", bench=b), registry.KNOWLEDGE.name(state="sft", bench=b))
               for b in benches}
    history = tracker.metric_history(run_id, [*cell.values(), *forgetting.values(), registry.CONTINUAL_BWT.name(),
                                              *(name for pair in sources.values() for name in pair)])
    matrix: list[dict[str, float]] = [{} for _ in range(last + 1)]
    for bench in benches:
        for t, value in history[cell[bench]].items():
            if t <= last:
                matrix[t][bench] = value
        base, sft = sources[bench]
        if last == 1 and 0 in history[base]:
            matrix[0].setdefault(bench, history[base][0])
        if trial.epochs in history[sft]:
            matrix[last][bench] = history[sft][trial.epochs]
    own = [None] + [benches[trial.benchmarks.index(p.data.own_benchmark)] if p.data.own_benchmark else None
                    for p in steps]
    logged: dict[str, float] = {}
    for t in (0, last):
        new = {cell[b]: v for b, v in matrix[t].items() if t not in history[cell[b]]}
        tracker.log_metrics(run_id, new, step=t)
        logged.update(new)
    summary = {forgetting[b]: v for b, v in continual.forgetting_by_benchmark(matrix).items()}
    summary[registry.CONTINUAL_BWT.name()] = continual.backward_transfer(matrix, own)
    summary = {name: v for name, v in summary.items() if last not in history[name] and math.isfinite(v)}
    tracker.log_metrics(run_id, summary, step=last)  # undefined (nan: no BWT with T = 1) is not logged
    logged.update(summary)
    return logged


def _fit(trial: TrialConfig, resolved: dict, dirs: dict, context: dict, run_id: str, name: str,
         phases: list[Phase]):
    """Run one group of phases as one Ray Train run to completion; raise on failure."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from forgetray.callbacks import make_report_logger
    from forgetray.train.checkpoints import make_state_pruner
    from forgetray.train.worker import phase_worker

    use_gpu = trial.gpus_per_worker > 0
    resources = {"CPU": trial.cpus_per_worker, **({"GPU": trial.gpus_per_worker} if use_gpu else {})}
    artifact_dirs = {"base": (dirs["base_eval_dir"], "probes/base"),
                     "epoch": (None, "probes/sft/epoch_{epoch:03d}"),
                     "restored": (None, "probes/restored/epoch_{epoch:03d}")}
    from functools import partial

    from forgetray.tracking import SYSTEM_METRICS_ENV, system_metrics_wanted

    setting = context.get("system_metrics", os.environ.get(SYSTEM_METRICS_ENV))
    trainer = TorchTrainer(
        partial(_monitored_worker, context["tracking_uri"], run_id)
        if system_metrics_wanted(setting, trial.gpus_per_worker) else phase_worker,
        train_loop_config={"trial": trial.to_dict(), "resolved": resolved, "phases": [p.to_dict() for p in phases],
                           **dirs},
        scaling_config=ScalingConfig(num_workers=trial.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=dirs["trial_dir"],
            failure_config=FailureConfig(max_failures=trial.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # every epoch's model is kept for restoration
            callbacks=[TuneReportCallback(), make_report_logger(context["tracking_uri"], run_id, artifact_dirs),
                       # the IFT phase resumes from its newest checkpoint's DeepSpeed state only
                       *([make_state_pruner()] if name == "ift" and trial.keep_optimizer_state == "latest" else [])],
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def _monitored_worker(tracking_uri: str, run_id: str, config: dict) -> None:
    """`phase_worker`, with MLflow's system metrics monitor on rank 0 logging into the trial's run meanwhile (one
    sampler per Ray Train run: the node of rank 0; every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s, default 10)."""
    from ray.train import get_context

    from forgetray.tracking import system_metrics
    from forgetray.train.worker import phase_worker

    if get_context().get_world_rank() != 0:
        return phase_worker(config)
    with system_metrics(tracking_uri, run_id):
        return phase_worker(config)


def _restore_all(trial: TrialConfig, resolved: dict, dirs: dict, context: dict, run_id: str,
                 groups: list[list[Phase]]) -> None:
    """Run the restoration groups concurrently (Ray queues them on resources), each one TorchTrainer restoring its
    checkpoints in turn; restorations finished by an earlier execution (a marker file) are skipped."""
    trial_dir = Path(dirs["trial_dir"])

    def done(phase: Phase) -> Path:
        return trial_dir / f"{planning.checkpoint_name(phase, phase.restores_epoch)}.done"

    todo = [[p for p in group if not done(p).is_file()] for group in groups]
    todo = [group for group in todo if group]

    def restore(group: list[Phase]) -> None:
        first, last = group[0].restores_epoch, group[-1].restores_epoch
        _fit(trial, resolved, dirs, context, run_id, f"restore_{first:03d}-{last:03d}", group)
        for phase in group:  # finished in this execution: an interrupted sweep's resume skips it
            done(phase).write_text("ok\n")

    with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
        for future in [pool.submit(restore, g) for g in todo]:
            future.result()  # re-raise the first failure
