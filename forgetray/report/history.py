"""The trials' metric histories, read in bulk: one `metrics/history.parquet` download per trial
(`forgetray.tracking_history`) instead of one request per metric key.

A run is read from its table when it carries the `forgetray.history` tag (the table is complete) and the table
agrees with what search_runs already returned for it: the same metric keys, the same row count as the tag, and each
key's latest point (MLflow's rule: the largest (step, timestamp, value)) equal to the run's latest value. Otherwise
(a run written before issue 19, a run reopened and not finished since, a table that disagrees) the run is read one
key at a time as before, and the report says so in a note. Both ways give the same `{name: {step: value}}`: per key,
points ordered by timestamp (ties in MLflow's order), the last at a step wins (`Tracker.metric_history`'s rule).

The functions above `load_histories` are pure (frames and dicts in, dicts out); it makes the MLflow calls.
"""

from __future__ import annotations

import math
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from forgetray.spec import SpecError
from forgetray.tracking import Tracker
from forgetray.tracking_history import HISTORY_ARTIFACT, HISTORY_COLUMNS, TAG_HISTORY, fetch_artifact, forgetray_keys

History = dict[str, dict[int, float]]
DOWNLOAD_THREADS = 8  # the downloads wait on the network (or the disk), not on this process's CPU


def history_of(frame: pd.DataFrame, keys: list[str]) -> History:
    """`{key: {step: value}}` from a history table, for `keys` (sorted, as the per-key path reads them)."""
    out: History = {key: {} for key in keys}
    columns = [frame[column].tolist() for column in HISTORY_COLUMNS]
    rows = sorted(zip(*columns), key=lambda row: row[3])  # stable: a timestamp tie keeps MLflow's order
    for key, step, value, _ in rows:
        if key in out:
            out[key][int(step)] = float(value)
    return out


def disagreement(frame: pd.DataFrame, tagged_rows: str, latest: dict[str, float]) -> str | None:
    """Why the table is not the run's whole history (None when it is): its rows against the tag, its keys and each
    key's latest point against the run's latest metrics (search_runs' `run.data.metrics`)."""
    if missing := set(HISTORY_COLUMNS) - set(frame.columns):
        return f"columns {sorted(missing)} missing"
    if str(len(frame)) != str(tagged_rows).strip():
        return f"{len(frame)} rows, the tag {TAG_HISTORY} says {tagged_rows}"
    keys, wanted = set(frame["key"]), set(forgetray_keys(latest))
    if keys != wanted:
        shown = sorted(wanted - keys)[:3] or sorted(keys - wanted)[:3]
        return f"{len(wanted - keys)} metric keys missing, {len(keys - wanted)} extra (e.g. {', '.join(shown)})"
    last: dict[str, tuple] = {}
    for key, step, value, stamp in zip(*(frame[column].tolist() for column in HISTORY_COLUMNS)):
        rank = (step, stamp, 0.0 if math.isnan(value) else value)  # MLflow ranks a NaN as 0
        if key not in last or rank >= last[key][0]:
            last[key] = (rank, value)
    for key, (_, value) in last.items():
        expected = latest[key]
        if not (value == expected or (math.isnan(value) and math.isnan(expected))):
            return f"{key}: latest value {value!r} in the table, {expected!r} in the run"
    return None


def fallback_note(names: list[str], reasons: dict[str, str]) -> str:
    """One note for the trials read per metric key; a table that disagreed is named with why."""
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    note = (f"metric history read one key at a time (no complete {HISTORY_ARTIFACT}: written before forgetray "
            f"stored it, or a run not finished since it was reopened) for {len(names)} trial(s): {shown}")
    for name, reason in list(reasons.items())[:5]:
        note += f"; {name}: its {HISTORY_ARTIFACT} disagrees with the run ({reason})"
    return note


def load_histories(tracker: Tracker, runs: list[Any], names: dict[str, str],
                   per_key: bool = False) -> tuple[dict[str, History], list[str]]:
    """Every run's history (run id -> history) and the notes. `names`: run id -> trial name, for the notes and
    errors. `per_key`: read every run one key at a time (the fallback, forced; no note)."""
    keys = {run.info.run_id: forgetray_keys(run.data.metrics) for run in runs}
    tagged = [] if per_key else [run for run in runs if TAG_HISTORY in run.data.tags]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
        def table(run: Any) -> pd.DataFrame | None:
            run_id = run.info.run_id
            local = fetch_artifact(tracker, run.info.artifact_uri, HISTORY_ARTIFACT, Path(tmp) / run_id)
            if local is None:
                return None
            try:
                return pd.read_parquet(local)
            except Exception as exc:  # noqa: BLE001 (re-raised naming the run and the file)
                raise SpecError(f"run {names[run_id]} ({run_id}): {HISTORY_ARTIFACT} is unreadable: "
                                f"{type(exc).__name__}: {exc}") from exc

        tables = dict(zip((run.info.run_id for run in tagged), pool.map(table, tagged)))
    histories: dict[str, History] = {}
    fallen: list[str] = []
    reasons: dict[str, str] = {}
    for run in runs:
        run_id = run.info.run_id
        frame = tables.get(run_id)
        if frame is None:
            why = f"tagged {TAG_HISTORY} but the file is missing" if run_id in tables else None
        else:
            why = disagreement(frame, run.data.tags[TAG_HISTORY], run.data.metrics)
        if frame is not None and why is None:
            histories[run_id] = history_of(frame, keys[run_id])
            continue
        histories[run_id] = tracker.metric_history(run_id, keys[run_id])
        if not per_key:
            fallen.append(names[run_id])
            if why is not None:
                reasons[names[run_id]] = why
    return histories, [fallback_note(sorted(fallen), reasons)] if fallen else []
