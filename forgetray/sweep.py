"""Run a sweep: validate, open its MLflow parent run, and let Ray Tune schedule one trial driver per grid point.

Storage layout (`--storage`, default ./forgetray-results/storage):

    <storage>/<sweep name>/<execution id>/sweep.json        what ran, the parent MLflow run id
                                         /tune/             Ray Tune's experiment (used by --resume)
                                         /trials/<key>/     each trial's Ray Train run, checkpoints, MLflow run id
                                         /start/<key>/      a trained start (prior phases), shared by its trials
                                         /base_eval/<key>/  base-model probes, shared by the trials of one model
                                         /control/<key>/    the control R_0 (the start restored) and its probes

`--storage s3://bucket/prefix` keeps the same layout on object storage (`forgetray.storage`: Ray Tune and Ray Train
write through pyarrow's S3 filesystem; shared results are published by create-if-absent, `forgetray.claims`).

Trials that differ only in `epochs` share one trajectory when the schedule allows (`forgetray.sharing`, unless
`Sweep(share_trajectories=False)`): Tune runs one driver per trajectory, its leader (the most epochs), which then
makes each shorter grid point's run from its own (`trial.materialise_follower`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

from forgetray import sharing
from forgetray import storage as store
from forgetray.resources import benchmark_key, resolve_trial
from forgetray.grids import Sweep, flatten
from forgetray.spec import SpecError
from forgetray.tracking import (DEFAULT_RESULTS, SYSTEM_METRICS_ENV, TAG_NOTE, Tracker, default_tracking_uri,
                                metric_guide)
from forgetray.ui import charts_view, ui_base
from forgetray.trial import failure_reason

TUNE_LOGGERS_ENV = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"  # Ray Tune's switch for its default result loggers

# Ray Train V2 settings for a Ray this process starts (a cluster's own are left to its operator)
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
DRIVER_MEMORY = 256 * 1024**2  # bytes reserved per trial driver (it only orchestrates; workers hold the model)
# Custom resources each trial driver asks for, as JSON (e.g. '{"head_node": 0.01}'): on a cluster whose worker
# nodes may be lost (spot instances), this keeps the drivers (and the Train controllers they start) on the nodes
# that stay; a lost worker node then costs a restart of the workers from the last checkpoint, not the trial.
DRIVER_RESOURCES_ENV = "FORGETRAY_DRIVER_RESOURCES"


def run_sweep(sweep: Sweep, tracking_uri: str | None = None, storage: str | os.PathLike | None = None,
              resume: bool = False, verbose: bool = True) -> pd.DataFrame:
    """Run (or with `resume=True` continue) a sweep; return one row per (trial, checkpoint) read back from MLflow."""
    # Everything that can be wrong with the input is found here, before Ray starts or any run is created.
    resolved = [resolve_trial(trial) for trial in sweep.trials]
    if storage is not None and "://" in str(storage):
        storage_root = _object_storage(str(storage), sweep)
    else:
        storage_root = Path(storage).expanduser().resolve() if storage else (DEFAULT_RESULTS / "storage").resolve()
    sweep_root = store.join(storage_root, sweep.name)
    trials = [t.to_dict() for t in sweep.trials]
    if resume:
        execution_dir, state = _latest_execution(sweep_root)
        for option in ("share_trajectories", "share_workers"):  # an execution from before an option ran without it
            if state["sweep"].get(option, False) != getattr(sweep, option):
                raise SpecError(f"--resume: {execution_dir} ran with {option}={state['sweep'].get(option, False)}: "
                                f"resume with --set {option}={str(state['sweep'].get(option, False)).lower()}")
        if [t["config_hash"] for t in state["trials"]] != [t.config_hash() for t in sweep.trials]:
            raise SpecError(f"--resume: the sweep {sweep.name!r} changed since {execution_dir} ran; "
                            "resume needs the same grid and settings")
        tracking_uri = state["tracking_uri"]
    else:
        execution_dir = store.join(sweep_root, time.strftime("%Y%m%d-%H%M%S"))
        local_root = storage_root if not store.is_remote(storage_root) else (DEFAULT_RESULTS / "storage").resolve()
        tracking_uri = tracking_uri or default_tracking_uri(local_root.parent if not storage else local_root)

    tracker = Tracker(tracking_uri, artifact_root=Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts"
                      if tracking_uri.startswith("sqlite:///") else None)
    if resume:
        end_stale_driver(execution_dir, verbose)
        parent_run_id = state["parent_run_id"]
        tracker.reopen(parent_run_id)
    else:
        if store.is_remote(execution_dir):
            if store.children(execution_dir):
                raise SpecError(f"{execution_dir} exists already")
        else:
            execution_dir.mkdir(parents=True, exist_ok=False)
        execution = store.name(execution_dir)
        parent_run_id = tracker.start_sweep_run(sweep.name, execution, flatten({"sweep": sweep.to_dict()}))
        tracker.set_tag(parent_run_id, TAG_NOTE, _sweep_note(sweep, execution,
                                                             charts_view(tracker, parent_run_id)))
        state = {
            "sweep": sweep.to_dict(), "tracking_uri": tracking_uri, "parent_run_id": parent_run_id,
            "trials": [{"config_hash": t.config_hash(), "name": t.short_name()} for t in sweep.trials],
        }
        store.write_text(store.join(execution_dir, "sweep.json"), json.dumps(state, indent=1, sort_keys=True))
    trained = len(sharing.trajectories(list(sweep.trials), sweep.share_trajectories))
    shared = f" ({trained} trained; the shorter epochs from their trajectory)" if trained < sweep.size else ""
    _say(verbose, f"[forgetray] sweep {sweep.name!r}: {sweep.size} trial(s){shared}; MLflow {tracking_uri} "
                  f"(parent run {parent_run_id}); storage {execution_dir}")

    ui_link = ui_base(tracking_uri) + "/" + charts_view(tracker, parent_run_id)
    _say(verbose, f"[forgetray] the trials' knowledge curves in the MLflow UI: {ui_link}")
    ok = False
    try:
        results, cohorts = _tune(sweep, trials, resolved, execution_dir, tracking_uri, parent_run_id, resume,
                                 verbose)
        failed = [r for r in results if r.error is not None]
        ok = not failed
        followers = _followers(sweep)
        failed_count = 0
        for r in failed:
            index = r.config.get("trial_index")
            for i in cohorts.get(str(index), [index]) if isinstance(index, int) else [index]:
                if isinstance(i, int) and _done(execution_dir, sweep, resolved, i):
                    continue  # a cohort's member that finished before another one failed
                name = sweep.trials[i].short_name() if isinstance(i, int) else i
                _say(True, f"[forgetray] trial failed: {name}: {failure_reason(r.error)}")
                failed_count += 1
                for f in followers.get(str(i), []):  # a failed trajectory's shorter grid points have no results
                    _say(True, f"[forgetray] trial failed: {sweep.trials[f].short_name()}: from trajectory {name}")
                    failed_count += 1
    finally:
        tracker.end_run(parent_run_id, ok=ok)
    table = tracker.checkpoint_table(parent_run_id)
    table.attrs.update({"tracking_uri": tracking_uri, "parent_run_id": parent_run_id, "ui_link": ui_link,
                        "execution_dir": str(execution_dir), "failed_trials": 0 if ok else failed_count})
    return table


# What does not run on object storage yet: these read and write their shared folders as local paths.
NOT_ON_OBJECT_STORAGE = ("restore_pool", "iv_task", "iv_probe_task")


def _object_storage(uri: str, sweep: Sweep) -> str:
    """`--storage s3://...` checked before anything runs: the URI, the endpoint, the bucket, and the trials."""
    root = store.validate(uri)
    for trial in sweep.trials:
        for setting in NOT_ON_OBJECT_STORAGE:
            if getattr(trial, setting):
                raise SpecError(f"--storage {uri!r}: {setting} is not supported on object storage yet "
                                "(use a shared filesystem path)")
    return root


def _done(execution_dir, sweep: Sweep, resolved: list, index: int) -> bool:
    from forgetray.trial import DONE_FILE, trial_dirs

    trial_dir = trial_dirs(execution_dir, sweep.trials[index], resolved[index])["trial_dir"]
    return store.exists(store.join(trial_dir, DONE_FILE))


DRIVER_FILE = "driver.json"  # the driver's pid and, if it started one, its local Ray session (for --resume)


def _record_driver(execution_dir: Path) -> None:
    """Note who drives this execution: a driver killed with SIGKILL runs no clean-up, and `--resume` must know which
    processes were its local Ray cluster. Joining an existing cluster (`ray job submit`, RAY_ADDRESS) records none."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    own = node is not None and node.head and bool(getattr(node, "all_processes", None))  # started here
    record = {"pid": os.getpid(), "session_dir": node.get_session_dir_path() if own else None}
    store.write_text(store.join(execution_dir, DRIVER_FILE), json.dumps(record))


