"""The trial driver: the function Ray Tune runs for one point of the grid.

1. attach the trial to its MLflow run (re-attaching on resume);
2. instruction fine-tuning: one Ray Train `TorchTrainer` whose workers run `train.loop.ift_worker` under DeepSpeed
   (a checkpoint per epoch; the base model's probes and the restoring set are computed there, once per sweep);
3. restoration: one `TorchTrainer` per epoch checkpoint (`train.restore.restore_worker`), run concurrently;
4. stages: each checkpoint classified no / pseudo / actual forgetting from the per-question results (`stages.py`).

Every trainer's storage folder is derived from the trial's config hash, so a re-run of the same trial (Tune retry,
`--resume`) finds Ray Train's snapshots there and continues from the last checkpoints; finished restorations leave a
marker and are not repeated.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from forgetray.spec import TrialConfig, flatten
from forgetray.tracking import Tracker, make_report_logger
from forgetray.train.deepspeed_config import deepspeed_config, optimizer_settings

RUN_ID_FILE = "mlflow_run_id"


def trial_key(trial: TrialConfig) -> str:
    return f"{trial.short_name()}-{trial.config_hash()}"


def base_eval_key(trial: TrialConfig, resolved: dict) -> str:
    """What the base evaluation depends on: the model (and the prior stages that made it the trial's starting point)
    and the probe suite, not the settings of the trial's own stage."""
    parts = {
        "model": resolved["model"]["path"],
        "prior_stages": _prior_stages_key(trial, resolved),
        "precision": trial.precision,
        "benchmarks": {k: [v["path"], v["score"]] for k, v in resolved["benchmarks"].items()},
        "probe_set": resolved["probe_set"]["path"],
        "probe": [trial.n_shot, trial.probe_passages, trial.probe_max_length],
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]
    return f"{trial.model.rstrip('/').split('/')[-1]}-{digest}"


def restoring_key(trial: TrialConfig, resolved: dict) -> str:
    """What the restoring set depends on: base model, pool, probing set (excluded), IFT data (the token budget)."""
    parts = [resolved["model"]["path"], resolved["restore_pool"]["path"], resolved["probe_set"]["path"],
             resolved["dataset"]["path"], trial.max_length, trial.probe_max_length,
             _prior_stages_key(trial, resolved)]
    digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:10]
    return f"{trial.model.rstrip('/').split('/')[-1]}-{digest}"


def _prior_stages_key(trial: TrialConfig, resolved: dict) -> list:
    """The prior stages as they shape the trial's starting weights (with the settings they train with)."""
    if not trial.prior_stages:
        return []
    keep = ("batch_size", "micro_batch_size", "weight_decay", "warmup_ratio", "lr_schedule", "seed", "max_length",
            "precision")
    return [[stage, data["path"]] for stage, data in zip(trial.stages()[:-1], resolved["prior_datasets"])] + \
        [{k: getattr(trial, k) for k in keep}]


def trial_params(trial: TrialConfig, resolved: dict) -> dict:
    """The flattened resolved config: what MLflow shows as the trial's params."""
    return flatten({
        "trial": trial.to_dict(),
        "resolved": {
            "model": resolved["model"],
            "dataset": resolved["dataset"],
            "benchmarks": {name: {"path": b["path"], "score": b["score"]} for name, b in resolved["benchmarks"].items()},
            "probe_set": resolved["probe_set"],
            "restore_pool": resolved.get("restore_pool") or "none",
        },
        "deepspeed": deepspeed_config(trial),
        "optimizer": optimizer_settings(trial),
        "derived": {"micro_batch": trial.micro_batch, "grad_accum": trial.grad_accum},
    })


