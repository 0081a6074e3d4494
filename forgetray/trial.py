"""The trial driver: the function Ray Tune runs for one point of the grid.

1. attach the trial to its MLflow run (re-attaching on resume), with every phase's settings as params;
2. plan the trial's phases (`forgetray.plan`) and run them, one Ray Train `TorchTrainer` per group of phases whose
   workers run `train.worker.phase_worker` under DeepSpeed: the prior fine-tuning phases once per sweep for every
   trial that shares them (`starts.ensure_start`: the start in `<execution>/start/<key>/`), the IFT phase (a
   checkpoint per epoch; the base model's probes and the restoring set are computed there, once per sweep), then
   the restorations of the IFT checkpoints, groups concurrently;
3. stages: each checkpoint classified no / pseudo / actual forgetting from the per-question results
   (`trial_stages.py`);
4. continual-learning summaries (docs/methods.md §9): once the training phases are done, the matrix a[t][b] is read back
   from the run and completed, and forgetting per benchmark and backward transfer are logged (`log_continual`).
5. as its run ends (failed or not), the run's whole metric history is stored as one artifact for the report
   (`tracking_history.write_history`).

Every trainer's storage folder is derived from the trial's config hash, so a re-run of the same trial (Tune retry,
`--resume`) finds Ray Train's snapshots there and continues from the last checkpoints; finished restorations leave a
marker and are not repeated.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from forgetray import fit
from forgetray.fit import IFT_LINK
from forgetray import storage as store
from forgetray import plan as planning
from forgetray.keys import (base_em_key, base_eval_key, cohort_key, control_key, iv_key,  # noqa: F401
                            iv_probe_key, prior_start_key, restoring_key, start_key, trial_key)
from forgetray.metrics import continual, registry
from forgetray.plan import Phase
from forgetray.records import (RUN_ID_FILE, attach_trial_run, run_name, trial_datasets,  # noqa: F401 (re-exported)
                               trial_params, varying_settings)
from forgetray.spec import TrialConfig
from forgetray.tracking import TAG_COHORT, TAG_ERROR, Tracker
from forgetray.tracking_history import TAG_HISTORY, write_history

# Written when a trial has finished (its run is FINISHED): a later execution (`--resume` after a driver that was
# killed before Tune recorded the trial as done) returns at once instead of running the trial again.
DONE_FILE = "trial_done"


def failure_reason(exc: BaseException) -> str:
    """One line saying why a trial failed: the innermost worker error's type and message when Ray wrapped it
    (Ray Train's WorkerGroupError / ControllerError, Ray's task errors), else the exception's own first line."""
    import re

    inner = getattr(exc, "worker_failures", None)
    if inner:
        exc = next(iter(inner.values()))
    exc = getattr(exc, "controller_failure", None) or getattr(exc, "cause", None) or exc
    text = f"{type(exc).__name__}: {exc}"
    found = re.findall(r"^\s*((?:[\w.]+\.)?\w+(?:Error|Exception|Loss|Unavailable)(?:\([^)]*\))?: .+)$", text,
                       re.MULTILINE)
    line = found[-1].strip() if found else text.splitlines()[0]
    return line[:500]


def run_trial(config: dict, context: dict) -> None:
    """Tune trainable. `config` = {"trial_index": i}; `context` the sweep's plain data (sweep._tune, passed once
    through Ray's object store by `tune.with_parameters`). Trial i
    leads its cohort (`context["cohorts"]`, `sharing.cohorts`: the trials one Ray Train worker group runs in turn;
    alone without one). With epoch prefixes shared (`context["followers"]`), each member leads a trajectory: once
    it is done, each shorter grid point of it gets its own run from the member's (`materialise_follower`)."""
    index = config["trial_index"]
    tracker = Tracker(context["tracking_uri"])
    members = [_member(context, i) for i in context.get("cohorts", {}).get(str(index), [index])]
    failures = _run_cohort(tracker, context, members)
    for member in members:
        if member["index"] in failures:
            continue
        for follower in context.get("followers", {}).get(str(member["index"]), []):
            materialise_follower(tracker, context, follower, member["trial"], member["run_id"], member["dirs"])
    if failures:  # the first member's error; each failed member's run has its own
        raise next(iter(failures.values()))