def end_stale_driver(execution_dir: Path, verbose: bool) -> list[int]:
    """Before `--resume`: refuse if the execution's driver still runs; else end the processes left of the local Ray
    cluster it started (found by its session folder in their command lines; by PID, never `ray stop`): Ray's own
    processes die with their parent, but workers in the middle of a step may linger, and they must not keep
    writing checkpoints and metrics beside the resumed execution. Returns the PIDs ended."""
    import signal

    import psutil

    text = store.read_text(store.join(execution_dir, DRIVER_FILE))
    if text is None:
        return []
    record = json.loads(text)
    try:
        old = psutil.Process(record["pid"])
        if old.pid != os.getpid() and "forgetray" in " ".join(old.cmdline()):
            raise SpecError(f"--resume: the driver of {execution_dir} is still running (pid {old.pid})")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    session = record.get("session_dir")
    if not session:
        return []
    name = Path(session).name
    stale = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and any(name in part for part in proc.info["cmdline"] or []):
                stale.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in stale:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(stale, timeout=30)
    if stale:
        _say(verbose, f"[forgetray] ended {len(stale)} process(es) left of the killed driver's Ray session {name}: "
                      f"{sorted(p.pid for p in stale)}")
    return sorted(p.pid for p in stale)


def _sweep_note(sweep: Sweep, execution: str, charts: str) -> str:
    """The parent run's description (markdown): what the execution ran and the link to its trials' curves."""
    axes = ", ".join(f"`{k}` over {list(v)}" for k, v in sweep.axes.items()) or "none (a single trial)"
    return (f"Execution `{execution}` of sweep **{sweep.name}**: {sweep.size} trial(s), the nested runs below "
            f"(expand this run). Swept: {axes}; every setting is a `sweep.settings.*` parameter.\n\n"
            f"[The trials' knowledge curves]({charts}) (the trial runs only, in chart mode, charts filtered to "
            f"`knowledge`; clear the chart filter for every metric). After the sweep, `report/` holds the stage "
            f"table and the figures.\n\nWhat `step` means, by chart section:\n\n" + metric_guide())


