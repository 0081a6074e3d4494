"""No secret is ever logged. The real sweep is test_faults.py's driver test (`forgetray run` in subprocesses, their
own local Ray cluster, so the Ray workers inherit the same environment), run with the fake credentials below; this
module's `assert_no_secret_in_store` then searches the whole MLflow store for them: the sqlite file's bytes (params,
tags, notes, metrics, datasets, experiment tags) and every byte of every file under the test's folder, whatever its
kind (probes, stages, report, checkpoints, logs), decoded too where a format would hide a plain string (compressed
archives and streams, Parquet pages, NumPy string arrays), and checks that `FORGETRAY_SYSTEM_METRICS=1` wired
MLflow's system metrics into the trial runs. The test here plants a secret in each kind of file the scan must read and
checks that it finds every one, and nothing in the same files without it."""

from __future__ import annotations

import gzip
import io
import json
import sqlite3
import zipfile
from pathlib import Path
from typing import Iterable

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


def readable_forms(path: Path) -> list[bytes]:
    """The file's bytes, all of them, and what a format would keep from showing a string as its bytes: the members
    of a zip archive (a torch .pt is one; a member may be deflated), a gzip stream, the values and metadata of a
    Parquet file (pages may be compressed or dictionary-encoded), the strings of a NumPy array (stored UTF-32)."""
    data = path.read_bytes()
    forms = [data]
    if data[:2] == b"\x1f\x8b":
        forms.append(gzip.decompress(data))
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            forms += [archive.read(name) for name in archive.namelist()]
    if data[:4] == b"PAR1":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        forms.append("\n".join(str(value) for column in table.columns for value in column.to_pylist()).encode())
        forms.append(str(table.schema.metadata).encode())
    if data[:6] == b"\x93NUMPY":
        import numpy as np

        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError:  # an object array is a pickle: its strings are UTF-8 in the bytes already read
            array = None
        if array is not None and array.dtype.kind in "US":
            forms.append("\n".join(str(value) for value in array.ravel()).encode())
    return forms


def secret_hits(files: Iterable[Path], secrets: dict[str, str] = SECRETS) -> dict[str, list[str]]:
    """For every secret found: its name -> the files it is in (each file read in full, in every readable form)."""
    hits: dict[str, list[str]] = {}
    for path in files:
        forms = readable_forms(path)
        for name, value in secrets.items():
            if any(value.encode() in form for form in forms):
                hits.setdefault(name, []).append(str(path))
    return hits


def assert_no_secret_in_store(uri: str, experiment_name: str, root: Path, lrs: Iterable[float] = ()) -> None:
    """No value of SECRETS in the store at `uri` (a sqlite file) or in any file under `root`; the trial runs have
    the learning rates `lrs` (one each) and system metrics."""
    from mlflow.tracking import MlflowClient

    from forgetray.tracking import TAG_NOTE, experiment_note

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if r.data.tags.get("forgetray.kind") == "trial"]
    # What the search covers, read through MLflow: params, tags (notes included), experiment tags, datasets. The
    # store must hold what the search looks at: the experiment's note and each trial's lr, with their values.
    texts = [f"{k}={v}" for run in runs for k, v in {**run.data.params, **run.data.tags}.items()]
    texts += [f"{k}={v}" for k, v in experiment.tags.items()]
    texts += [d.dataset.source for run in runs for d in run.inputs.dataset_inputs]
    assert experiment.tags[TAG_NOTE] == experiment_note(experiment_name)
    assert sorted(float(t.data.params["trial.lr"]) for t in trials) == sorted(lrs)
    # ... and every byte: the store's sqlite file and every file under root, of every kind.
    store = Path(uri[len("sqlite:///"):])
    files = sorted({store, *(p for p in root.rglob("*") if p.is_file())})
    suffixes = {p.suffix for p in files}
    assert {".db", ".csv", ".parquet", ".json", ".safetensors"} <= suffixes, sorted(suffixes)
    for name, value in SECRETS.items():
        assert not any(value in t for t in texts), f"{name} logged as a param or tag"
    hits = secret_hits(files)
    assert not hits, f"secrets found: {hits}"
    # FORGETRAY_SYSTEM_METRICS=1 on CPU: the rank-0 worker's monitor logged into each trial's run: samples with
    # distinct steps (a resumed trial continues its numbering), each a CPU percentage.
    for trial in trials:
        history = client.get_metric_history(trial.info.run_id, "system/cpu_utilization_percentage")
        steps = [m.step for m in history]
        assert steps and len(steps) == len(set(steps)), (trial.info.run_id, steps)
        assert all(0.0 <= m.value <= 100.0 for m in history), [m.value for m in history]


