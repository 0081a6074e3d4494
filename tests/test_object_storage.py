"""`--storage s3://bucket/prefix` on a two-node local Ray cluster, against an S3 server on 127.0.0.1 (moto's): the
sweep's state, checkpoints, shared start, trajectories and base-evaluation caches live in the bucket, the shared
results are computed once by create-if-absent (no file lock anywhere), and the nodes write nothing outside their
caches; a worker node lost mid-trial and a 60 s outage of the store right after lose nothing. Bad storage is refused before anything runs. The
protocol's rule itself: tests/test_claims.py."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from s3_cluster import BUCKET, CREDENTIALS, Cluster, files_outside_caches, objects, start_s3, wait_job
from test_cluster_submit import wait_for

SWEEP = """from forgetray import Sweep, grid
sweep = Sweep("s3", model={model!r}, dataset={dataset!r}, benchmarks=[{benchmark!r}], probe_set={probe_set!r},
    probe_passages=16, probe_batch_size=5, batch_size=8, max_length=256, workers=1, cpus_per_worker=1,
    lr=grid([3e-3, 1e-3]), epochs=grid([1, 2]), lr_schedule="constant", warmup_ratio=0.0,
    prior_phases=[{{"dataset": {dataset!r}, "epochs": 1, "lr": 3e-3}}], {extra})
"""


def sweep_file(root: Path, fixture_files: dict, extra: str = "") -> Path:
    path = root / "sweep.py"
    path.write_text(SWEEP.format(**{k: str(v) for k, v in fixture_files.items()}, extra=extra))
    return path


def trial_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = [r for r in c.search_runs([exp.experiment_id], max_results=50) if r.data.tags.get("forgetray.kind") == "trial"]
    return c, runs


def assert_each_step_once(c, run) -> None:
    for name in c.get_run(run.info.run_id).data.metrics:
        steps = [m.step for m in c.get_metric_history(run.info.run_id, name)]
        assert len(steps) == len(set(steps)), f"{name} logged twice at a step: {steps}"


def progress(hold: Path) -> list[tuple[int, int, int]]:
    """(worker pid, epoch, step) of every training step so far (FORGETRAY_HOLD_AT's log)."""
    path = hold / "progress"
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()] if path.is_file() else []


def _read(port: int, key: str) -> bytes:
    import boto3

    c = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing")
    return c.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def on_node2(pid: int) -> bool:
    try:
        return b"NODE=node2" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


