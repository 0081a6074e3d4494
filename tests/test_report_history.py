"""The report's bulk read (issue 19): each trial's `metrics/history.parquet`, one download per trial, must give the
same report files as reading every metric key of every run (the fallback for runs written before it existed).

The stores are test_report.py's (a real sqlite MLflow store filled with MlflowClient: the margin-rule, pre-margin-rule
and failed trials, a plain sweep, a replicated sweep with per-question artifacts), plus points that make the order
matter: a value logged again at a step it had (a later timestamp: it wins) and one logged after with an earlier
timestamp (it does not). Each trial's table is written by forgetray's own `tracking_history.write_history`.
"""

from __future__ import annotations

import filecmp

import pandas as pd
import pytest
from test_report import BENCH, EXPERIMENT, PLAIN, REPLICATED, _fill_plain_sweep, _fill_replicated, _fill_store

from forgetray.report import build_report
from forgetray.spec import SpecError
from forgetray.tracking import Tracker
from forgetray.tracking_history import HISTORY_ARTIFACT, TAG_HISTORY, forget_history, write_history

FALLBACK = "metric history read one key at a time"


def _trial_runs(client, experiment: str) -> dict[str, str]:
    """Trial name -> run id of the experiment's newest sweep run."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`forgetray.kind` = 'trial'")
    return {run.data.tags["forgetray.trial"]: run.info.run_id for run in runs}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("history-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    _fill_store(uri, root / "artifacts")
    _fill_plain_sweep(uri, root / "artifacts")
    _fill_replicated(uri, root / "artifacts", root / "tmp")
    client = MlflowClient(uri)
    alpha = _trial_runs(client, EXPERIMENT)["alpha"]
    stamp = max(m.timestamp for m in client.get_metric_history(alpha, f"sft/{BENCH}/knowledge"))
    client.log_batch(alpha, metrics=[Metric(f"sft/{BENCH}/knowledge", 0.11, stamp - 1000, 3),  # older: loses
                                     Metric(f"restored/{BENCH}/knowledge", 0.58, stamp + 1000, 2)])  # newer: wins
    tracker = Tracker(uri)
    for experiment in (EXPERIMENT, PLAIN, REPLICATED):
        for run_id in _trial_runs(client, experiment).values():
            assert write_history(tracker, run_id) > 0
    return {"uri": uri, "root": root, "client": client}


def _same_files(a, b, but: tuple[str, ...] = ()) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert any(name.endswith(".png") for name in names) and any(name.endswith(".csv") for name in names)
    for name in names:
        if name not in but:
            assert filecmp.cmp(a / name, b / name, shallow=False), f"{name} differs"


def _text_without(path, note: str) -> str:
    return "\n".join(line for line in path.read_text().splitlines() if note not in line)


@pytest.mark.parametrize("experiment", [EXPERIMENT, PLAIN, REPLICATED])
def test_bulk_and_per_key_reports_are_the_same_files(store, tmp_path, experiment):
    bulk = build_report(experiment, store["uri"], tmp_path / "bulk", log_to_mlflow=False)
    per_key = build_report(experiment, store["uri"], tmp_path / "per-key", log_to_mlflow=False,
                           per_key_history=True)
    assert not [note for note in bulk.notes if FALLBACK in note]  # every run was read from its table
    assert bulk.notes == per_key.notes
    _same_files(tmp_path / "bulk", tmp_path / "per-key")
    if experiment == EXPERIMENT:  # the re-logged points: the newest timestamp at a step wins, both ways
        alpha = bulk.stage_table[bulk.stage_table["trial"] == "alpha"].set_index("epoch")
        assert alpha.loc[3, "knowledge_sft"] == 0.45 and alpha.loc[2, "knowledge_restored"] == 0.58


def test_a_run_without_a_complete_table_is_read_per_key_with_a_note(store, tmp_path):
    """A run from before the table (no tag), and one reopened since (`forget_history`, as a resume does): read per
    key, named in a note; the report is otherwise the same."""
    client, tracker = store["client"], Tracker(store["uri"])
    beta = _trial_runs(client, EXPERIMENT)["beta"]
    forget_history(tracker, beta)
    assert TAG_HISTORY not in client.get_run(beta).data.tags
    try:
        bulk = build_report(EXPERIMENT, store["uri"], tmp_path / "bulk", log_to_mlflow=False)
        per_key = build_report(EXPERIMENT, store["uri"], tmp_path / "per-key", log_to_mlflow=False,
                               per_key_history=True)
    finally:
        write_history(tracker, beta)
    assert [note for note in bulk.notes if FALLBACK in note] == [
        f"{FALLBACK} (no complete {HISTORY_ARTIFACT}: written before forgetray stored it, or a run not finished "
        "since it was reopened) for 1 trial(s): beta"]
    _same_files(tmp_path / "bulk", tmp_path / "per-key", but=("stage_table.txt",))
    assert _text_without(tmp_path / "bulk" / "stage_table.txt", FALLBACK) == _text_without(
        tmp_path / "per-key" / "stage_table.txt", FALLBACK)


def _replace_table(client, run_id: str, frame: pd.DataFrame, tmp_path) -> None:
    path = tmp_path / run_id / "history.parquet"
    path.parent.mkdir(parents=True)
    frame.to_parquet(path, index=False)
    client.log_artifact(run_id, str(path), "metrics")


def test_a_table_that_disagrees_with_its_run_is_not_used(store, tmp_path):
    """A table missing a metric key (a writer's bug, or points logged after it) is caught against search_runs' latest
    metrics: that run is read per key, the note names it, the file and the key; the report stays right."""
    client, tracker = store["client"], Tracker(store["uri"])
    alpha = _trial_runs(client, EXPERIMENT)["alpha"]
    (tmp_path / "orig").mkdir()
    frame = pd.read_parquet(tracker.download_artifacts(alpha, HISTORY_ARTIFACT, tmp_path / "orig"))
    dropped = frame[frame["key"] != "stage/code"]
    _replace_table(client, alpha, dropped, tmp_path)
    client.set_tag(alpha, TAG_HISTORY, str(len(dropped)))
    try:
        bulk = build_report(EXPERIMENT, store["uri"], tmp_path / "bulk", log_to_mlflow=False)
    finally:
        write_history(tracker, alpha)
    notes = [note for note in bulk.notes if FALLBACK in note]
    assert len(notes) == 1 and notes[0].endswith(
        f"for 1 trial(s): alpha; alpha: its {HISTORY_ARTIFACT} disagrees with the run (1 metric keys missing, "
        "0 extra (e.g. stage/code))")
    per_key = build_report(EXPERIMENT, store["uri"], tmp_path / "per-key", log_to_mlflow=False, per_key_history=True)
    pd.testing.assert_frame_equal(bulk.stage_table, per_key.stage_table)


def test_an_unreadable_table_fails_naming_the_run_and_file(store, tmp_path):
    client, tracker = store["client"], Tracker(store["uri"])
    gamma = _trial_runs(client, EXPERIMENT)["gamma"]
    path = tmp_path / "history.parquet"
    path.write_bytes(b"not parquet")
    client.log_artifact(gamma, str(path), "metrics")
    try:
        with pytest.raises(SpecError, match=rf"run gamma \({gamma}\): {HISTORY_ARTIFACT} is unreadable"):
            build_report(EXPERIMENT, store["uri"], tmp_path / "out", log_to_mlflow=False)
    finally:
        write_history(tracker, gamma)


def test_history_of_orders_points_by_timestamp_keeping_mlflow_order_on_ties():
    from forgetray.report.history import history_of

    frame = pd.DataFrame({"key": ["a", "a", "a", "b", "a", "a"], "step": [1, 1, 2, 0, 1, 1],
                          "value": [1.0, 2.0, 3.0, 4.0, 5.0, 9.0], "timestamp": [10, 30, 10, 5, 30, 20]})
    # step 1 of a: 1.0 at t=10, 9.0 at t=20 (the last row, not the newest), 2.0 and 5.0 tie at t=30: the later row
    # of the tie (5.0) wins, as Tracker.metric_history's stable sort keeps MLflow's order
    assert history_of(frame, ["a", "b", "c"]) == {"a": {1: 5.0, 2: 3.0}, "b": {0: 4.0}, "c": {}}
    assert list(history_of(frame, ["a", "b"])) == ["a", "b"]
