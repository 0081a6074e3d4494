"""One Ray Train run of a trial's phases, or of several trials' IFT phases in turn (a cohort: a grid point's
replicates sharing one worker group, `forgetray.sharing.cohorts`): the `TorchTrainer`, its storage folder, and the
callbacks that carry its reports into each trial's MLflow run, into Tune and onto the console. The trial driver
(`forgetray.trial`) decides what runs; this module runs it and raises if it failed."""

from __future__ import annotations

import os
from pathlib import Path

from forgetray import storage as store
from forgetray.keys import cohort_key, trial_key
from forgetray.plan import Phase
from forgetray.spec import TrialConfig

IFT_LINK = "ift.link"  # on object storage (no symlinks): the URI of a cohort member's IFT folder


def fit(trial: TrialConfig, resolved: dict, dirs: dict, context: dict, run_id: str | None, name: str,
         phases: list[Phase]):
    """Run one group of phases of one trial as one Ray Train run to completion; raise on failure. The prior phases'
    run (`run_id` None: it serves every trial sharing its start) has its storage in the sweep's start folder and
    reports to no run: each trial reports the saved probes and losses into its own."""
    storage = str(store.parent(dirs["start_dir"])) if run_id is None else dirs["trial_dir"]
    member = {"trial": trial, "resolved": resolved, "dirs": dirs, "run_id": run_id}
    return _train(context, [(member, phases)], f"{name}.train" if run_id is None else name, storage,
                  prune=name == "ift")


def fit_members(context: dict, members: list[dict]):
    """The members' IFT groups as one Ray Train run: alone, `<trial>/ift/` as ever; several (a cohort), the run
    `<execution>/cohorts/<key>/`, each member's checkpoints in its `<trial key>/` there and its trial folder's `ift`
    a link to that."""
    if len(members) == 1:
        m = members[0]
        return fit(m["trial"], m["resolved"], m["dirs"], context, m["run_id"], "ift", m["training"])
    root = store.join(context["execution_dir"], "cohorts")
    name = cohort_key([m["trial"] for m in members])
    for m in members:
        if store.is_remote(root):  # no symlinks on object storage: the link is an object naming the folder
            store.write_text(store.join(m["dirs"]["trial_dir"], IFT_LINK),
                             str(store.join(root, name, trial_key(m["trial"]))))
            continue
        link = Path(m["dirs"]["trial_dir"]) / "ift"
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(root / name / trial_key(m["trial"]), link.parent))
    return _train(context, [(m, m["training"]) for m in members], name, str(root), prune=True,
                  prefixes=[f"{trial_key(m['trial'])}/" for m in members])


def _train(context: dict, members: list[tuple[dict, list[Phase]]], name: str, storage: str, prune: bool,
           prefixes: list[str] | None = None):
    """One Ray Train run of `members` (member, its phases) in turn; raise on failure. Reports go to each member's
    run (none for a run_id None), into Tune and the console."""
    from functools import partial

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    from forgetray.callbacks import make_report_logger
    from forgetray.tracking import SYSTEM_METRICS_ENV, system_metrics_wanted
    from forgetray.train.retention import make_state_pruner

    trial = members[0][0]["trial"]  # the members differ only in their seeds: the same resources
    run_id = members[0][0]["run_id"]
    use_gpu = trial.gpus_per_worker > 0
    resources = {"CPU": trial.cpus_per_worker, **({"GPU": trial.gpus_per_worker} if use_gpu else {})}
    runs = {m: (member["run_id"], _artifact_dirs(member["dirs"])) for m, (member, _) in enumerate(members)
            if member["run_id"] is not None}
    config = {"members": [{"trial": member["trial"].to_dict(), "resolved": member["resolved"],
                           "phases": [p.to_dict() for p in phases], "prefix": (prefixes or [""] * len(members))[m],
                           **member["dirs"]} for m, (member, phases) in enumerate(members)]}
    setting = context.get("system_metrics", os.environ.get(SYSTEM_METRICS_ENV))
    trainer = trainer_class(cleaner=context.get("state_api", True))(
        # system metrics: sampled on rank 0's node into the first member's run
        partial(_monitored_worker, context["tracking_uri"], run_id)
        if run_id is not None and system_metrics_wanted(setting, trial.gpus_per_worker) else _phase_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=trial.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=store.ray_storage(storage)[0], storage_filesystem=store.ray_storage(storage)[1],
            failure_config=FailureConfig(max_failures=trial.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # every epoch's model is kept for restoration
            callbacks=[] if not runs else [
                TuneReportCallback(), make_report_logger(context["tracking_uri"], runs),
                # the IFT phase resumes from its newest checkpoint's DeepSpeed state only
                *([make_state_pruner()] if prune and trial.keep_optimizer_state == "latest" else [])],
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def trainer_class(cleaner: bool = True):
    """Ray Train's `TorchTrainer` less two callbacks that cannot serve a forgetray run, each a process per run that
    only imports and polls (measured on the test suite: ~2.4 and ~2.7 CPU-s per run, 4-5% of its CPU each):
    - its Ray Data callback, which starts a DatasetManager actor even for a run given no `datasets=` (forgetray's
      workers read their data themselves);
    - without `cleaner`, its placement-group cleaner: a detached actor asking Ray's state API every second whether the
      controller still lives, to free the run's placement group if it died. The state API is the dashboard's, which
      forgetray's local Ray and the tests' start without: there the cleaner can never act (it logs a warning each
      second instead). forgetray.sweep asks the state API once and passes whether it answered.
    Both are reached through Ray Train's private `_create_default_callbacks`: where that or a callback's module is
    gone (another Ray), the trainer is Ray's own, unchanged; tests/test_fit.py says which it is."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return TorchTrainer
    if not hasattr(TorchTrainer, "_create_default_callbacks"):
        return TorchTrainer
    unused = (() if cleaner else (PlacementGroupCleanerCallback,))

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            drop = unused if self.datasets else (DatasetsCallback, *unused)
            return [c for c in super()._create_default_callbacks() if not isinstance(c, drop)]

    return Trainer


def _artifact_dirs(dirs: dict) -> dict:
    """Report kind -> (local folder or None: the checkpoint's probes/, the run's artifact path)."""
    return {"base": (dirs["base_eval_dir"], "probes/base"), "control": (dirs.get("control_dir"), "probes/control"),
            "iv": (dirs.get("iv_dir"), "iv"), "iv_probe": (dirs.get("iv_probe_dir"), "iv_probe"),
            "epoch": (None, "probes/sft/epoch_{epoch:03d}"),
            "restored": (None, "probes/restored/epoch_{epoch:03d}")}


def _phase_worker(config: dict) -> None:
    """`forgetray.train.worker.phase_worker`, imported where it runs: the trial driver handing it to Ray Train then
    loads neither transformers nor DeepSpeed (~1.5 CPU-s per trial driver)."""
    from forgetray.train.worker import phase_worker

    return phase_worker(config)


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