def _latest_execution(sweep_root) -> tuple:
    executions = [store.join(sweep_root, name) for name in store.children(sweep_root)]
    executions = [e for e in executions if store.exists(store.join(e, "sweep.json"))]
    if not executions:
        raise SpecError(f"--resume: no earlier execution of this sweep under {sweep_root}")
    return executions[-1], json.loads(store.read_text(store.join(executions[-1], "sweep.json")))


def _state_api() -> bool:
    """Whether the state API of the Ray this process joined answers (it is served by the dashboard, which forgetray's
    local Ray and the tests' start without): one request, ~10 ms either way. The Ray is named by its address: on a
    machine running several, the state API's own lookup refuses to choose."""
    import ray
    from ray.util.state import list_nodes
    from ray.util.state.exception import RayStateApiException

    try:
        list_nodes(address=ray.get_runtime_context().gcs_address, limit=1, timeout=10)
    except (RayStateApiException, ConnectionError):
        return False
    return True


def _tune(sweep: Sweep, trials: list, resolved: list, execution_dir: Path, tracking_uri: str, parent_run_id: str,
          resume: bool, verbose: bool):
    import ray
    from ray import tune

    from forgetray.callbacks import make_progress
    from forgetray.trial import run_trial

    if not ray.is_initialized():
        # Joins the cluster of `ray job submit` / RAY_ADDRESS if there is one, else starts a local one. Worker output
        # (DeepSpeed, Ray Train INFO lines) stays in Ray's log folder unless FORGETRAY_WORKER_LOGS=1: the console
        # shows forgetray's progress, and a failed trial's error is printed with its traceback snippet anyway.
        # A local Ray's processes inherit this environment: Ray Train's controllers then poll their workers every
        # 0.25 s instead of 2 s (a worker's next report waits for the poll; measured: the quickstart 142 -> 130 s),
        # and start no preemption watcher (an extra actor per trainer, for cloud spot instances).
        for name, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(name, value)
        ray.init(include_dashboard=False, logging_level="WARNING",
                 log_to_driver=os.environ.get("FORGETRAY_WORKER_LOGS", "0") == "1")
    _record_driver(execution_dir)
    followers = _followers(sweep)
    leaders = [i for i in range(len(trials)) if not any(i in f for f in followers.values())]
    cohorts = _cohorts(sweep, leaders, execution_dir)
    context = {
        "sweep_name": sweep.name, "trials": trials, "resolved": resolved, "execution_dir": str(execution_dir),
        "followers": followers, "cohorts": cohorts,
        "tracking_uri": tracking_uri, "parent_run_id": parent_run_id,
        "system_metrics": os.environ.get(SYSTEM_METRICS_ENV, "auto"),  # decided here: the driver's environment
        "state_api": _state_api(),  # forgetray.fit.trainer_class: whether Ray Train's placement-group cleaner can act
    }
    # Tune's default CSV/JSON/TensorBoard loggers: MLflow has every metric; TensorBoard's logger warned about the
    # reports' series values on every run and printed a "visualize with TensorBoard" hint. Off unless set otherwise.
    os.environ.setdefault(TUNE_LOGGERS_ENV, "1")
    if os.environ[TUNE_LOGGERS_ENV] == "1":  # then Tune's result grid finds no per-trial files and says so per trial
        import logging

        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    firsts = [int(first) for first in cohorts]  # one Tune trial per cohort, named by its first trial
    pinned = json.loads(os.environ.get(DRIVER_RESOURCES_ENV) or "{}")
    # The context (every trial's config) goes to the object store once, not into each Tune trial's config: Tune
    # deep-copies the param space per trial and keeps every trial's config in the driver and its experiment state,
    # which made the driver grow ~5 MiB per trial of a 216-trial sweep (bench/README.md, bench_orchestration).
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    {"cpu": 0, "memory": DRIVER_MEMORY, **pinned})
    tune_path, tune_fs = store.ray_storage(store.join(execution_dir, "tune"))
    if resume and tune.Tuner.can_restore(tune_path, storage_filesystem=tune_fs):
        # Finished trials are not re-run; unfinished and errored ones continue from their last checkpoint.
        tuner = tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=tune_fs,
                                   param_space={"trial_index": tune.grid_search(firsts)})
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial_index": tune.grid_search(firsts)},
            tune_config=tune.TuneConfig(max_concurrent_trials=_concurrency(sweep)),
            run_config=tune.RunConfig(
                name="tune", storage_path=store.ray_storage(execution_dir)[0], storage_filesystem=tune_fs,
                verbose=0,
                callbacks=[make_progress([t.short_name() for t in sweep.trials], [t.epochs for t in sweep.trials],
                                         [benchmark_key(t.benchmarks[0]) for t in sweep.trials], verbose,
                                         {int(k): v for k, v in followers.items()},
                                         {int(k): v for k, v in cohorts.items()})],
                failure_config=tune.FailureConfig(max_failures=0),  # retries happen inside the trial (Ray Train)
            ),
        )
    return list(tuner.fit()), cohorts