@pytest.mark.slow
def test_sweep_on_s3_across_two_nodes_outlives_a_lost_node_and_a_60_s_outage(fixture_files):
    """One sweep serves three claims (they share its start-up, the cluster's and the sweep's: ~3 minutes): the store
    on S3 (shared results computed once, every checkpoint in the bucket, nothing on the nodes' disks outside their
    caches); a worker node lost mid-trial (once both trajectories have their epoch-1 checkpoint recorded and node2's
    worker is held in epoch 2, every process of node2, its raylet first, is SIGKILLed: a spot instance gone); and the
    store unreachable for 60 s right after (cut by a proxy). The lost trial restarts from its epoch-1 checkpoint on
    the surviving node, the uploads wait and go through, every run ends FINISHED with each step logged once.
    Bounds: README "Faults"."""
    started = time.time()
    root = Path(tempfile.mkdtemp(prefix="frs3-", dir="/tmp"))  # short: Ray's socket paths live under --temp-dir
    hold = root / "hold"
    hold.mkdir()
    server, proxy = start_s3()
    # Every worker logs its steps (FORGETRAY_HOLD_AT); node2's first worker to finish step 1 of epoch 2 is held
    # there until the node is lost (the head's "99" is never reached). The trial drivers (and their Train
    # controllers) stay on the head.
    cluster = Cluster(root, proxy.port, {"FORGETRAY_HOLD_AT": f"{hold}:99:1",
                                         "FORGETRAY_DRIVER_RESOURCES": '{"head_node": 0.01}'},
                      node2_env={"FORGETRAY_HOLD_AT": f"{hold}:2:1"})
    window, nodes = {}, {}  # worker pid -> on node2, read while it lives
    try:
        cluster.start()
        uri = f"sqlite:///{root / 'mlflow.db'}"
        proc = cluster.run(sweep_file(root, fixture_files), f"s3://{BUCKET}/sweeps", uri, 900)

        def node2_in_epoch_2() -> bool:
            for pid, _, _ in progress(hold):
                nodes.setdefault(pid, on_node2(pid))
            # Ray Train's checkpoint manager has recorded epoch 1 (its snapshot names it) for both trajectories:
            # a report still in flight would make the restart begin at epoch 1 again.
            snapshots = [k for k in objects(proxy.target, "sweeps/s3/")
                         if k.endswith("ift/checkpoint_manager_snapshot.json")]
            recorded = [k for k in snapshots if b"epoch_001" in _read(proxy.target, k)]
            return len(recorded) == 2 and (hold / "held").is_file()

        wait_for(lambda: node2_in_epoch_2() or proc.poll() is not None, 600, "node2's worker held in epoch 2")
        assert proc.poll() is None, (root / "driver.log").read_text()[-5000:]
        held = json.loads((hold / "held").read_text())["pid"]
        assert nodes.get(held) or on_node2(held), "the held worker is not node2's"
        lost = {p for p, on in nodes.items() if on}
        before = len(progress(hold))
        raylets = cluster.node2_pids("raylet")
        assert raylets, "no raylet of node2"
        for pid in raylets + [p for p in cluster.node2_pids() if p not in raylets]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proxy.down()
        window["down"] = time.time()
        time.sleep(60)
        proxy.up()
        window["up"] = time.time()
        log = wait_job(proc, 900, root)
        elapsed = time.time() - started
        assert proc.returncode == 0, log[-6000:]
        assert window["up"] - window["down"] >= 60
        assert not cluster.node2_pids(), "node2 is not gone"
        # The lost trial's new worker, on the head, began at epoch 2 step 1: it resumed from epoch 1's checkpoint.
        after = progress(hold)[before:]
        new = [(p, e, s) for p, e, s in after if p not in nodes]
        assert new and new[0][1:] == (2, 1) and not any(on_node2(p) for p, _, _ in new), (lost, after)
        assert not lost & {p for p, _, _ in after}, "a worker of the lost node went on"

        keys = [k for k in objects(proxy.target, "sweeps/s3/") if not k.endswith("/")]  # not pyarrow's folders
        execution = keys[0].split("/")[2]
        base = f"sweeps/s3/{execution}/"
        assert f"{base}sweep.json" in keys and any(k.startswith(f"{base}tune/") for k in keys)
        # The shared start and the base-model caches: one claim, one data folder, one publication each.
        for shared in ("start", "base_eval", "base_em"):
            mine = [k[len(base) + len(shared) + 1:] for k in keys if k.startswith(f"{base}{shared}/")]
            claims = [k for k in mine if ".claim." in k]
            datas = {k.split("/")[0] for k in mine if ".data." in k}
            assert len(claims) == 1 and claims[0].endswith(".claim.0") and len(datas) == 1, (shared, mine)
            assert sum(k.endswith(".done") for k in mine) == 1 and any(k.endswith("/.complete") for k in mine)
        # Two trained trajectories (epochs 2), each with its checkpoints; their epochs-1 grid points follow them.
        trained = {k.split("/")[4] for k in keys if k.startswith(f"{base}trials/") and "/ift/epoch_" in k}
        assert len(trained) == 2
        for trial in trained:
            for epoch in (1, 2):
                assert f"{base}trials/{trial}/ift/epoch_{epoch:03d}/model/model.safetensors" in keys
            assert f"{base}trials/{trial}/trial_done" in keys
        assert not [k for k in keys if k.endswith(".lock")]

        c, runs = trial_runs(uri, "s3")
        assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
        assert sum("forgetray.trajectory" in r.data.tags for r in runs) == 4
        for run in runs:
            assert_each_step_once(c, run)
            assert [m.step for m in c.get_metric_history(run.info.run_id, "base/bench/acc")] == [0]
        # Nothing written on the nodes' disks outside the caches (the start and the base probes were read there).
        assert files_outside_caches(root) == []
        cached = root / "home" / ".cache" / "forgetray" / "storage" / BUCKET
        assert any(cached.rglob("model.safetensors"))
        print(f"S3 two-node sweep with a lost node and a 60 s outage: {elapsed:.0f} s")
    finally:
        cluster.stop()
        proxy.down()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_ray_s3_calls_retry_through_a_silence_however_many_wait_at_once(monkeypatch):
    """pyarrow's S3 filesystem (what Ray Tune and Ray Train write through) must retry every call through an outage,
    in this process and pickled into another (as Ray Train's controllers and workers get it): 30 calls at once
    against a silent store each wait the whole backoff, 25 ms x (2^8 - 2) = 6.35 s at 8 attempts. Two bugs this
    caught: the AWS SDK's "standard" strategy shares a retry quota among calls (all 30 failed within 10 s, the
    first after 2.7 s), and pyarrow's pickling drops the retry strategy (the copy gave up after 2 s); a 60 s outage
    then failed trials."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    from forgetray import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv(storage.ATTEMPTS_ENV, "8")
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    storage.filesystem.cache_clear()
    here = storage.filesystem()
    storage.filesystem.cache_clear()
    copies = {"here": here, "pickled": pickle.loads(pickle.dumps(here))}
    started = time.time()

    def look_up(i: int) -> tuple[str, float]:
        which = "here" if i % 2 else "pickled"
        with pytest.raises(OSError):
            copies[which].get_file_info(f"{BUCKET}/key-{i}")
        return which, time.time() - started

    with ThreadPoolExecutor(30) as pool:
        waited = list(pool.map(look_up, range(30)))
    for which in copies:
        times = sorted(t for w, t in waited if w == which)
        assert times[0] >= 6.0 and times[-1] < 30, (which, times)


def test_bad_object_storage_is_refused_before_anything_runs(fixture_files, tmp_path, monkeypatch):
    from forgetray import storage
    from forgetray.spec import SpecError

    storage._client.cache_clear()
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SpecError, match=r"--storage 's3://': no bucket"):
        storage.validate("s3://")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(SpecError, match=r"--storage 's3://b/x': the endpoint http://127.0.0.1:9 \(AWS_ENDPOINT_URL\) "
                                        "did not answer"):
        storage.validate("s3://b/x")
    storage._client.cache_clear()
    server, proxy = start_s3()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        with pytest.raises(SpecError, match="bucket 'nope' does not exist"):
            storage.validate("s3://nope/x")
        assert storage.validate(f"s3://{BUCKET}/x/") == f"s3://{BUCKET}/x"
    finally:
        storage._client.cache_clear()
        proxy.down()
        server.stop()


def test_create_if_absent_on_s3_has_one_winner_among_concurrent_writers(monkeypatch):
    """The protocol against a real S3 server: S3's conditional PUT gives one claim and one publication among eight
    concurrent writers, and the others read the winner's data."""
    from concurrent.futures import ThreadPoolExecutor

    from forgetray import claims, storage

    server, proxy = start_s3()
    storage._client.cache_clear()
    for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}.items():
        monkeypatch.setenv(name, value)
    computed = []
    try:
        def one(i: int) -> str:
            got = storage.acquire(f"s3://{BUCKET}/x/base_eval/k", poll_s=0.05, beat_s=0.05)
            if isinstance(got, str):
                return got
            computed.append(i)
            storage.write_text(f"s3://{got.data}/summary.json", str(i))
            return claims.publish(storage.S3Objects(), got)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
        assert len(computed) == 1 and len(set(results)) == 1
        assert storage.read_text(f"s3://{results[0]}/summary.json") == str(computed[0])
        assert [k for k in objects(proxy.target, "x/") if ".claim." in k] == ["x/base_eval/k.claim.0"]
    finally:
        storage._client.cache_clear()
        proxy.down()
        server.stop()