def _member(context: dict, index: int) -> dict:
    trial = TrialConfig.from_dict(context["trials"][index])
    resolved = context["resolved"][index]
    return {"index": index, "trial": trial, "resolved": resolved, "run_id": None,
            "dirs": trial_dirs(context["execution_dir"], trial, resolved)}


def trial_dirs(execution_dir, trial: TrialConfig, resolved: dict) -> dict:
    """The trial's own folder and the sweep's shared ones it uses (plain paths, or s3:// URIs, for the workers)."""
    def at(*parts) -> str:
        return str(store.join(execution_dir, *parts))

    return {
        "trial_dir": at("trials", trial_key(trial)),
        "start_dir": at("start", prior_start_key(trial, resolved)) if trial.prior_phases else None,
        "base_eval_dir": at("base_eval", base_eval_key(trial, resolved)),
        "base_em_dir": at("base_em", base_em_key(trial, resolved)),
        "restoring_dir": at("restoring", restoring_key(trial, resolved)) if resolved.get("restore_pool") else None,
        "control_dir": at("control", control_key(trial, resolved)) if resolved.get("restore_pool") else None,
        "iv_dir": at("iv", iv_key(trial, resolved)) if trial.iv_task else None,
        "iv_probe_dir": at("iv", iv_probe_key(trial, resolved)) if trial.iv_probe_task else None,
    }




def ift_location(trial_dir):
    """A trial's IFT checkpoints: `<trial>/ift` (a link into its cohort's folder when it shared a worker group)."""
    link = store.read_text(store.join(trial_dir, IFT_LINK)) if store.is_remote(trial_dir) else None
    return link.strip() if link else store.join(trial_dir, "ift")


def _finished_before(tracker: Tracker, trial_dir) -> str | None:
    """The run id of a trial finished by an earlier execution (not run again), else None."""
    if not store.exists(store.join(trial_dir, DONE_FILE)):
        return None
    run_id = store.read_text(store.join(trial_dir, RUN_ID_FILE)).strip()
    run = tracker.get_run(run_id)
    if run.info.status != "FINISHED":  # killed between the marker and ending the run
        if TAG_HISTORY not in run.data.tags:
            _store_history(tracker, run_id)
        tracker.end_run(run_id, ok=True)
    return run_id


def _store_history(tracker: Tracker, run_id: str) -> None:
    """The run's metric history as one table, for the report's bulk read (`tracking_history`). Not getting it
    written fails nothing: without its tag the report reads that run one metric key at a time."""
    import logging

    try:
        write_history(tracker, run_id)
    except Exception as exc:  # noqa: BLE001 (the trial's own outcome must stand)
        logging.getLogger(__name__).warning("run %s: metrics/history.parquet not written (%s: %s); the report "
                                            "will read this run per metric key", run_id, type(exc).__name__, exc)


