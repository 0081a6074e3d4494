"""Everything forgetray writes to or reads from MLflow. No other module imports mlflow but `tracking_history` (a run's
metric history as one artifact, bulk reads); the Ray callback that logs reports is `callbacks`, writing through here.

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
# What the MLflow UI (3.x) reads: a run's / an experiment's description (markdown) and the experiment's kind (shown
# on its page; 3.17 takes its GenAI / Model training mode from the link instead: forgetray.ui). Saved views: forgetray.ui.charts_view.
TAG_NOTE = "mlflow.note.content"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's classic ML view: runs table, charts, artifacts
# MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) logged by the rank-0 worker of each
# Ray Train run into the trial's run: "auto" (default) = when the trial has GPUs, "1" = always, "0" = never.
SYSTEM_METRICS_ENV = "FORGETRAY_SYSTEM_METRICS"
TAG_ERROR = "forgetray.error"  # why a failed trial failed (its first line: exception type and message)
# "<cohort key>:<position>": the Ray Train run a trial shared with the other replicates of its grid point
# (forgetray.sharing.cohorts), and its place in that run's order
TAG_COHORT = "forgetray.cohort"
# The run id of the trial that trained the trajectory a trial's results come from (forgetray.sharing: epoch prefixes),
# on the leader (its own id) and on each follower.
TAG_TRAJECTORY = "forgetray.trajectory"

# A tracking server that is down (restarting) or a sqlite store that is locked by another process is waited for: every
# write and the reads the callback needs are retried with backoff for up to this many seconds, then the caller
# (a trial) fails with TrackingUnavailable. Writes are idempotent on retry (same metric timestamps).
RETRY_ENV = "FORGETRAY_TRACKING_RETRY_S"
DEFAULT_RETRY_S = 600.0


class TrackingUnavailable(RuntimeError):
    """The tracking store did not answer within the retry bound."""


DATASET_ATTEMPTS = 4  # tries of one dataset logging that lost a race (below: Tracker.log_datasets)


def _causes(exc: BaseException):
    """The exception and the ones behind it (`raise ... from`, or raised while handling), each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _transient(exc: BaseException) -> bool:
    """A server that is down or restarting, a connection cut or timed out, a database that is locked or gone: worth
    retrying; told by the exception's class (or that of one behind it), never by its message. MLflow's own word
    counts: an MlflowException with error code TEMPORARILY_UNAVAILABLE (HTTP 503, and how its SQL stores report
    sqlalchemy's OperationalError: sqlite's "database is locked") or DEADLINE_EXCEEDED (504). Its HTTP client has
    already retried 429/5xx and connection errors itself, and wraps what is left in a plain MlflowException raised
    while handling the requests error, found behind it. A request the server answered with a client error (bad
    parameter, missing run) is not transient."""
    import requests.exceptions
    import sqlalchemy.exc
    import urllib3.exceptions
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, TEMPORARILY_UNAVAILABLE, ErrorCode

    retry = (ConnectionError, TimeoutError,  # the built-in ones: refused, reset, broken pipe, socket timeouts
             requests.exceptions.ConnectionError, requests.exceptions.Timeout,
             requests.exceptions.RetryError,  # MLflow's client retries on 429/5xx ran out
             urllib3.exceptions.ProtocolError, urllib3.exceptions.MaxRetryError, urllib3.exceptions.TimeoutError,
             sqlalchemy.exc.OperationalError)
    codes = {ErrorCode.Name(TEMPORARILY_UNAVAILABLE), ErrorCode.Name(DEADLINE_EXCEEDED)}
    return any(isinstance(e, retry) or (isinstance(e, MlflowException) and e.error_code in codes)
               for e in _causes(exc))


