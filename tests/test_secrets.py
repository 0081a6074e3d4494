"""No secret is ever logged: a real tiny sweep (`forgetray run` in a subprocess, its own local Ray cluster, so the
Ray workers inherit the same environment) runs with fake credentials set, and the whole MLflow store is searched
for them: the sqlite file's bytes (params, tags, notes, metrics, datasets, experiment tags) and every artifact's
bytes. The same run checks that `FORGETRAY_SYSTEM_METRICS=1` wires MLflow's system metrics into the trial runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Fake values, each unique enough that a hit can only be a leak.
SECRETS = {
    "HF_TOKEN": "hf_FAKEforgetraySECRET0001",
    "HUGGING_FACE_HUB_TOKEN": "hf_FAKEforgetraySECRET0002",
    "MLFLOW_TRACKING_PASSWORD": "FAKEforgetraySECRET0003",
    "MLFLOW_TRACKING_TOKEN": "FAKEforgetraySECRET0004",
    "AWS_ACCESS_KEY_ID": "AKIAFAKEFORGETRAY0005",
    "AWS_SECRET_ACCESS_KEY": "FAKEforgetraySECRET0006/abc+def",
    "AWS_SESSION_TOKEN": "FAKEforgetraySECRET0007",
    "RAY_AUTH_TOKEN": "FAKEforgetraySECRET0008",
    "WANDB_API_KEY": "FAKEforgetraySECRET0009",
}

SWEEP_FILE = """
# forgetray run secrets_sweep.py
from forgetray import Sweep, grid
sweep = Sweep("secrets-check", model={model!r}, dataset={dataset!r}, benchmarks=[{bench!r}], probe_set={probe!r},
              lr=grid([1e-3, 2e-3]), epochs=1, batch_size=8, max_length=256, probe_passages=8, max_concurrent_trials=1)
"""


def test_no_secret_reaches_the_store(tmp_path, fixture_files):
    (tmp_path / "secrets_sweep.py").write_text(SWEEP_FILE.format(
        model=str(fixture_files["model"]), dataset=str(fixture_files["dataset"]),
        bench=str(fixture_files["benchmark"]), probe=str(fixture_files["probe_set"])))
    uri = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    env = {**os.environ, **SECRETS, "PYTHONUNBUFFERED": "1", "FORGETRAY_SYSTEM_METRICS": "1",
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "forgetray.cli", "run", "secrets_sweep.py", "--tracking-uri", uri,
                           "--storage", str(tmp_path / "results" / "storage")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "knowledge curves: http://127.0.0.1:5000/#/experiments/" in done.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("secrets-check")
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if r.data.tags.get("forgetray.kind") == "trial"]
    assert len(runs) == 3 and len(trials) == 2
    # What the search covers, read through MLflow: params, tags (notes included), experiment tags, datasets.
    texts = [f"{k}={v}" for run in runs for k, v in {**run.data.params, **run.data.tags}.items()]
    texts += [f"{k}={v}" for k, v in experiment.tags.items()]
    texts += [d.dataset.source for run in runs for d in run.inputs.dataset_inputs]
    assert any("mlflow.note.content" in t for t in texts) and any("lr=" in t for t in texts)
    # ... and every byte: the store's sqlite file and all artifacts (CSV/Parquet probes, stages, report).
    blobs = {Path(uri[len("sqlite:///"):]): Path(uri[len("sqlite:///"):]).read_bytes()}
    artifacts = [p for p in (tmp_path / "results" / "artifacts").rglob("*") if p.is_file()]
    assert any(p.suffix == ".csv" for p in artifacts) and any(p.suffix == ".parquet" for p in artifacts)
    blobs.update({p: p.read_bytes() for p in artifacts})
    for name, value in SECRETS.items():
        assert not any(value in t for t in texts), f"{name} logged as a param or tag"
        hits = [str(p) for p, data in blobs.items() if value.encode() in data]
        assert not hits, f"{name}'s value found in {hits}"

    # FORGETRAY_SYSTEM_METRICS=1 on CPU: the rank-0 worker's monitor logged into each trial's run.
    for trial in trials:
        assert any(k.startswith("system/cpu_utilization") for k in trial.data.metrics), sorted(trial.data.metrics)