def _run_cohort(tracker: Tracker, context: dict, members: list[dict]) -> dict[int, BaseException]:
    """Run the members' IFT phases (and the restorations in its workers) as one Ray Train run, and finish each
    member's run as soon as the run has gone past it (while the next member trains): separate restoration groups,
    continual summaries, stages. Returns the members that failed (trial index -> error); each failed member's run
    is tagged and ended FAILED, every other one FINISHED."""
    todo = []
    for member in members:
        trial, resolved, trial_dir = member["trial"], member["resolved"], member["dirs"]["trial_dir"]
        member["run_id"] = _finished_before(tracker, trial_dir)
        if member["run_id"] is None:
            member["phases"] = planning.plan(trial)
            groups = [g for g in planning.groups(trial, member["phases"]) if g[0].kind != "restore"]
            *member["priors"], member["training"] = groups
            member["run_id"] = attach_trial_run(tracker, context, trial, resolved, trial_dir, member["phases"])
            if len(members) > 1:  # which trials shared the worker group, in their order in it
                tracker.set_tag(member["run_id"], TAG_COHORT,
                                f"{cohort_key([m['trial'] for m in members])}:{members.index(member)}")
            todo.append(member)
    failures: dict[int, BaseException] = {}
    if not todo:
        return failures
    with ThreadPoolExecutor(max_workers=1) as pool:
        fit = pool.submit(_train_cohort, context, todo)
        for m, member in enumerate(todo):
            later = todo[m + 1] if m + 1 < len(todo) else None
            # The Ray Train controller logs reports in order: once the next member has reported, every report of
            # this one is in its run.
            while not fit.done() and not (later and _trained(member) and tracker.has_metrics(later["run_id"])):
                time.sleep(1.0)
            error = fit.exception() if fit.done() else None
            trained = error is None or _trained(member)
            try:
                _in_run(tracker, member["run_id"], member["dirs"]["trial_dir"],
                        lambda: _finish(tracker, context, member) if trained else _raise(error))
            except BaseException as exc:  # noqa: BLE001 (reported per member; the run says why)
                failures[member["index"]] = exc
    return failures


def _train_cohort(context: dict, members: list[dict]) -> None:
    from forgetray.starts import ensure_start

    for member in members:  # prior phases: each member's start, trained once per sweep (ensure_start)
        if member["priors"]:
            ensure_start(member["trial"], member["resolved"], member["dirs"], context, member["priors"][0])
    fit.fit_members(context, members)


def _raise(exc: BaseException) -> None:
    raise exc


def _trained(member: dict) -> bool:
    """Whether the member's IFT run got through its last phase (its last checkpoint is on storage)."""
    last = member.get("training", [None])[-1]
    if last is None:
        return False
    epoch = last.restores_epoch if last.kind == "restore" else last.epochs
    ift = store.join(ift_location(member["dirs"]["trial_dir"]), planning.checkpoint_name(last, epoch))
    return store.exists(store.join(ift, "state.json"))


def _finish(tracker: Tracker, context: dict, member: dict) -> None:
    """What a member's run gets after its IFT run: its state pruned, the continual summaries, its separate
    restoration groups (if any), its stages."""
    from forgetray import trial_stages

    trial, resolved, dirs, run_id, phases = (member["trial"], member["resolved"], member["dirs"], member["run_id"],
                                             member["phases"])
    trial_dir = Path(dirs["trial_dir"])
    if trial.delete_finished_state:  # the IFT phase is done: nothing resumes from its DeepSpeed state again
        from forgetray.train.retention import drop_state

        ift = ift_location(dirs["trial_dir"])
        for name in store.children(ift):
            if name.startswith("epoch_"):
                drop_state(store.join(ift, name))
    # Right after training: the summaries need nothing from the restorations, and a restoration that fails
    # then does not cost them.
    log_continual(tracker, run_id, trial, resolved, phases)
    restorations = [g for g in planning.groups(trial, phases) if g[0].kind == "restore"]
    if restorations:
        _restore_all(trial, resolved, dirs, context, run_id, restorations)
    if any(p.kind == "restore" for p in phases):  # in their own groups, or in the IFT's (restore_group=0)
        checkpoints = sorted((trial_dir / "ift").glob("epoch_*"))
        trial_stages.classify_trial(tracker, run_id, trial, resolved, dirs, checkpoints)


