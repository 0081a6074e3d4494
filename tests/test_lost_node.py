"""Faults of a two-node local Ray cluster with its storage on S3 (moto's server behind a proxy the test cuts): the
store unreachable for 60 s mid-trial (the uploads wait and go through); every trial's run ends FINISHED with each
step logged once. Bounds: README "Faults".

The lost node (the second node's raylet SIGKILLed in epoch 2; its trial should restart from its epoch-1 checkpoint on
the surviving node) is not here yet: its test failed both times it ran (branch `wip-lost-node`, README "Faults")."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from s3_cluster import BUCKET, Cluster, objects, start_s3, wait_job
from test_cluster_submit import wait_for
from test_object_storage import assert_each_step_once, trial_runs

pytestmark = pytest.mark.slow

SWEEP = """from forgetray import Sweep, grid
sweep = Sweep({name!r}, model={model!r}, dataset={dataset!r}, benchmarks=[{benchmark!r}], probe_set={probe_set!r},
    probe_passages=16, probe_batch_size=5, batch_size=8, max_length=256, workers=1, cpus_per_worker=1,
    lr=grid([3e-3, 1e-3]), epochs=2)
"""


def progress(hold: Path) -> list[tuple[int, int, int]]:
    path = hold / "progress"
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()] if path.is_file() else []


def on_node2(pid: int) -> bool:
    try:
        return b"NODE=node2" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _read(port: int, key: str) -> bytes:
    import boto3

    c = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing")
    return c.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def run_with_fault(fixture_files, name: str, fault) -> tuple[float, list, object]:
    """Run a two-trial sweep (2 epochs, one trial per node) and call `fault(cluster, proxy, hold, nodes)` once a
    worker is in epoch 2 (its epoch-1 checkpoint on the store); returns (seconds, progress, (client, runs))."""
    started = time.time()
    root = Path(tempfile.mkdtemp(prefix=f"fr{name[:4]}-", dir="/tmp"))
    hold = root / "hold"
    hold.mkdir()
    server, proxy = start_s3()
    cluster = Cluster(root, proxy.port, {"FORGETRAY_HOLD_AT": f"{hold}:99:1",  # never holds: logs every step
                                         "FORGETRAY_DRIVER_RESOURCES": '{"head_node": 0.01}'})
    try:
        cluster.start()
        sweep = root / "sweep.py"
        sweep.write_text(SWEEP.format(name=name, **{k: str(v) for k, v in fixture_files.items()}))
        uri = f"sqlite:///{root / 'mlflow.db'}"
        proc = cluster.run(sweep, f"s3://{BUCKET}/sweeps", uri, 900)
        nodes: dict[int, bool] = {}

        def in_epoch_2():
            for pid, epoch, _ in progress(hold):
                nodes.setdefault(pid, on_node2(pid))
            # Ray Train's checkpoint manager has recorded epoch 1 as the one to resume from (its snapshot names it):
            # a report still in flight would make the restart begin at epoch 1 again (README "Faults").
            snapshots = [k for k in objects(proxy.target, f"sweeps/{name}/")
                         if k.endswith("ift/checkpoint_manager_snapshot.json")]
            recorded = [k for k in snapshots if b"epoch_001" in _read(proxy.target, k)]
            return len(recorded) == 2 and any(e == 2 and nodes[p] for p, e, s in progress(hold) if s >= 2)

        wait_for(lambda: in_epoch_2() or proc.poll() is not None, 600, "a node2 worker in epoch 2")
        assert proc.poll() is None, (root / "driver.log").read_text()[-5000:]
        fault(cluster, proxy, hold, nodes)
        log = wait_job(proc, 900, root)
        assert proc.returncode == 0, log[-6000:]
        for pid, *_ in progress(hold):
            nodes.setdefault(pid, on_node2(pid))
        c, runs = trial_runs(uri, name)
        assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
        for run in runs:
            assert_each_step_once(c, run)
            assert [m.step for m in c.get_metric_history(run.info.run_id, "sft/bench/acc")] == [1, 2]
        return time.time() - started, [(p, e, s, nodes[p]) for p, e, s in progress(hold)], (c, runs)
    finally:
        cluster.stop()
        proxy.down()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_an_s3_outage_of_60_s_mid_trial_delays_the_uploads_and_loses_nothing(fixture_files):
    window = {}

    def outage(cluster, proxy, hold, nodes):
        proxy.down()
        window["down"] = time.time()
        time.sleep(60)
        proxy.up()
        window["up"] = time.time()

    seconds, steps, _ = run_with_fault(fixture_files, "outage", outage)
    assert window["up"] - window["down"] >= 60
    print(f"S3 outage: {seconds:.0f} s")
