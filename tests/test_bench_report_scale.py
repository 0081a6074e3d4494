"""Smoke test of bench/bench_report_scale.py (issue 19 item 2), small: test_report.py's replicated store (6 trials with
per-question artifacts, as forgetray logs them) copied to 18 trials, reported through a real `mlflow server`, read
in bulk and per metric key. The bulk path must send at most 3 requests per trial (2: the history table and the
per-question file) plus the report's fixed ones, the per-key path more, and both must write the same files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_report import REPLICATED, _fill_replicated

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_report_scale as bench  # noqa: E402

N = 18
FIXED = 40  # requests of a report that name no trial: find the experiment and the sweep run, search, log the files


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale-source")
    _fill_replicated(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", root / "tmp")
    return root / "mlflow.db"


def test_store_copies_every_trial_with_its_history_table(source, tmp_path):
    from mlflow.tracking import MlflowClient

    from forgetray.tracking import Tracker
    from forgetray.tracking_history import HISTORY_ARTIFACT, TAG_HISTORY

    store = bench.build_store(source, tmp_path / "store", N, REPLICATED)
    client = MlflowClient(store["uri"])
    runs = Tracker(store["uri"]).trial_runs(store["parent"])
    assert sorted(run.info.run_id for run in runs) == sorted(store["trials"]) and len(runs) == N
    originals = {run.data.tags["forgetray.trial"]: run for run in runs if "-c" not in run.data.tags["forgetray.trial"]}
    for run in runs:
        name = run.data.tags["forgetray.trial"]
        original = originals[name.split("-c")[0]]
        assert run.data.metrics == original.data.metrics and TAG_HISTORY in run.data.tags
        assert {k: v for k, v in run.data.params.items() if k != "trial.weight_decay"} == {
            k: v for k, v in original.data.params.items() if k != "trial.weight_decay"}
        assert HISTORY_ARTIFACT in [f.path for f in client.list_artifacts(run.info.run_id, "metrics")]


def test_server_bulk_reads_cost_at_most_3_requests_per_trial_and_match_per_key(source, tmp_path):
    store = bench.build_store(source, tmp_path / "store", N, REPLICATED)
    bench.serve_artifacts_by_server(store)
    with bench.mlflow_server(store, tmp_path / "server.log") as url:
        bulk = bench.run_report(url, store, tmp_path / "bulk", per_key=False)
        per_key = bench.run_report(url, store, tmp_path / "per-key", per_key=True)
    assert bulk["error"] is None and per_key["error"] is None
    assert not [note for note in bulk["notes"] if "one key at a time" in note]
    assert bulk["naming_trials"] <= 3 * N and bulk["requests"] - bulk["naming_trials"] <= FIXED
    assert per_key["naming_trials"] > bulk["naming_trials"]
    assert bench.access_log_requests(tmp_path / "server.log") == bulk["requests"] + per_key["requests"] + 1  # /health
    assert bench.differing_files(tmp_path / "bulk", tmp_path / "per-key") == []
    assert len(list((tmp_path / "bulk").glob("*.png"))) >= 2