def materialise_follower(tracker: Tracker, context: dict, index: int, leader: TrialConfig, leader_run_id: str,
                         leader_dirs: dict) -> None:
    """Grid point `index` (epochs e < the leader's) from its leader's trajectory, as its own run: its own params,
    the leader's metrics and probe artifacts up to epoch e (`sharing.follower_metrics`), then what depends on its
    own settings recomputed: the continual summaries (a[T] = SFT_e) and the stages of the leader's checkpoints
    1..e. Tagged `forgetray.trajectory` = the leader's run, on both; a DONE marker, so a resume skips it."""
    import tempfile

    from forgetray import sharing, trial_stages
    from forgetray.tracking import TAG_TRAJECTORY

    trial = TrialConfig.from_dict(context["trials"][index])
    resolved = context["resolved"][index]
    trial_dir = trial_dirs(context["execution_dir"], trial, resolved)["trial_dir"]
    if _finished_before(tracker, trial_dir):
        return
    phases = planning.plan(trial)
    run_id = attach_trial_run(tracker, context, trial, resolved, trial_dir, phases)

    def body() -> None:
        tracker.set_tag(leader_run_id, TAG_TRAJECTORY, leader_run_id)
        tracker.set_tag(run_id, TAG_TRAJECTORY, leader_run_id)
        names = list(tracker.get_run(leader_run_id).data.metrics)
        copied = sharing.follower_metrics(tracker.metric_history(leader_run_id, names), trial.epochs, leader.epochs,
                                          len(trial.prior_phases))
        for step, values in sorted(copied.items()):
            tracker.log_metrics(run_id, values, step=step)
        with tempfile.TemporaryDirectory() as tmp:
            for folder in _artifact_folders(tracker, leader_run_id, "probes"):
                if sharing.follower_artifact(folder, trial.epochs):
                    local = tracker.download_artifacts(leader_run_id, folder, Path(tmp))
                    tracker.log_artifacts(run_id, local, folder)
        for key, path in (("iv_dir", "iv"), ("iv_probe_dir", "iv_probe")):  # its vectors (the same keys)
            if leader_dirs.get(key) and Path(leader_dirs[key]).is_dir():
                tracker.log_artifacts(run_id, Path(leader_dirs[key]), path)
        log_continual(tracker, run_id, trial, resolved, phases)
        if trial.restore_pool:  # the leader's checkpoints and restorations, with the follower's stage settings
            checkpoints = sorted((Path(leader_dirs["trial_dir"]) / "ift").glob("epoch_*"))[:trial.epochs]
            trial_stages.classify_trial(tracker, run_id, trial, resolved, leader_dirs, checkpoints)

    _in_run(tracker, run_id, trial_dir, body)


def _artifact_folders(tracker: Tracker, run_id: str, path: str) -> list[str]:
    """The leaf folders (`probes/sft/epoch_001`) under `path` of a run's artifacts."""
    entries = tracker.list_artifacts(run_id, path)
    folders = [e for e in entries if not Path(e).suffix]
    if not folders:
        return [path] if entries else []
    return [leaf for folder in folders for leaf in _artifact_folders(tracker, run_id, folder)]


def _in_run(tracker: Tracker, run_id: str, trial_dir, body) -> None:
    """Run `body`; mark the trial done, or tag why it failed; store the run's metric history; end the run either
    way."""
    ok, store_gone = False, False
    try:
        body()
        ok = True
        store.write_text(store.join(trial_dir, DONE_FILE), run_id + "\n")
    except BaseException as exc:  # the run says why (the console summary prints the same line)
        reason = failure_reason(exc)
        store_gone = "TrackingUnavailable" in reason
        if not store_gone:  # a store that is gone is not waited for again
            try:
                tracker.set_tag(run_id, TAG_ERROR, reason)
            except Exception:  # noqa: BLE001 (the trial's own error is what must surface)
                pass
        raise
    finally:
        if not store_gone:  # a failed trial's table too: the report shows what it logged
            _store_history(tracker, run_id)
        tracker.end_run(run_id, ok=ok)


