"""No secret is ever logged. The real sweep is test_faults.py's driver test (`forgetray run` in subprocesses, their
own local Ray cluster, so the Ray workers inherit the same environment), run with the fake credentials below; this
module's `assert_no_secret_in_store` then searches the whole MLflow store for them: the sqlite file's bytes (params,
tags, notes, metrics, datasets, experiment tags) and every artifact's bytes, and checks that
`FORGETRAY_SYSTEM_METRICS=1` wired MLflow's system metrics into the trial runs."""

from __future__ import annotations

from pathlib import Path

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

def assert_no_secret_in_store(uri: str, experiment_name: str, root: Path) -> None:
    """No value of SECRETS in the store at `uri` (a sqlite file) or in any artifact under `root`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if r.data.tags.get("forgetray.kind") == "trial"]
    # What the search covers, read through MLflow: params, tags (notes included), experiment tags, datasets.
    texts = [f"{k}={v}" for run in runs for k, v in {**run.data.params, **run.data.tags}.items()]
    texts += [f"{k}={v}" for k, v in experiment.tags.items()]
    texts += [d.dataset.source for run in runs for d in run.inputs.dataset_inputs]
    assert any("mlflow.note.content" in t for t in texts) and any("lr=" in t for t in texts)
    # ... and every byte: the store's sqlite file and all artifacts (CSV/Parquet probes, stages, report).
    store = Path(uri[len("sqlite:///"):])
    blobs = {store: store.read_bytes()}
    artifacts = [p for p in root.rglob("*") if p.is_file() and p != store and p.suffix in (".csv", ".parquet", ".json",
                                                                                          ".txt", ".png", ".npy")]
    assert any(p.suffix == ".csv" for p in artifacts) and any(p.suffix == ".parquet" for p in artifacts)
    blobs.update({p: p.read_bytes() for p in artifacts})
    for name, value in SECRETS.items():
        assert not any(value in t for t in texts), f"{name} logged as a param or tag"
        hits = [str(p) for p, data in blobs.items() if value.encode() in data]
        assert not hits, f"{name}'s value found in {hits}"
    # FORGETRAY_SYSTEM_METRICS=1 on CPU: the rank-0 worker's monitor logged into each trial's run.
    for trial in trials:
        assert any(k.startswith("system/cpu_utilization") for k in trial.data.metrics), sorted(trial.data.metrics)