def attach_trial_run(tracker: Tracker, context: dict, trial: TrialConfig, resolved: dict, trial_dir: Path) -> str:
    """The trial's MLflow run: created once, its id stored with the trial's checkpoints, reused on resume."""
    id_file = trial_dir / RUN_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        tracker.reopen(run_id)
        return run_id
    run_id = tracker.start_trial_run(context["sweep_name"], context["parent_run_id"], trial_key(trial),
                                     trial.config_hash(), trial_params(trial, resolved))
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
    tracker = Tracker(context["tracking_uri"])
    run_id = attach_trial_run(tracker, context, trial, resolved, trial_dir)
    dirs = {
        "trial_dir": str(trial_dir),
        "base_eval_dir": str(execution_dir / "base_eval" / base_eval_key(trial, resolved)),
        "restoring_dir": str(execution_dir / "restoring" / restoring_key(trial, resolved))
        if resolved.get("restore_pool") else None,
    }
    ok = False
    try:
        _fit(trial, resolved, dirs, context, run_id, "ift", worker="ift", extra={})
        checkpoints = sorted((trial_dir / "ift").glob("epoch_*"))
        if resolved.get("restore_pool"):
            _restore_all(trial, resolved, dirs, context, run_id, checkpoints)
            stages.classify_trial(tracker, run_id, trial, resolved, dirs, checkpoints)
        ok = True
    finally:
        tracker.end_run(run_id, ok=ok)


def _fit(trial: TrialConfig, resolved: dict, dirs: dict, context: dict, run_id: str, name: str, worker: str,
         extra: dict):
    """Run one Ray Train stage of the trial (IFT or one restoration) to completion; raise on failure."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from forgetray.train.loop import ift_worker
    from forgetray.train.restore import restore_worker

    use_gpu = trial.gpus_per_worker > 0
    resources = {"CPU": trial.cpus_per_worker, **({"GPU": trial.gpus_per_worker} if use_gpu else {})}
    artifact_dirs = {"base": (dirs["base_eval_dir"], "probes/base"),
                     "epoch": (None, "probes/sft/epoch_{epoch:03d}"),
                     "restored": (None, "probes/restored/epoch_{epoch:03d}")}
    trainer = TorchTrainer(
        {"ift": ift_worker, "restore": restore_worker}[worker],
        train_loop_config={"trial": trial.to_dict(), "resolved": resolved, **dirs, **extra},
        scaling_config=ScalingConfig(num_workers=trial.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=dirs["trial_dir"],
            failure_config=FailureConfig(max_failures=trial.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # every epoch's model is kept for restoration
            callbacks=[TuneReportCallback(), make_report_logger(context["tracking_uri"], run_id, artifact_dirs)],
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def _restore_all(trial: TrialConfig, resolved: dict, dirs: dict, context: dict, run_id: str,
                 checkpoints: list[Path]) -> None:
    """Restore every epoch checkpoint: groups of `restore_group` checkpoints, each group one TorchTrainer restoring
    them in turn, all groups concurrently (Ray queues them on resources). One per group saves the worker start-up
    (seconds per process) where models are small; on a GPU cluster, groups of 1 restore every checkpoint at once."""
    from concurrent.futures import ThreadPoolExecutor

    from forgetray.train.restore import restored_checkpoint_name

    trial_dir = Path(dirs["trial_dir"])
    todo = [c for c in checkpoints if not (trial_dir / f"{restored_checkpoint_name(_epoch(c))}.done").is_file()]
    groups = [todo[i:i + trial.restore_group] for i in range(0, len(todo), trial.restore_group)]

    def restore(group: list[Path]) -> None:
        epochs = [_epoch(c) for c in group]
        _fit(trial, resolved, dirs, context, run_id, f"restore_{epochs[0]:03d}-{epochs[-1]:03d}", worker="restore",
             extra={"epochs": epochs, "sft_model_dirs": [str(c / "model") for c in group]})
        for epoch in epochs:  # finished in this execution: an interrupted sweep's resume skips it
            (trial_dir / f"{restored_checkpoint_name(epoch)}.done").write_text("ok\n")

    with ThreadPoolExecutor(max_workers=max(1, len(groups))) as pool:
        for future in [pool.submit(restore, g) for g in groups]:
            future.result()  # re-raise the first failure


def _epoch(checkpoint: Path) -> int:
    return int(checkpoint.name.split("_")[1])