def log_continual(tracker: Tracker, run_id: str, trial: TrialConfig, resolved: dict,
                  phases: list[Phase]) -> dict[str, float]:
    """Complete the continual-learning matrix and log its summaries at T (returns what it logged).

    a[t][b] = `continual/<b>/knowledge` at step t: t = 0..k were probed by the workers (trials with k prior phases);
    a[T] (T = k + 1) is the IFT phase's last checkpoint (`sft/<b>/knowledge`) and, without prior phases, a[0] is the
    base model (`base/<b>/knowledge`): those are logged here under the matrix's name, so the matrix reads from one
    metric. Then `continual/<b>/forgetting` and `continual/bwt` at step T. What the run already has at a step is not
    logged again (a re-run of the trial); what is missing (a failed probe) is left out of the summaries."""
    benches = list(resolved["benchmarks"])  # metric keys, in the order of trial.benchmarks
    steps = planning.fine_tuning_steps(phases)
    last = len(steps)  # T
    cell = {b: registry.CONTINUAL_KNOWLEDGE.name(bench=b) for b in benches}
    forgetting = {b: registry.CONTINUAL_FORGETTING.name(bench=b) for b in benches}
    sources = {b: (registry.KNOWLEDGE.name(state="base", bench=b), registry.KNOWLEDGE.name(state="sft", bench=b))
               for b in benches}
    history = tracker.metric_history(run_id, [*cell.values(), *forgetting.values(), registry.CONTINUAL_BWT.name(),
                                              *(name for pair in sources.values() for name in pair)])
    matrix: list[dict[str, float]] = [{} for _ in range(last + 1)]
    for bench in benches:
        for t, value in history[cell[bench]].items():
            if t <= last:
                matrix[t][bench] = value
        base, sft = sources[bench]
        if last == 1 and 0 in history[base]:
            matrix[0].setdefault(bench, history[base][0])
        if trial.epochs in history[sft]:
            matrix[last][bench] = history[sft][trial.epochs]
    own = [None] + [benches[trial.benchmarks.index(p.data.own_benchmark)] if p.data.own_benchmark else None
                    for p in steps]
    logged: dict[str, float] = {}
    for t in (0, last):
        new = {cell[b]: v for b, v in matrix[t].items() if t not in history[cell[b]]}
        tracker.log_metrics(run_id, new, step=t)
        logged.update(new)
    summary = {forgetting[b]: v for b, v in continual.forgetting_by_benchmark(matrix).items()}
    summary[registry.CONTINUAL_BWT.name()] = continual.backward_transfer(matrix, own)
    summary = {name: v for name, v in summary.items() if last not in history[name] and math.isfinite(v)}
    tracker.log_metrics(run_id, summary, step=last)  # undefined (nan: no BWT with T = 1) is not logged
    logged.update(summary)
    return logged


def _restore_all(trial: TrialConfig, resolved: dict, dirs: dict, context: dict, run_id: str,
                 groups: list[list[Phase]]) -> None:
    """Run the restoration groups concurrently (Ray queues them on resources), each one TorchTrainer restoring its
    checkpoints in turn; restorations finished by an earlier execution (a marker file) are skipped."""
    trial_dir = Path(dirs["trial_dir"])

    def done(phase: Phase) -> Path:
        return trial_dir / f"{planning.checkpoint_name(phase, phase.restores_epoch)}.done"

    todo = [[p for p in group if not done(p).is_file()] for group in groups]
    todo = [group for group in todo if group]

    def restore(group: list[Phase]) -> None:
        first, last = group[0].restores_epoch, group[-1].restores_epoch
        fit.fit(trial, resolved, dirs, context, run_id, f"restore_{first:03d}-{last:03d}", group)
        for phase in group:  # finished in this execution: an interrupted sweep's resume skips it
            done(phase).write_text("ok\n")

    with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
        for future in [pool.submit(restore, g) for g in todo]:
            future.result()  # re-raise the first failure