def retrying(call, *args, what: str = "MLflow call", bound_s: float | None = None, **kwargs):
    """`call(*args, **kwargs)`, retried on transient tracking errors (`_transient`) with
    exponential backoff (1 s doubling to 30 s) for up to `bound_s` seconds (default: $FORGETRAY_TRACKING_RETRY_S or
    600 s)."""
    import logging
    import os
    import time

    bound = float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S)) if bound_s is None else bound_s
    deadline, delay = time.monotonic() + bound, 1.0
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 (filtered by _transient)
            if not _transient(exc):
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TrackingUnavailable(f"{what}: the tracking store did not answer for {bound:.0f} s "
                                          f"({RETRY_ENV}); last error: {type(exc).__name__}: "
                                          f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from exc
            logging.getLogger(__name__).warning("%s failed (%s), retrying in %.0f s", what,
                                                str(exc).splitlines()[0][:200] if str(exc) else exc, delay)
            time.sleep(min(delay, remaining))
            delay = min(30.0, delay * 2)


def stage_tag(epoch: int) -> str:
    """The tag holding checkpoint `epoch`'s forgetting stage (its name)."""
    return f"forgetray.stage.epoch_{epoch:03d}"


DEFAULT_RESULTS = Path("forgetray-results")  # `forgetray run`'s results folder when given no --storage / --tracking-uri


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
        return self.client.create_experiment(name, artifact_location=location, tags={
            TAG_EXPERIMENT_KIND: EXPERIMENT_KIND, TAG_NOTE: experiment_note(name)})

    def start_sweep_run(self, sweep_name: str, execution: str, params: dict, description: str = "") -> str:
        experiment_id = self.experiment_id(sweep_name)
        experiment = self.client.get_experiment(experiment_id)
        if experiment.tags.get(TAG_EXPERIMENT_KIND) != EXPERIMENT_KIND:  # made by an older forgetray, or by hand
            self.client.set_experiment_tag(experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        if TAG_NOTE not in experiment.tags:
            self.client.set_experiment_tag(experiment_id, TAG_NOTE, experiment_note(sweep_name))
        run = self.client.create_run(
            experiment_id, run_name=f"{sweep_name}-{execution}",
            tags={TAG_KIND: "sweep", TAG_SWEEP: sweep_name, TAG_NOTE: description or f"Sweep {sweep_name!r}."},
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def start_trial_run(self, sweep_name: str, parent_run_id: str, trial_name: str, config_hash: str,
                        params: dict, run_name: str | None = None, description: str = "",
                        tags: dict | None = None) -> str:
        """`trial_name` (tag forgetray.trial) identifies the trial; `run_name` is what the UI shows (the swept
        settings first, so its truncated column still tells trials apart); `tags`: more tags, there from the start."""
        run = self.client.create_run(
            self.experiment_id(sweep_name), run_name=run_name or trial_name,
            tags={TAG_KIND: "trial", TAG_SWEEP: sweep_name, TAG_PARENT: parent_run_id, TAG_CONFIG_HASH: config_hash,
                  TAG_TRIAL: trial_name, **({TAG_NOTE: description} if description else {}), **(tags or {})},
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        """A resumed sweep or trial continues in its run (status back to RUNNING) instead of making a duplicate."""
        retrying(self.client.update_run, run_id, status="RUNNING", what="reopen run")

    def end_run(self, run_id: str, ok: bool) -> None:
        retrying(self.client.set_terminated, run_id, status="FINISHED" if ok else "FAILED", what="end run")

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        retrying(self.client.set_tag, run_id, key, str(value), what="set tag")

    def find_trial_run(self, parent_run_id: str, config_hash: str) -> str | None:
        """The trial run of this config under the parent, if one was created (a driver killed right after creating
        it, before storing its id, must not make the next execution create a second one)."""
        runs = [r for r in self.trial_runs(parent_run_id) if r.data.tags.get(TAG_CONFIG_HASH) == config_hash]
        return min(runs, key=lambda r: r.info.start_time).info.run_id if runs else None

    def logged_steps(self, run_id: str, name: str) -> set[int]:
        """The steps at which `name` is logged (retried like a write: the callback needs it before logging)."""
        return {m.step for m in retrying(self.client.get_metric_history, run_id, name, what="read metric history")}

    # --- data ---
    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # the REST API accepts at most 100 params per batch
            retrying(self.client.log_batch, run_id, params=items[start:start + 100], what="log params")

    def log_metrics(self, run_id: str, metrics: dict, step: int) -> None:
        self.log_points(run_id, [(name, value, step) for name, value in metrics.items()])

    def log_points(self, run_id: str, points: list[tuple[str, float, int]]) -> None:
        """(name, value, step) points, each at its own step, in one batch up to 1000 points: a report's metrics land
        together (a driver killed while logging it leaves all of it or none, never a part)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v, step in points
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for start in range(0, len(items), 1000):  # a retry re-sends the same timestamps: the store keeps one copy
            retrying(self.client.log_batch, run_id, metrics=items[start:start + 1000], what="log metrics")

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str) -> None:
        """The folder as is, plus a CSV beside each Parquet file (`x.parquet` -> `x.csv`): the UI previews CSV,
        not Parquet."""
        self._log_csv_copies(run_id, Path(local_dir), artifact_path)
        retrying(self.client.log_artifacts, run_id, str(local_dir), artifact_path, what="log artifacts")

    def log_table(self, run_id: str, frame: pd.DataFrame, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            if path.suffix == ".parquet":
                frame.to_parquet(path)
                frame.to_csv(path.with_suffix(".csv"), index=False)  # what the UI previews
                self.client.log_artifact(run_id, str(path.with_suffix(".csv")),
                                         None if str(Path(artifact_file).parent) == "." else str(Path(artifact_file).parent))
            else:
                frame.to_csv(path, index=False)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(run_id, str(path), None if parent == "." else parent)

    def _log_csv_copies(self, run_id: str, local_dir: Path, artifact_path: str) -> None:
        parquets = sorted(p for p in local_dir.rglob("*.parquet") if not p.with_suffix(".csv").exists())
        if not parquets:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for path in parquets:
                target = Path(tmp) / path.relative_to(local_dir).with_suffix(".csv")
                target.parent.mkdir(parents=True, exist_ok=True)
                pd.read_parquet(path).to_csv(target, index=False)
            self.client.log_artifacts(run_id, tmp, artifact_path)

    def log_datasets(self, run_id: str, datasets: list[dict]) -> None:
        """The run's inputs as MLflow datasets (the UI's Dataset column and the run's overview): each
        {"name", "source", "digest", "context", "source_type", "profile"}; `context` (training, evaluation, ...) is
        the input tag mlflow.data.context."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"],
                                       source=json.dumps({"uri": d["source"]}),
                                       profile=json.dumps(d.get("profile") or {})),
                               tags=[InputTag("mlflow.data.context", d["context"])]) for d in datasets]
        if not inputs:
            return
        import time

        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import BAD_REQUEST, ErrorCode

        # Trials of one sweep log the same dataset at once; MLflow's SQL store checks-then-inserts it, so all but one
        # lose the race on its unique row. The store reports sqlalchemy's IntegrityError as BAD_REQUEST, directly or
        # from a tracking server (which sends only the code and message), and the loser's next try finds the row and
        # links to it. So BAD_REQUEST is retried a few times here only: a request that is really bad fails again.
        for attempt in range(1, DATASET_ATTEMPTS + 1):
            try:
                return retrying(self.client.log_inputs, run_id, datasets=inputs, what="log datasets")
            except MlflowException as exc:
                if exc.error_code != ErrorCode.Name(BAD_REQUEST) or attempt == DATASET_ATTEMPTS:
                    raise
                time.sleep(0.5 * attempt)

    # --- reading back ---
    def get_run(self, run_id: str):
        return self.client.get_run(run_id)

    def has_metrics(self, run_id: str) -> bool:
        """Whether anything was logged into the run yet (retried while the store is down)."""
        return bool(retrying(self.client.get_run, run_id, what="read run").data.metrics)

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