def _plant(folder: Path, secret: str | None) -> list[Path]:
    """One file of each kind the store holds, under `folder`, with `secret` in each (None: a file like it without)."""
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image, PngImagePlugin
    from safetensors.torch import save_file

    text = f"token={secret}" if secret else "token=none"
    folder.mkdir(parents=True)
    files = {}

    def path(name: str) -> Path:
        files[name] = folder / name
        return files[name]

    torch.save({"step": 3, "note": text, "w": torch.ones(4)}, path("state.pt"))
    save_file({"w": torch.ones(2, 2)}, path("model.safetensors"), metadata={"note": text})
    path("driver.log").write_text(f"[forgetray] started\n{text}\n")
    # neither the column's min nor its max: the footer's statistics would show the value uncompressed
    frame = pd.DataFrame({"question": ["q0", "q1", "q2"], "note": ["a", text, "z"]})
    frame.to_parquet(path("probes.parquet"))  # snappy-compressed, dictionary-encoded pages
    frame.to_parquet(path("stages.gzip.parquet"), compression="gzip")
    frame.to_csv(path("probes.csv"), index=False)
    path("summary.json").write_text(json.dumps({"epoch": 1, "note": text}))
    path("report.txt").write_text(f"report\n{text}\n")
    path("params.yaml").write_text(f"lr: 0.001\nnote: {text}\n")
    np.save(path("surface.npy"), np.array(["x", text]))  # a '<U' array: 4 bytes per character
    np.save(path("objects.npy"), np.array([text, 1], dtype=object), allow_pickle=True)  # a pickle inside
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", text)
    Image.new("RGB", (4, 4)).save(path("flatness.png"), pnginfo=info)
    path("events.gz").write_bytes(gzip.compress(f"event {text}\n".encode()))
    with zipfile.ZipFile(path("artifacts.zip"), "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("inner.txt", f"inner {text}\n")
    with sqlite3.connect(path("mlflow.db")) as db:
        db.execute("CREATE TABLE params (key TEXT, value TEXT)")
        db.execute("INSERT INTO params VALUES ('note', ?)", (text,))
    db.close()
    path("no_suffix").write_bytes(b"\x00\x01" + text.encode() + b"\xff")
    return list(files.values())


def test_the_scan_finds_a_secret_planted_in_every_kind_of_file(tmp_path):
    names = list(SECRETS)
    clean = _plant(tmp_path / "clean", None)
    assert secret_hits(clean) == {}
    leaky = []
    for i, name in enumerate(names):  # every secret planted in every kind of file, one secret per folder
        leaky += _plant(tmp_path / f"leak{i}", SECRETS[name])
    hits = secret_hits(leaky)
    assert set(hits) == set(names)
    kinds = [p.name for p in clean]
    assert len(kinds) == 16 and {".pt", ".safetensors", ".log", ".parquet", ".json", ".csv", ".npy", ".png", ".gz",
                                 ".zip", ".db", ".yaml", ".txt", ""} <= {Path(k).suffix for k in kinds}
    for i, name in enumerate(names):  # found in each of its files, and only there
        assert sorted(hits[name]) == sorted(str(tmp_path / f"leak{i}" / kind) for kind in kinds), name
    # the decoding is needed: a raw byte search alone misses the NumPy strings, the gzip stream, the deflated zip
    # member and the gzip-compressed Parquet page
    value = SECRETS[names[0]].encode()
    missed = sorted(p.name for p in tmp_path.glob("leak0/*") if value not in p.read_bytes())
    assert {"surface.npy", "events.gz", "artifacts.zip", "stages.gzip.parquet"} <= set(missed), missed
