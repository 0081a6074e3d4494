"""The trial driver: the function Ray Tune runs for one point of the grid.

It attaches the trial to its MLflow run (re-attaching on resume), then runs instruction fine-tuning as one Ray Train
`TorchTrainer` whose workers run `forgetray.train.loop.ift_worker` under DeepSpeed. The trainer's storage folder is
derived from the trial's config hash, so a re-run of the same trial (Tune retry, `--resume`) finds Ray Train's
snapshot there and continues from the last checkpoint.
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
    """What the base evaluation depends on: the model and the probe suite, not the IFT settings."""
    parts = {
        "model": resolved["model"]["path"],
        "precision": trial.precision,
        "benchmarks": {k: [v["path"], v["score"]] for k, v in resolved["benchmarks"].items()},
        "probe_set": resolved["probe_set"]["path"],
        "probe": [trial.n_shot, trial.probe_passages, trial.probe_max_length],
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]
    return f"{trial.model.rstrip('/').split('/')[-1]}-{digest}"


def trial_params(trial: TrialConfig, resolved: dict) -> dict:
    """The flattened resolved config: what MLflow shows as the trial's params."""
    return flatten({
        "trial": trial.to_dict(),
        "resolved": {
            "model": resolved["model"],
            "dataset": resolved["dataset"],
            "benchmarks": {name: {"path": b["path"], "score": b["score"]} for name, b in resolved["benchmarks"].items()},
            "probe_set": resolved["probe_set"],
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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from forgetray.train.loop import ift_worker

    context, index = config["context"], config["trial_index"]
    trial = TrialConfig.from_dict(context["trials"][index])
    resolved = context["resolved"][index]
    execution_dir = Path(context["execution_dir"])
    trial_dir = execution_dir / "trials" / trial_key(trial)
    tracker = Tracker(context["tracking_uri"])
    run_id = attach_trial_run(tracker, context, trial, resolved, trial_dir)
    base_eval_dir = str(execution_dir / "base_eval" / base_eval_key(trial, resolved))

    use_gpu = trial.gpus_per_worker > 0
    resources = {"CPU": trial.cpus_per_worker, **({"GPU": trial.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        ift_worker,
        train_loop_config={"trial": trial.to_dict(), "resolved": resolved, "base_eval_dir": base_eval_dir},
        scaling_config=ScalingConfig(num_workers=trial.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name="ift",
            storage_path=str(trial_dir),
            failure_config=FailureConfig(max_failures=trial.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # every epoch's model is kept for restoration
            callbacks=[TuneReportCallback(), make_report_logger(context["tracking_uri"], run_id, base_eval_dir)],
        ),
    )
    try:
        result = trainer.fit()
    except BaseException:
        tracker.end_run(run_id, ok=False)
        raise
    tracker.end_run(run_id, ok=result.error is None)
    if result.error is not None:
        raise result.error
    # Nothing is returned: Tune would record a return value as one more (metric-less) result.