def _cohorts(sweep: Sweep, leaders: list[int], execution_dir: Path) -> dict[str, list[int]]:
    """First trial index (a string: JSON-like data) -> the trials one worker group runs in turn
    (`sharing.cohorts`), decided by the first execution and kept in sweep.json: a resumed one finds its runs."""
    path = store.join(execution_dir, "sweep.json")
    state = json.loads(store.read_text(path))
    if "cohorts" not in state:
        groups = sharing.cohorts(list(sweep.trials), leaders, _concurrency(sweep), sweep.share_workers)
        state["cohorts"] = {str(group[0]): group for group in groups}
        store.write_text(path, json.dumps(state, indent=1, sort_keys=True))
    return state["cohorts"]


def _followers(sweep: Sweep) -> dict[str, list[int]]:
    """Leader's trial index (a string: it crosses Ray as JSON-like data) -> the shorter grid points it serves."""
    groups = sharing.trajectories(list(sweep.trials), sweep.share_trajectories)
    return {str(group[0]): group[1:] for group in groups if len(group) > 1}


def _concurrency(sweep: Sweep) -> int:
    """As many trials at once as the cluster's CPUs/GPUs hold (or the sweep's own limit)."""
    import ray

    if sweep.max_concurrent_trials:
        return sweep.max_concurrent_trials
    available = ray.cluster_resources()
    need_cpu = max(t.workers * t.cpus_per_worker for t in sweep.trials)
    need_gpu = max(t.workers * t.gpus_per_worker for t in sweep.trials)
    fits = int(available.get("CPU", 1) // need_cpu)
    if need_gpu:
        fits = min(fits, int(available.get("GPU", 0) // need_gpu))
    return max(1, fits)


def _say(verbose: bool, text: str) -> None:
    if verbose:
        print(text, file=sys.stderr if text.startswith("[forgetray] trial failed") else sys.stdout, flush=True)
