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

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from forgetray import plan as planning
from forgetray.keys import base_em_key, base_eval_key, restoring_key, start_key, trial_key  # noqa: F401 (re-exported)
from forgetray.metrics import continual, registry
from forgetray.plan import Phase
from forgetray.records import (RUN_ID_FILE, attach_trial_run, run_name, trial_datasets,  # noqa: F401 (re-exported)
                               trial_params, varying_settings)
from forgetray.spec import TrialConfig
from forgetray.tracking import TAG_ERROR, Tracker

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
