"""`ray job submit` to a two-node Ray cluster, as the README's "On a GPU cluster" walk-through does it, on one machine.

Real processes, all bound to 127.0.0.1: `ray start --head` (dashboard + job server) and a second `ray start --address`
with its own resources, token authentication on (RAY_AUTH_MODE=token with a token file made for the test, as Ray
2.59+ defaults it), an `mlflow server`, and `ray job submit --working-dir DIR -- forgetray run sweep.py
--tracking-uri http://...` with a two-trial sweep (one Ray Train worker each, one CPU per node, so one trial per
node). Checked: the job SUCCEEDED, the dashboard refuses requests without the token, Ray's state API shows the two
trials' training workers on the two different nodes, the runs read back from the MLflow server, and the package
uploaded for the working dir holds the sweep file but not what .rayignore excludes (.venv, results).

Nothing here touches another Ray instance on the machine: the clusters get their own --temp-dir and ports, and are
ended by PID (every process they start carries a marker in its environment); `ray stop` is never called.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: ray, mlflow, forgetray (the nodes run the same environment)
MARKER = "FORGETRAY_TEST_CLUSTER"


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def marked_pids(marker: str) -> list[int]:
    """PIDs of the processes started with MARKER=marker in their environment (this cluster's, no one else's)."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def end_marked(marker: str, grace: float = 15.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = marked_pids(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while pids and time.time() < deadline:
            time.sleep(0.3)
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


def http_status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_for(check, timeout: float, what: str):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last!r})")


SWEEP = """# ray job submit --working-dir . -- forgetray run sweep.py --tracking-uri http://127.0.0.1:PORT
from forgetray import Sweep, grid

sweep = Sweep(
    "cluster-submit", model={model!r}, dataset={dataset!r}, seed=grid([0, 1]), epochs=1, lr=3e-3, batch_size=8,
    workers=1, cpus_per_worker=1, max_length=256, benchmarks=[{benchmark!r}], probe_set={probe_set!r},
    probe_passages=16, probe_batch_size=5,
)
"""


