"""Everything forgetray writes to or reads from MLflow. No other module imports mlflow (the Ray callback that
logs workers' reports as they arrive is `forgetray.callbacks`, which writes through this module).

Layout: one experiment per sweep name; one parent run per sweep execution; one nested run per trial whose params are
the flattened resolved config (trial settings, resolved sources, DeepSpeed and optimizer config) and whose metrics
are logged per checkpoint with step = epoch (0 = the base model). Metric names start with the model state they
describe (`base/`, `sft/`) or `train/`; the README lists them all.

All calls go through `MlflowClient` with explicit run ids: no global "active run", so concurrent trials (separate
processes, the Ray Train controller) never step on each other.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from forgetray.metrics import registry

TAG_KIND = "forgetray.kind"  # "sweep" | "trial"
TAG_SWEEP = "forgetray.sweep"
TAG_CONFIG_HASH = "forgetray.config_hash"
TAG_TRIAL = "forgetray.trial"
TAG_PARENT = "mlflow.parentRunId"  # what the MLflow UI nests by
TAG_RUN_NAME = "mlflow.runName"
TAG_TRANSITION = "forgetray.transition_epoch"  # first epoch classified actual forgetting, or "none"
TAG_STAGE_BENCHMARK = "forgetray.stage_benchmark"


def stage_tag(epoch: int) -> str:
    """The tag holding checkpoint `epoch`'s forgetting stage (its name)."""
    return f"forgetray.stage.epoch_{epoch:03d}"


def default_tracking_uri(results_dir: Path) -> str:
    """A local sqlite store beside the results: no server needed; `mlflow ui --backend-store-uri URI` browses it."""
    return f"sqlite:///{Path(results_dir).resolve() / 'mlflow.db'}"


class Tracker:
    def __init__(self, tracking_uri: str, artifact_root: Path | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.artifact_root = artifact_root

    # --- runs ---
    def experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.artifact_root is not None and self.uri.startswith("sqlite:"):
            # A sqlite store keeps artifacts in ./mlruns of the *current directory* by default: pin them instead.
            location = (Path(self.artifact_root).resolve() / name).as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def start_sweep_run(self, sweep_name: str, execution: str, params: dict) -> str:
        run = self.client.create_run(
            self.experiment_id(sweep_name), run_name=f"{sweep_name}-{execution}",
            tags={TAG_KIND: "sweep", TAG_SWEEP: sweep_name},
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def start_trial_run(self, sweep_name: str, parent_run_id: str, trial_name: str, config_hash: str,
                        params: dict) -> str:
        run = self.client.create_run(
            self.experiment_id(sweep_name), run_name=trial_name,
            tags={TAG_KIND: "trial", TAG_SWEEP: sweep_name, TAG_PARENT: parent_run_id, TAG_CONFIG_HASH: config_hash,
                  TAG_TRIAL: trial_name},
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        """A resumed sweep or trial continues in its run (status back to RUNNING) instead of making a duplicate."""
        self.client.update_run(run_id, status="RUNNING")

    def end_run(self, run_id: str, ok: bool) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        self.client.set_tag(run_id, key, str(value))

    # --- data ---
    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # the REST API accepts at most 100 params per batch
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000])

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_table(self, run_id: str, frame: pd.DataFrame, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            if path.suffix == ".parquet":
                frame.to_parquet(path)
            else:
                frame.to_csv(path, index=False)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(run_id, str(path), None if parent == "." else parent)

    # --- reading back ---
    def get_run(self, run_id: str):
        return self.client.get_run(run_id)

    def sweep_runs(self, experiment_name: str) -> list:
        """The experiment's sweep executions (parent runs), newest first."""
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            return []
        return self.client.search_runs([experiment.experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'sweep'",
                                       order_by=["attributes.start_time DESC"], max_results=1000)

    def download_artifacts(self, run_id: str, path: str, dst: Path) -> Path:
        return Path(self.client.download_artifacts(run_id, path, str(dst)))

    def list_artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        return [f.path for f in self.client.list_artifacts(run_id, path)]

    def trial_runs(self, parent_run_id: str) -> list:
        parent = self.client.get_run(parent_run_id)
        return self.client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'",
            max_results=10_000,
        )

    def metric_history(self, run_id: str, names: Iterable[str]) -> dict[str, dict[int, float]]:
        """name -> {step: last value logged at that step}."""
        out: dict[str, dict[int, float]] = {}
        for name in names:
            out[name] = {m.step: m.value for m in sorted(self.client.get_metric_history(run_id, name),
                                                         key=lambda m: m.timestamp)}
        return out

    def checkpoint_table(self, parent_run_id: str) -> pd.DataFrame:
        """One row per (trial, checkpoint): the trial's varying settings and every metric at that step."""
        rows = []
        for run in self.trial_runs(parent_run_id):
            # Only metrics logged per epoch are checkpoints' (not fine-grained steps or restoring trajectories).
            names = [n for n in run.data.metrics if _per_epoch(n)]
            history = self.metric_history(run.info.run_id, names)
            steps = sorted({step for values in history.values() for step in values})
            base = {name: values[0] for name, values in history.items()
                    if registry.parse(name)[1].get("state") == "base" and 0 in values}
            for step in steps:
                if step == 0:
                    continue
                row = {"trial": run.data.tags.get(TAG_TRIAL, run.info.run_name), "run_id": run.info.run_id,
                       "status": run.info.status, "epoch": step, **base,
                       "stage": run.data.tags.get(stage_tag(step))}
                row.update({name: values[step] for name, values in history.items() if step in values})
                for key, value in run.data.params.items():
                    if key.startswith("trial."):
                        row[key[len("trial."):]] = value
                rows.append(row)
        if not rows:
            return pd.DataFrame(columns=["trial", "epoch"])
        return pd.DataFrame(rows).sort_values(["trial", "epoch"], ignore_index=True)


def _per_epoch(name: str) -> bool:
    found = registry.parse(name)
    return found is not None and found[0].step == "epoch"


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5990] + "...(cut)"


# --- the Ray Train side: log each report as it arrives ---