def metric_guide() -> str:
    """Markdown: what `step` means for each family of metrics (the UI's chart sections: a metric's name up to its
    last '/'), generated from the registry."""
    lines = []
    for meaning, (_, text) in registry.STEPS.items():
        sections: dict[str, None] = {}
        for m in registry.METRICS:
            if m.step != meaning:
                continue
            shown = m.pattern.rsplit("/", 1)[0]
            if "{state}" in shown:
                shown = shown.replace("{state}", "{" + ",".join(m.states) + "}" if len(m.states) > 1 else m.states[0])
            for field in m.fields:
                shown = shown.replace("{" + field + "}", f"<{field}>")
            sections[f"`{shown}/`"] = None
        if sections:
            lines.append(f"- step = **{text}**: {', '.join(sections)}")
    lines.append("- `system/`: MLflow's system metrics (when enabled), step = sample number")
    return "\n".join(lines)


def experiment_note(name: str) -> str:
    return (f"forgetray sweep **{name}**: one parent run per execution of the sweep (`forgetray.kind = sweep`), "
            "one nested run per trial (`forgetray.kind = trial`), named by the settings the sweep varies.\n\n"
            "The parent runs are collapsed in the runs table; expand one (or open the link `forgetray run` prints, "
            "also in the parent run's description) to chart its trials. What `step` means, by chart section:\n\n"
            + metric_guide())


def system_metrics_wanted(setting: str | None, gpus_per_worker: float) -> bool:
    setting = (setting or "auto").strip().lower()
    return gpus_per_worker > 0 if setting == "auto" else setting in ("1", "true", "yes", "on")


class system_metrics:  # noqa: N801 (a context manager used like a function)
    """MLflow's system metrics monitor logging into `run_id` while the block runs (`system/...`, continuing the
    run's earlier samples). Needs psutil (nvidia-ml-py for GPU metrics)."""

    def __init__(self, tracking_uri: str, run_id: str, sampling_interval: float = 10):
        self.args = (tracking_uri, run_id, sampling_interval)
        self.monitor = None

    def __enter__(self):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        tracking_uri, run_id, interval = self.args
        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True,
                                            tracking_uri=tracking_uri)
        self.monitor.start()
        return self

    def __exit__(self, *exc):
        self.monitor.finish()
        return False


def _per_epoch(name: str) -> bool:
    found = registry.parse(name)
    return found is not None and found[0].step == "epoch"


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5990] + "...(cut)"


# --- the Ray Train side: log each report as it arrives ---