def test_job_submitted_to_two_node_cluster_runs_a_trial_on_each_node(fixture_files):
    started = time.time()
    root = Path(tempfile.mkdtemp(prefix="frc-", dir="/tmp"))  # short: Ray's socket paths live under --temp-dir
    marker = secrets.token_hex(8)
    token_file = root / "auth_token"
    token = secrets.token_hex(32)
    token_file.write_text(token)
    token_file.chmod(0o600)
    (gcs, dashboard, client_port, agent1, agent2, mlflow_port) = free_ports(6)
    env = {
        **os.environ, MARKER: marker, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
        # Ray >= 2.59 turns token authentication on by default; the test runs with it on, with its own token file
        # (~/.ray/auth_token is left alone). The CLI, the nodes and the job's driver all read it from here.
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    address = f"http://127.0.0.1:{dashboard}"

    def ray(*args, timeout=120, check=True):
        done = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert done.returncode == 0, f"ray {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    # The job's working dir: the sweep file, plus what .rayignore must keep out of the upload.
    work = root / "work"
    (work / ".venv" / "lib").mkdir(parents=True)
    (work / ".venv" / "lib" / "big.bin").write_bytes(b"\0" * 1024)
    (work / "forgetray-results" / "storage").mkdir(parents=True)
    (work / "forgetray-results" / "mlflow.db").write_bytes(b"\0" * 1024)
    shutil.copy(REPO / ".rayignore", work / ".rayignore")
    (work / "sweep.py").write_text(SWEEP.format(**{k: str(v) for k, v in fixture_files.items()}))

    mlflow_log = (root / "mlflow.log").open("w")
    mlflow = None
    try:
        mlflow = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
             str(root / "mlartifacts")],
            env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, cwd=root, stdout=mlflow_log,
            stderr=subprocess.STDOUT, start_new_session=True)
        common = ["--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(100 * 1024**2),
                  "--disable-usage-stats"]
        ray("start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port",
            str(dashboard), "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port",
            str(agent1), "--temp-dir", str(root / "head"), "--resources", '{"head_node": 1}', *common)
        ray("start", "--address", f"127.0.0.1:{gcs}", "--dashboard-agent-listen-port", str(agent2),
            "--temp-dir", str(root / "node2"), "--resources", '{"node2": 1}', *common)

        def nodes():
            listed = json.loads(ray("list", "nodes", "--address", address, "--format", "json", "--detail").stdout)
            alive = [n for n in listed if n["state"] == "ALIVE"]
            return alive if len(alive) == 2 else None

        alive = wait_for(nodes, 90, "both nodes to be ALIVE")
        print(f"[{time.time() - started:.0f} s] two nodes alive")
        node_of = {("head" if "head_node" in n["resources_total"] else "node2"): n["node_id"] for n in alive}
        assert set(node_of) == {"head", "node2"}, alive

        # Token authentication is on: the job server refuses a request without the token, accepts one with it.
        assert http_status(f"{address}/api/jobs/") == 401
        assert http_status(f"{address}/api/jobs/", token) == 200
        wait_for(lambda: http_status(f"http://127.0.0.1:{mlflow_port}/health") == 200, 90, "the MLflow server")

        # The dashboard (job server) and the MLflow server listen on 127.0.0.1 only: not on the address Ray picked
        # for the nodes (Ray's own gRPC ports do listen on every interface; the token guards them).
        node_ip = alive[0]["node_ip"]
        if node_ip != "127.0.0.1":
            for port in (dashboard, mlflow_port):
                with socket.socket() as s, pytest.raises(OSError):
                    s.settimeout(5)
                    s.connect((node_ip, port))

        tracking_uri = f"http://127.0.0.1:{mlflow_port}"
        job_id = f"forgetray-test-{marker}"
        # Ray 2.60 skips .git/.venv/venv/__pycache__ by itself; turned off here so that .rayignore alone is tested.
        env["RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES"] = ""
        ray("job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", str(work),
            "--no-wait", "--", "forgetray", "run", "sweep.py", "--tracking-uri", tracking_uri,
            "--storage", str(root / "storage"))
        del env["RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES"]

        def finished():
            request = urllib.request.Request(f"{address}/api/jobs/{job_id}",
                                             headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=10) as response:
                state = json.loads(response.read())["status"]
            return state if state in ("SUCCEEDED", "FAILED", "STOPPED") else None

        print(f"[{time.time() - started:.0f} s] job submitted")
        wait_for(finished, 420, f"job {job_id} to finish")
        print(f"[{time.time() - started:.0f} s] job finished")
        status = re.sub(r"\x1b\[[0-9;]*m", "", ray("job", "status", "--address", address, job_id).stdout)
        logs = ray("job", "logs", "--address", address, job_id).stdout
        assert f"Job '{job_id}' succeeded" in status, status + logs[-5000:]
        assert "MLflow: " + tracking_uri in logs, logs[-3000:]

        # Ray's state API: one Ray Train worker per trial (workers=1, no restarts), and they ran on the two nodes.
        # This cluster has a dashboard, so the state API answered the sweep's driver too: each run kept Ray Train's
        # placement-group cleaner (forgetray.fit.trainer_class), and none started Ray Data's manager.
        listed = json.loads(ray("list", "actors", "--address", address, "--format", "json", "--detail", "--limit",
                                "1000").stdout)
        classes = [a["class_name"] for a in listed]
        assert classes.count("PlacementGroupCleaner") == 2 and "DatasetManager" not in classes, classes
        actors = [a for a in listed if a["class_name"] == "RayTrainWorker"]
        assert len(actors) == 2, actors
        assert sorted(a["node_id"] for a in actors) == sorted(node_of.values()), (actors, node_of)

        # The runs, read back from the tracking server.
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        experiment = client.get_experiment_by_name("cluster-submit")
        runs = client.search_runs([experiment.experiment_id], max_results=20)
        parents = [r for r in runs if r.data.tags.get("forgetray.kind") == "sweep"]
        trials = [r for r in runs if r.data.tags.get("forgetray.kind") == "trial"]
        assert len(parents) == 1 and len(trials) == 2
        assert {t.info.status for t in trials} == {"FINISHED"} and parents[0].info.status == "FINISHED"
        assert sorted(t.data.params["trial.seed"] for t in trials) == ["0", "1"]
        for t in trials:
            assert [m.step for m in client.get_metric_history(t.info.run_id, "sft/bench/acc")] == [1]
            assert [m.step for m in client.get_metric_history(t.info.run_id, "base/bench/acc")] == [0]
        # Artifacts went through the server (--artifacts-destination), not to a path on the job's node.
        assert any((root / "mlartifacts").rglob("*.parquet"))

        # The working dir as the head node unpacked it: the sweep file, and none of what .rayignore excludes.
        packages = [p for p in (root / "head").glob("session_*/runtime_resources/working_dir_files/*")
                    if p.is_dir()]
        assert packages, list((root / "head").glob("session_*/runtime_resources/*"))
        for package in packages:
            names = {p.relative_to(package).parts[0] for p in package.rglob("*")}
            assert "sweep.py" in names and ".rayignore" in names, names
            assert not names & {".venv", "forgetray-results"}, names
        print(f"cluster submission test: {time.time() - started:.0f} s")
    finally:
        end_marked(marker)
        if mlflow is not None and mlflow.poll() is None:
            mlflow.kill()
        mlflow_log.close()
        shutil.rmtree(root, ignore_errors=True)


def test_rayignore_keeps_the_environment_and_results_out_of_the_repo_upload():
    """`ray job submit --working-dir .` from the repo root uploads the sources only, even without .gitignore's help
    (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1): walked with Ray's own upload filter."""
    from ray._private.runtime_env.packaging import _dir_travel

    uploaded = []
    _dir_travel(REPO, [], lambda p: uploaded.append(p.relative_to(REPO)), include_gitignore=False)
    tops = {p.parts[0] for p in uploaded if p.parts}
    assert {"forgetray", "sweeps", "pyproject.toml"} <= tops
    assert not tops & {".venv", ".git", "forgetray-results", "mlruns", "mlflow.db", ".pytest_cache"}, tops
    assert not [p for p in uploaded if "__pycache__" in p.parts or p.suffix == ".pyc"]
    size = sum((REPO / p).stat().st_size for p in uploaded if (REPO / p).is_file())
    assert size < 50 * 1024**2, f"{size / 1024**2:.0f} MiB would be uploaded"
