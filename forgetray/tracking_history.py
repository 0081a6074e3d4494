"""A trial run's whole metric history as one artifact, and the MLflow calls that read a sweep's runs in bulk (issue 19).

MLflow returns a run's metric history one key per request (`get_metric_history`): ~60 requests per quickstart trial,
so reading a 1,000-trial sweep through a tracking server took hours. Instead each trial run, as it ends, stores every
point it has as one Parquet table, `metrics/history.parquet` (columns key, step, value, timestamp; each key's points
in the order MLflow returns them), and then tags itself `forgetray.history` = the table's row count. The tag comes
last, so a run killed while writing has no tag; reopening a run (`--resume`) removes it before anything more is
logged, so a table left by an earlier execution is never taken for the whole history. `forgetray.report.history`
reads it (one download per trial), falling back to one request per key for a run without the tag.

MLflow's own system metrics (`system/...`) are left out of the table: its monitor may still be sampling into the
run of a shared worker group after this member has ended, and the report reads none of them.

With `forgetray.tracking`, the only module that imports mlflow.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

import pandas as pd

from forgetray.tracking import TAG_PARENT, Tracker, retrying

HISTORY_ARTIFACT = "metrics/history.parquet"
TAG_HISTORY = "forgetray.history"  # the row count of metrics/history.parquet, set once the table is complete
HISTORY_COLUMNS = ("key", "step", "value", "timestamp")
SYSTEM_PREFIX = "system/"
SEARCH_PAGE = 1000  # runs per search_runs request


def forgetray_keys(names: Iterable[str]) -> list[str]:
    """The metric names forgetray logged (not MLflow's system metrics), sorted."""
    return sorted(name for name in names if not name.startswith(SYSTEM_PREFIX))


def write_history(tracker: Tracker, run_id: str) -> int:
    """Store the run's metric history as `metrics/history.parquet` (with its CSV copy, what the UI previews), then
    tag the run `forgetray.history` = its row count; returns the count. Retried like every write."""
    run = retrying(tracker.client.get_run, run_id, what="read run")
    rows = [(key, m.step, m.value, m.timestamp) for key in forgetray_keys(run.data.metrics)
            for m in retrying(tracker.client.get_metric_history, run_id, key, what="read metric history")]
    frame = pd.DataFrame(rows, columns=list(HISTORY_COLUMNS)).astype(
        {"key": str, "step": "int64", "value": "float64", "timestamp": "int64"})
    folder, name = HISTORY_ARTIFACT.rsplit("/", 1)
    with tempfile.TemporaryDirectory() as tmp:
        frame.to_parquet(Path(tmp) / name, index=False)
        tracker.log_artifacts(run_id, Path(tmp), folder)
    tracker.set_tag(run_id, TAG_HISTORY, len(frame))
    return len(frame)


def forget_history(tracker: Tracker, run_id: str) -> None:
    """A reopened run will log more: its table (if any) is no longer the whole history, so drop the tag that says
    it is (the next `write_history` replaces the table)."""
    run = retrying(tracker.client.get_run, run_id, what="read run")
    if TAG_HISTORY in run.data.tags:
        retrying(tracker.client.delete_tag, run_id, TAG_HISTORY, what="delete tag")


def search_trial_runs(tracker: Tracker, experiment_id: str, parent_run_id: str) -> list:
    """Every run nested under the parent run, with its params, tags and latest metrics: one request per
    `SEARCH_PAGE` runs."""
    runs, token = [], None
    while True:
        page = tracker.client.search_runs([experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'",
                                          max_results=SEARCH_PAGE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def fetch_artifact(tracker: Tracker, artifact_uri: str, path: str, dst: Path) -> Path | None:
    """One file of a run's artifacts (the run's `info.artifact_uri`, as search_runs gives it) into `dst`, in one
    request; None when the run has no such file. Any other error (a store that does not answer, a path that is a
    folder) propagates.

    `MlflowClient.download_artifacts` costs three requests for one file (the run, to find its artifact root; a
    listing, to tell a file from a folder; the file), so this goes to the artifact repository's `_download_file`,
    the one method every MLflow artifact repository implements to fetch a single file."""
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(artifact_uri, tracking_uri=tracker.uri)
    dst.mkdir(parents=True, exist_ok=True)
    local = dst / Path(path).name
    try:
        repo._download_file(path, str(local))
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    except requests.HTTPError as exc:  # the tracking server's artifact proxy answers a missing file with 404
        if exc.response is not None and exc.response.status_code == 404:
            local.unlink(missing_ok=True)
            return None
        raise
    return local



def set_tags(tracker: Tracker, run_id: str, tags: dict) -> None:
    """Many tags of one run in one request per 1,000 (the REST API's log_batch limit), retried like every write: a
    replicated sweep's pooled verdicts are ~2 tags per trial, one request each before."""
    from mlflow.entities import RunTag

    items = [RunTag(str(key), str(value)) for key, value in tags.items()]
    for start in range(0, len(items), 1000):
        retrying(tracker.client.log_batch, run_id, tags=items[start:start + 1000], what="set tags")
