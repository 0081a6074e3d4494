"""Faults a sweep survives, each produced for real: a training worker SIGKILLed mid-epoch (resuming from the one
DeepSpeed state kept), the MLflow server killed and restarted mid-sweep, the driver SIGKILLed then resumed, four
trials writing to one sqlite store at once while one of them fails on a NaN loss, trials racing to log one dataset.
Sweeps run through the `forgetray` command (a subprocess with its own local Ray, or `cli.main` in-process where the
test needs a Ray with more CPU slots than the machine) on the tiny fixture model: one to three minutes each.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import local_ray
import torch

pytestmark = pytest.mark.slow

TIMINGS = {"train/tokens_per_s", "train/epoch_seconds"}


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def runs_of(uri, experiment):
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("forgetray.kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("forgetray.kind") == "trial"]
    return parents, trials


def histories(uri, run) -> dict[str, list]:
    """Every metric of the run: name -> its full history (all logged points, not the latest only)."""
    c = client(uri)
    return {name: sorted(c.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
            for name in c.get_run(run.info.run_id).data.metrics}


def assert_no_duplicate_steps(history: dict[str, list]) -> None:
    for name, points in history.items():
        steps = [m.step for m in points]
        assert len(steps) == len(set(steps)), f"{name} logged twice at a step: {steps}"


def sweep_file(tmp_path: Path, fixture_files: dict, name: str, **settings) -> Path:
    """A sweep file on the fixture model and data; `settings` are written as Python source (values or grid(...))."""
    base = {"model": repr(str(fixture_files["model"])), "dataset": repr(str(fixture_files["dataset"])),
            "benchmarks": repr([str(fixture_files["benchmark"])]), "probe_set": repr(str(fixture_files["probe_set"])),
            "probe_passages": "16", "probe_batch_size": "5", "epochs": "2", "lr": "3e-3", "batch_size": "8",
            "max_length": "256"}
    base.update(settings)
    args = ", ".join(f"{k}={v}" for k, v in base.items())
    path = tmp_path / f"{name}.py"
    path.write_text(f"# forgetray run {path.name}\nfrom forgetray import Sweep, grid\nsweep = Sweep({name!r}, {args})\n")
    return path


def cli(path: Path, uri: str, tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "forgetray.cli", "run", str(path), "--tracking-uri", uri,
            "--storage", str(tmp_path / "storage"), *extra]


class Driver:
    """`forgetray run` as a subprocess whose output lines are collected by a thread (the test waits on them). Every
    driver a test starts is SIGKILLed at teardown if it still runs (its local Ray dies with it)."""

    started: list[Driver] = []

    def __init__(self, cmd: list[str], cwd: Path, env: dict | None = None):
        Driver.started.append(self)
        self.proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = predicate()
            if found:
                return found
            assert self.proc.poll() is None or self.reader.is_alive(), f"driver exited before {what}:\n{self.log[-4000:]}"
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log[-4000:]}")

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"driver did not finish in {timeout} s:\n{self.log[-4000:]}") from None
        self.reader.join(10)
        return rc


@pytest.fixture(autouse=True)
def _no_driver_left():
    yield
    while Driver.started:
        driver = Driver.started.pop()
        if driver.proc.poll() is None:
            driver.proc.kill()
            driver.proc.wait(30)


def session_processes(session_dir: str) -> list[psutil.Process]:
    """Processes of a Ray session (its folder's name is in their command lines)."""
    name = Path(session_dir).name
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(name in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


# --- 1. a training worker SIGKILLed mid-epoch ---

def test_worker_killed_mid_epoch_restarts_from_checkpoint_with_identical_metrics(tmp_path, fixture_files):
    """Two trials that differ only in `max_failures` (which does not change what is trained) run at once; the worker
    of whichever first finishes step 2 of epoch 3 is held there by the FORGETRAY_HOLD_AT hook and SIGKILLed by this
    test. By then only epoch 2's DeepSpeed state is kept (keep_optimizer_state='latest' pruned epoch 1's): Ray Train
    restarts the worker group from it, and both trials must log the same metrics and end with the same weights."""
    from safetensors import safe_open

    from forgetray.train.engine import HOLD_ENV

    hold = tmp_path / "hold"
    hold.mkdir()
    path = sweep_file(tmp_path, fixture_files, "killed-worker", epochs="3", max_failures="grid([1, 2])",
                      max_concurrent_trials="2", zero_stage="2", delete_finished_state="False")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    driver = Driver(cli(path, uri, tmp_path), tmp_path, {HOLD_ENV: f"{hold}:3:2"})
    held = driver.wait_for(lambda: (hold / "held").is_file() and json.loads((hold / "held").read_text()), 600,
                           "a worker held at epoch 3, step 2")
    # Ray Train registers a checkpoint when its controller polls the report (not when the worker makes it): wait
    # until both trials' epoch-2 reports are in (their metrics reached MLflow), so the last checkpoint is epoch 2.
    def epoch_two_logged():
        found = client(uri).get_experiment_by_name("killed-worker")
        runs = client(uri).search_runs([found.experiment_id], "tags.`forgetray.kind` = 'trial'") if found else []
        return len(runs) == 2 and all(2 in {m.step for m in client(uri).get_metric_history(r.info.run_id,
                                                                                           "train/loss")}
                                      for r in runs)

    driver.wait_for(epoch_two_logged, 600, "both trials' epoch-2 reports")
    victim = psutil.Process(held["pid"])
    assert victim.is_running() and victim.pid != driver.proc.pid  # a Ray Train worker, not the driver
    os.kill(held["pid"], signal.SIGKILL)
    rc = driver.finish(900)
    assert rc == 0, driver.log[-4000:]

    # The killed process trained epochs 1 to 3 (to step 2); its replacement started at epoch 3: from the checkpoint.
    progress = [tuple(map(int, line.split())) for line in (hold / "progress").read_text().splitlines()]
    by_pid: dict[int, list] = {}
    for pid, epoch, step in progress:
        by_pid.setdefault(pid, []).append((epoch, step))
    assert by_pid[held["pid"]][-1] == (3, 2)
    restarted = [pid for pid, points in by_pid.items() if points[0] == (3, 1)]
    assert len(restarted) == 1, by_pid
    assert by_pid[restarted[0]][-1] == (3, 5)  # 40 examples / batch 8: 5 steps an epoch, to the end

    parents, trials = runs_of(uri, "killed-worker")
    assert len(parents) == 1 and len(trials) == 2, "the restart made another run"
    assert {t.info.status for t in trials} == {"FINISHED"}
    logged = [histories(uri, t) for t in trials]
    for history in logged:
        assert_no_duplicate_steps(history)
        assert [m.step for m in history["train/loss"]] == [1, 2, 3]
    assert set(logged[0]) == set(logged[1])
    compared = sorted(set(logged[0]) - TIMINGS)
    assert len(compared) > 20
    for name in compared:
        a = [(m.step, m.value) for m in logged[0][name]]
        b = [(m.step, m.value) for m in logged[1][name]]
        assert a == b, name  # exactly: same seed, same batches, the optimizer and schedule state restored

    trial_dirs = [next((tmp_path / "storage").glob(f"killed-worker/*/trials/{t.data.tags['forgetray.trial']}"))
                  for t in trials]
    for trial_dir in trial_dirs:
        epochs = [trial_dir / "ift" / f"epoch_{e:03d}" for e in (1, 2, 3)]
        # Only the newest checkpoint holds DeepSpeed state (delete_finished_state=False keeps the last one).
        assert [(c / "deepspeed").exists() for c in epochs] == [False, False, True]
        assert list((epochs[2] / "deepspeed" / "state").glob("*optim_states.pt")), "the optimizer state is missing"
        for ckpt in epochs:
            assert (ckpt / "probes" / "bench.parquet").is_file() and (ckpt / "state.json").is_file()
        # Ray Train's own bookkeeping still lists every epoch (every model stays for restoration).
        snapshot = json.loads((trial_dir / "ift" / "checkpoint_manager_snapshot.json").read_text())
        assert len(snapshot["checkpoint_results"]) == 3
    finals = [d / "ift" / "epoch_003" / "model" / "model.safetensors" for d in trial_dirs]
    with safe_open(str(finals[0]), "pt") as a, safe_open(str(finals[1]), "pt") as b:
        assert {a.get_tensor(k).dtype for k in a.keys()} == {torch.float32}  # the training dtype (fp32 on CPU)
        worst = max(float((a.get_tensor(k) - b.get_tensor(k)).abs().max()) for k in a.keys())
    assert worst == 0.0, f"the resumed trial's weights differ from the uninterrupted one's by {worst}"


# --- 3. the MLflow server killed and restarted mid-sweep ---

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(tmp_path: Path, port: int) -> subprocess.Popen:
    """A real tracking server (its own process group, so that killing it kills its uvicorn worker too)."""
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        cwd=tmp_path, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=open(tmp_path / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
    import urllib.request

    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
        assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
    raise AssertionError("mlflow server did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])


def kill_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)  # the server's group: `mlflow server` and its uvicorn worker
    server.wait(10)


def test_mlflow_server_killed_and_restarted_loses_no_metric(tmp_path, fixture_files):
    """The server is SIGKILLed once the first epoch is reported and comes back on the same port and store 15 s later;
    the report being logged meanwhile is retried with backoff by the callback (which holds that trial's training
    until it is logged: nothing is dropped, nothing runs ahead of its record) and is logged once the server is back."""
    from forgetray.metrics import registry

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    path = sweep_file(tmp_path, fixture_files, "server-restart", epochs="4", lr="grid([3e-3, 1e-3])",
                      early_checkpoints="2", max_concurrent_trials="2")
    try:
        driver = Driver(cli(path, uri, tmp_path), tmp_path)
        driver.wait_for(lambda: "epoch 1/4" in driver.log, 600, "the first epoch")
        kill_server(server)
        time.sleep(15)  # the trials keep training and reporting; their logging waits on the retries
        assert driver.proc.poll() is None, "the sweep crashed while the tracking server was down"
        server = start_mlflow_server(tmp_path, port)
        rc = driver.finish(900)
        assert rc == 0, driver.log[-4000:]

        parents, trials = runs_of(uri, "server-restart")
        assert len(parents) == 1 and len(trials) == 2
        assert {t.info.status for t in trials} == {"FINISHED"} and parents[0].info.status == "FINISHED"
        for trial in trials:
            history = histories(uri, trial)
            assert_no_duplicate_steps(history)
            # every metric of every epoch report, as the checkpoint saved it, is in the run exactly once
            ckpts = sorted((tmp_path / "storage").glob(f"server-restart/*/trials/{trial.data.tags['forgetray.trial']}"
                                                      "/ift/epoch_*/state.json"))
            assert len(ckpts) == 4
            for ckpt in ckpts:
                report = json.loads(ckpt.read_text())["metrics"]
                for name, value in report.items():
                    if name in ("kind", "epoch", "global_step") or not isinstance(value, (int, float)) \
                            or isinstance(value, bool):  # the early steps' `series` is checked below
                        continue
                    step = registry.step_of(name, report)  # the epoch, or the optimizer step for steps/...
                    points = [m for m in history.get(name, []) if m.step == step]
                    assert len(points) == 1, (name, step)
                    assert points[0].value == pytest.approx(value), (name, step)
            assert [m.step for m in history["base/bench/knowledge"]] == [0]
            assert [m.step for m in history["steps/bench/knowledge"]] == [0, 2, 3, 5, 10, 15, 20]
    finally:
        if server.poll() is None:
            kill_server(server)


# --- 4. the driver SIGKILLed, then --resume ---

def test_driver_killed_then_resumed_without_rerun_or_duplicates(tmp_path, fixture_files):
    """Also the secrets check (issue 10 item 7), on the same two real `forgetray run` processes: fake credentials
    in their environment never reach the store (see test_secrets.py's `assert_no_secret_in_store`)."""
    from test_secrets import SECRETS, assert_no_secret_in_store

    path = sweep_file(tmp_path, fixture_files, "killed-driver", lr="grid([3e-3, 1e-3])", max_concurrent_trials="1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    secrets = {**SECRETS, "FORGETRAY_SYSTEM_METRICS": "1", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    driver = Driver(cli(path, uri, tmp_path), tmp_path, env=secrets)
    def first_done_second_in() -> bool:
        # by names, not line order: on a loaded machine the second trial's first epoch line can come before the
        # progress callback's line for the first trial's end (seen once in a full suite run beside a quickstart)
        lines = driver.log.splitlines()
        done = [line.split("] ", 1)[1].rsplit(": ", 1)[0] for line in lines
                if line.startswith("[1/2 trials done") and line.endswith(": finished")]
        return bool(done) and any("epoch 1/2" in line and done[0] not in line for line in lines)

    driver.wait_for(first_done_second_in, 600, "the first trial done and the second one epoch in")
    driver.proc.send_signal(signal.SIGKILL)
    driver.finish(30)

    execution = next((tmp_path / "storage" / "killed-driver").glob("*/driver.json")).parent
    record = json.loads((execution / "driver.json").read_text())
    assert record["pid"] == driver.proc.pid and record["session_dir"]
    # What SIGKILL leaves: the runs of the parent and of the interrupted trial still say RUNNING.
    parents, trials = runs_of(uri, "killed-driver")
    assert len(parents) == 1 and len(trials) == 2
    assert parents[0].info.status == "RUNNING"
    assert sorted(t.info.status for t in trials) == ["FINISHED", "RUNNING"]
    first = next(t for t in trials if t.info.status == "FINISHED")

    done = subprocess.run(cli(path, uri, tmp_path, "--resume"), check=False, cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1", **secrets})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not session_processes(record["session_dir"]), "processes of the killed driver's Ray are left"

    parents, trials = runs_of(uri, "killed-driver")
    assert len(parents) == 1 and len(trials) == 2, "resume created duplicate runs"
    assert {t.info.status for t in trials} == {"FINISHED"} and parents[0].info.status == "FINISHED"
    again = next(t for t in trials if t.info.run_id == first.info.run_id)
    assert again.info.end_time == first.info.end_time, "the finished trial was re-run"
    for t in trials:
        history = histories(uri, t)
        assert_no_duplicate_steps(history)
        assert [m.step for m in history["sft/bench/knowledge"]] == [1, 2]
        assert [m.step for m in history["base/bench/knowledge"]] == [0]
    # The base model was evaluated once and shared by both trials (same model, same probes).
    assert len(list((tmp_path / "storage").glob("killed-driver/*/base_eval/*/summary.json"))) == 1
    assert_no_secret_in_store(uri, "killed-driver", tmp_path, lrs=[3e-3, 1e-3])


# --- 5. four concurrent trials on one sqlite store ---

def test_four_concurrent_trials_on_one_sqlite_store_one_failing_alone(tmp_path, fixture_files, ray_session, capsys):
    """Four trials at once (a local Ray with 4 CPU slots on this 2-core machine), each logging base, early-step,
    epoch and continual metrics from its driver and its Train controller into one sqlite file, through
    `forgetray run` (cli.main, in this process). One has lr 1e8 (a real cause of a NaN, no hook): AdamW moves every
    weight by ~lr in the first steps, the activations overflow fp32 and the loss becomes nan within epoch 1. That
    trial fails with the phase, epoch and step named, in its MLflow run and on the console; the others finish;
    exit code 1."""
    from forgetray import cli as forgetray_cli

    local_ray(num_cpus=4)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = sweep_file(tmp_path, fixture_files, "sqlite-4", lr="grid([1e-3, 2e-3, 3e-3, 1e8])", early_checkpoints="3",
                      max_failures="0", max_concurrent_trials="4")
    rc = forgetray_cli.main(["run", str(path), "--tracking-uri", uri, "--storage", str(tmp_path / "storage")])
    out, err = capsys.readouterr()
    assert rc == forgetray_cli.EXIT_TRIAL_FAILED, out[-3000:] + err[-3000:]

    parents, trials = runs_of(uri, "sqlite-4")
    assert len(parents) == 1 and len(trials) == 4 and parents[0].info.status == "FAILED"
    bad = next(t for t in trials if float(t.data.params["trial.lr"]) == 1e8)
    good = [t for t in trials if t is not bad]
    assert bad.info.status == "FAILED" and {t.info.status for t in good} == {"FINISHED"}
    reason = bad.data.tags["forgetray.error"]
    assert "NonFiniteLoss: non-finite loss (nan)" in reason or "NonFiniteLoss: non-finite loss (inf)" in reason, reason
    assert "in phase 'ift', epoch 1, step" in reason, reason
    # The console names the failed trial and says why, on stderr.
    name = bad.data.tags["forgetray.trial"].rsplit("-", 1)[0]
    failed_lines = [line for line in err.splitlines() if line.startswith("[forgetray] trial failed:")]
    assert len(failed_lines) == 1 and name in failed_lines[0] and "non-finite loss" in failed_lines[0], err[-3000:]

    # they did run at once: every finishing trial started before any of them ended
    assert max(t.info.start_time for t in good) < min(t.info.end_time for t in good)
    for t in good:
        history = histories(uri, t)
        assert_no_duplicate_steps(history)
        assert [m.step for m in history["sft/bench/knowledge"]] == [1, 2]
        assert [m.step for m in history["steps/bench/knowledge"]] == [0, 1, 2, 4, 5, 10]
        # a finished phase keeps no DeepSpeed state by default (delete_finished_state): models and probes stay
        trial_dir = next((tmp_path / "storage").glob(f"sqlite-4/*/trials/{t.data.tags['forgetray.trial']}"))
        assert not list((trial_dir / "ift").glob("epoch_*/deepspeed"))
        assert len(list((trial_dir / "ift").glob("epoch_*/model/model.safetensors"))) == 2


def test_tracking_store_gone_for_good_fails_within_the_bound(monkeypatch):
    """Past FORGETRAY_TRACKING_RETRY_S a write gives up with TrackingUnavailable, which names the bound (the
    callback raises it and the trial fails with it). MLflow's own client retries are turned off here to time ours."""
    from forgetray.tracking import RETRY_ENV, Tracker, TrackingUnavailable

    monkeypatch.setenv(RETRY_ENV, "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = Tracker(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="did not answer for 3 s"):
        tracker.log_metrics("0" * 32, {"train/loss": 1.0}, step=1)
    # forgetray.tracking.retrying: an attempt, then sleeps of 1 s and 2 s (the last one cut to the deadline), so it
    # gives up at the 3 s deadline, never before it; each attempt here is a refused connection (milliseconds). The
    # ceiling leaves 2 s for a busy machine: a bound taken twice (6 s) would fail.
    elapsed = time.monotonic() - start
    assert 3.0 <= elapsed < 5.0, elapsed


def _log_shared_datasets(uri: str, run_id: str, start: float) -> str:
    from forgetray.tracking import Tracker

    tracker = Tracker(uri)
    for k in range(8):  # all processes insert the same dataset row at the same instant, 8 times over
        time.sleep(max(0.0, start + 0.5 * k - time.time()))  # asleep, not spinning: the suite's cores are busy
        tracker.log_datasets(run_id, [{"name": "alpaca", "source": "/data/alpaca.jsonl", "digest": f"d{k}",
                                       "context": "training", "source_type": "local"}])
    return run_id


def test_trials_logging_one_dataset_at_once_all_link_it(tmp_path):
    """MLflow checks-then-inserts a dataset row, so concurrent trials logging the same dataset collide on its unique
    key (this failed CI runs: UNIQUE constraint failed: datasets..., on sqlite and through a tracking server, where
    only the error code BAD_REQUEST arrives); the loser's retry links the existing row. Four processes race on a
    sqlite store, then on a server (one pool: its processes import MLflow once)."""
    import multiprocessing as mp

    from mlflow import MlflowClient

    server = start_mlflow_server(tmp_path, port := free_port())
    try:
        with mp.get_context("spawn").Pool(4) as pool:
            delay = 15  # the first race waits for the spawned processes to import MLflow
            for uri in (f"sqlite:///{tmp_path / 'mlflow.db'}", f"http://127.0.0.1:{port}"):
                client = MlflowClient(uri)
                experiment = client.create_experiment("race")
                runs = [client.create_run(experiment).info.run_id for _ in range(4)]
                start = time.time() + delay
                done = pool.starmap(_log_shared_datasets, [(uri, r, start) for r in runs])
                assert done == runs, uri
                for r in runs:
                    inputs = client.get_run(r).inputs.dataset_inputs
                    assert sorted(i.dataset.digest for i in inputs) == [f"d{k}" for k in range(8)], uri
                delay = 2
    finally:
        kill_server(server)
