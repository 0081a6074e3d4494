# .venv/bin/python bench/bench_report_scale.py --source /work/main/forgetray-results/mlflow.db --n 12 216 1000
"""How `forgetray report` scales with the number of trials (issue 19 item 2): its wall time and HTTP requests for
N trials, read in bulk (one `metrics/history.parquet` per trial) and one metric key at a time (the fallback for runs
without it), against a sqlite store and through an `mlflow server`.

The store: a real sweep execution's runs (by default the newest execution of `--experiment` in `--source`, read
only) copied row by row (every run, metric point, latest metric, param, tag and dataset input, by SQL) into a new
sqlite store, its trials repeated to N (trial i is a copy of source trial i mod n), every artifact hard-linked. The
12 source trials first get their history table written by forgetray's own `tracking_history.write_history` (the
source predates it); the copies carry it. Copy k >= 1 of a trial differs from it in its run id, name, config
hash, replicate group (each suffixed `-c<k>`) and `trial.weight_decay` (k x 1e-4): a grid point of its own, as in
a bigger study, so its replicates pool together and not with another copy's.

Requests are counted on the client (every `requests.Session.send`, MLflow's HTTP client) while the report runs,
and cross-checked against the server's access log. The server: `mlflow server --workers 1` with
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false, serving the artifacts (`mlflow-artifacts:/` URIs). Every report's output
files (tables and figures) are compared byte for byte between the two paths.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forgetray.tracking import TAG_CONFIG_HASH, TAG_PARENT, TAG_RUN_NAME, TAG_TRIAL  # noqa: E402

TAG_GROUP = "forgetray.replicate_group"
RUN_TABLES = ("runs", "tags", "params", "metrics", "latest_metrics")  # keyed by run_uuid


# --- the store ------------------------------------------------------------------------------------------------------

def _columns(db: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in db.execute(f"pragma main.table_info({table})")]


def _copy_rows(db: sqlite3.Connection, table: str, key: str, old: str, new: dict[str, object],
               src: str = "src") -> None:
    """INSERT the rows of `src`.`table` whose `key` is `old`, with the columns in `new` set to its values."""
    columns = _columns(db, table)
    select = ", ".join("?" if c in new else f'"{c}"' for c in columns)
    quoted = ", ".join(f'"{c}"' for c in columns)
    db.execute(f"INSERT INTO main.{table} ({quoted}) SELECT {select} FROM {src}.{table} WHERE {key} = ?",
               [new[c] for c in columns if c in new] + [old])


def _link_tree(src: Path, dst: Path) -> None:
    """The folder's files as hard links (copies across file systems)."""
    for path in src.rglob("*"):
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def source_execution(source: Path, experiment: str, parent: str | None) -> tuple[str, list[str]]:
    """The source sweep run (the newest of the experiment unless given) and its trial runs."""
    db = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    if parent is None:
        row = db.execute("SELECT r.run_uuid FROM runs r JOIN experiments e USING (experiment_id) JOIN tags t ON "
                         "t.run_uuid = r.run_uuid AND t.key = 'forgetray.kind' AND t.value = 'sweep' "
                         "WHERE e.name = ? ORDER BY r.start_time DESC LIMIT 1", (experiment,)).fetchone()
        if row is None:
            raise SystemExit(f"no sweep run of experiment {experiment!r} in {source}")
        parent = row[0]
    trials = [r[0] for r in db.execute("SELECT t.run_uuid FROM tags t JOIN tags k ON k.run_uuid = t.run_uuid AND "
                                       "k.key = 'forgetray.kind' AND k.value = 'trial' WHERE t.key = ? AND "
                                       "t.value = ? ORDER BY t.run_uuid", (TAG_PARENT, parent))]
    if not trials:
        raise SystemExit(f"sweep run {parent} in {source} has no trial runs")
    return parent, trials


def build_store(source: Path, root: Path, n: int, experiment: str = "quickstart", parent: str | None = None) -> dict:
    """A sqlite store in `root` holding the source execution with its trials repeated to `n` (module docstring).
    Returns {"uri", "experiment", "parent", "trials", "artifacts"}."""
    from mlflow.tracking import MlflowClient

    from forgetray.tracking import Tracker
    from forgetray.tracking_history import write_history

    parent, sources = source_execution(source, experiment, parent)
    if n < len(sources):
        raise SystemExit(f"N={n} is below the source's {len(sources)} trials")
    root.mkdir(parents=True)
    artifacts = root / "artifacts"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    experiment_id = MlflowClient(uri).create_experiment(experiment, artifact_location=(artifacts / experiment).as_uri())
    db = sqlite3.connect(root / "mlflow.db", isolation_level=None)
    db.execute("ATTACH ? AS src", (f"file:{source}?mode=ro",))
    db.execute("BEGIN")
    (source_experiment,) = db.execute("SELECT experiment_id FROM src.runs WHERE run_uuid = ?", (parent,)).fetchone()
    db.execute("INSERT INTO main.experiment_tags (key, value, experiment_id) SELECT key, value, ? FROM "
               "src.experiment_tags WHERE experiment_id = ?", (experiment_id, source_experiment))
    copied = set()

    def copy_run(old: str, new: str, name: str | None = None, k: int = 0, src: str = "src") -> None:
        (old_uri,) = db.execute(f"SELECT artifact_uri FROM {src}.runs WHERE run_uuid = ?", (old,)).fetchone()
        new_uri = (artifacts / experiment_id / new / "artifacts").as_uri()
        run_row = {"run_uuid": new, "experiment_id": experiment_id, "artifact_uri": new_uri}
        if name:
            run_row["name"] = name
        _copy_rows(db, "runs", "run_uuid", old, run_row, src)
        for table in RUN_TABLES[1:]:
            _copy_rows(db, table, "run_uuid", old, {"run_uuid": new}, src)
        if k:  # a grid point of its own: name, config hash, replicate group, weight decay
            for key in (TAG_TRIAL, TAG_RUN_NAME, TAG_CONFIG_HASH, TAG_GROUP):
                db.execute("UPDATE main.tags SET value = value || ? WHERE run_uuid = ? AND key = ?",
                           (f"-c{k}", new, key))
            db.execute("INSERT OR REPLACE INTO main.params (key, value, run_uuid) VALUES ('trial.weight_decay', ?, ?)",
                       (f"{k * 1e-4:.4f}", new))
        inputs = db.execute(f"SELECT input_uuid, destination_id, destination_type FROM {src}.inputs "
                            "WHERE source_id = ?", (old,)).fetchall()
        for input_uuid, dest_id, dest_type in inputs:
            new_input = uuid.uuid4().hex
            if dest_type == "DATASET" and dest_id not in copied:
                _copy_rows(db, "datasets", "dataset_uuid", dest_id, {"experiment_id": experiment_id}, src)
                copied.add(dest_id)
            _copy_rows(db, "inputs", "input_uuid", input_uuid, {"input_uuid": new_input, "source_id": new}, src)
            _copy_rows(db, "input_tags", "input_uuid", input_uuid, {"input_uuid": new_input}, src)
        if _local(old_uri).is_dir():
            _link_tree(_local(old_uri), _local(new_uri))

    # New run ids throughout: MLflow's client caches each run id's artifact root, and must never find the source's.
    new_parent, originals = uuid.uuid4().hex, {trial: uuid.uuid4().hex for trial in sources}
    copy_run(parent, new_parent)
    for trial, new in originals.items():
        copy_run(trial, new)
    db.execute(f"UPDATE main.tags SET value = ? WHERE key = ? AND run_uuid IN ({','.join('?' * len(originals))})",
               (new_parent, TAG_PARENT, *originals.values()))
    db.execute("COMMIT")
    sources, parent = list(originals.values()), new_parent
    tracker = Tracker(uri)
    for trial in sources:  # what forgetray now writes as a trial's run ends
        write_history(tracker, trial)
    # The copies are made from the store just written (its history tables and tags included).
    db.execute("DETACH src")
    db.execute("BEGIN")
    names = dict(db.execute(f"SELECT run_uuid, value FROM main.tags WHERE key = ? AND run_uuid IN "
                            f"({','.join('?' * len(sources))})", (TAG_RUN_NAME, *sources)).fetchall())
    trials = list(sources)
    for i in range(len(sources), n):
        old, k = sources[i % len(sources)], i // len(sources)
        new = uuid.uuid4().hex
        copy_run(old, new, f"{names.get(old, old)}-c{k}", k, src="main")
        trials.append(new)
    db.execute("COMMIT")
    db.close()
    return {"uri": uri, "experiment": experiment, "parent": parent, "trials": trials, "artifacts": artifacts,
            "db": root / "mlflow.db"}


def serve_artifacts_by_server(store: dict) -> None:
    """Point every run's artifact root at the server's proxy (`mlflow-artifacts:/...`, served from the same files),
    as runs logged through a server with `--artifacts-destination` have it."""
    db = sqlite3.connect(store["db"])
    prefix = store["artifacts"].as_uri()
    db.execute("UPDATE runs SET artifact_uri = 'mlflow-artifacts:' || substr(artifact_uri, ?)", (len(prefix) + 1,))
    db.commit()
    db.close()


# --- the server and the request count ------------------------------------------------------------------------------

@contextlib.contextmanager
def mlflow_server(store: dict, log: Path):
    """`mlflow server --workers 1` on the store, serving its artifacts; yields its URL, stops it after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", store["uri"],
               "--artifacts-destination", str(store["artifacts"]), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import requests

        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mlflow server did not start; its log:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextlib.contextmanager
def counting_requests():
    """Counts every HTTP request this process sends (MLflow's client sends through `requests.Session`)."""
    import requests

    count = {"n": 0, "urls": []}
    send = requests.Session.send

    def counted(self, request, **kwargs):
        count["n"] += 1
        count["urls"].append(f"{request.url} {request.body or ''}")
        return send(self, request, **kwargs)

    requests.Session.send = counted
    try:
        yield count
    finally:
        requests.Session.send = send


def access_log_requests(log: Path) -> int:
    """Requests the server answered, by its (uvicorn) access log lines."""
    return sum(1 for line in log.read_text(errors="replace").splitlines() if '" 200' in line or '" 404' in line)


# --- one report -----------------------------------------------------------------------------------------------------

def reads_only(experiment: str, uri: str, out: Path, parent_run_id: str, per_key_history: bool):
    """What `build_report` reads, and nothing else: the sweep run, its trials (histories), the per-question files."""
    from forgetray.report import build
    from forgetray.report.pooled import replicate_groups, sweep_replicates
    from forgetray.tracking import Tracker

    tracker = Tracker(uri)
    parent = build.resolve_parent(tracker, experiment, parent_run_id)
    notes: list[str] = []
    trials = build.load_trials(tracker, experiment, parent, notes, per_key=per_key_history)
    notes += build.load_outcomes(tracker, replicate_groups(trials, sweep_replicates(parent),
                                                           build.varying_settings(trials)))
    return type("Reads", (), {"notes": notes})()


def run_report(uri: str, store: dict, out: Path, per_key: bool, reads: bool = False) -> dict:
    """One `forgetray report` (logged to the parent run, as the command does), or with `reads` only its reads:
    seconds, requests, notes."""
    from forgetray.report import build_report

    with counting_requests() as count, timing_phases() as phases:
        start = time.perf_counter()
        try:
            report = (reads_only if reads else build_report)(store["experiment"], uri, out,
                                                             parent_run_id=store["parent"], per_key_history=per_key)
            error = None
        except Exception as exc:  # noqa: BLE001 (a report that fails at this size is a result: shown, not fatal)
            report, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        seconds = time.perf_counter() - start
    trials = set(store["trials"])
    naming = sum(1 for url in count["urls"] if any(run_id in url for run_id in _run_ids(url) & trials))
    return {"seconds": seconds, "requests": count["n"], "naming_trials": naming, "error": error,
            "notes": report.notes if report else [], "phases": dict(phases)}


# Where a report's time goes: the reads (trial runs and histories; the pooled table's per-question files), the pooled
# table (its bootstraps) and the figures, timed by wrapping the functions build_report calls; the rest is the other
# tables, the text and logging the files to the parent run.
PHASES = {"read": ("load_trials", "load_outcomes"), "pooled": ("pooled_table",),
          "figures": ("draw_figures", "draw_band_figures")}


@contextlib.contextmanager
def timing_phases():
    from forgetray.report import build

    spent = {phase: 0.0 for phase in PHASES}
    originals = {name: getattr(build, name) for names in PHASES.values() for name in names}

    def timed(phase, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[phase] += time.perf_counter() - start
        return wrapper

    for phase, names in PHASES.items():
        for name in names:
            setattr(build, name, timed(phase, originals[name]))
    try:
        yield spent
    finally:
        for name, function in originals.items():
            setattr(build, name, function)


def _run_ids(text: str) -> set[str]:
    """The 32-hex-digit run ids a request names (in its path, query or body)."""
    import re

    return set(re.findall(r"[0-9a-f]{32}", text))


def differing_files(a: Path, b: Path) -> list[str]:
    """The report files that differ between two output folders (or exist in one only)."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    return [name for name in names if not ((a / name).is_file() and (b / name).is_file()
                                           and filecmp.cmp(a / name, b / name, shallow=False))]


def machine_line() -> str:
    sys.path.insert(0, str(ROOT / "bench"))
    from machine import cpu_name, usable_cores

    return f"{cpu_name()}, {usable_cores()} cores, load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}"


def measure(source: Path, work: Path, n: int, backends: list[str], per_key_max: int, experiment: str,
            parent: str | None, reads: bool = False) -> list[dict]:
    """Every row of the table for one N: each backend, bulk then per key (skipped above per_key_max); with `reads`,
    only the report's reads."""
    t0 = time.perf_counter()
    store = build_store(source, work / f"n{n}", n, experiment, parent)
    print(f"N={n}: store built in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for backend in backends:
        if backend == "server":
            serve_artifacts_by_server(store)
        with (mlflow_server(store, work / f"n{n}-server.log") if backend == "server"
              else contextlib.nullcontext(store["uri"])) as uri:
            outs = {}
            for path in ("bulk", "per-key"):
                if path == "per-key" and n > per_key_max:
                    rows.append({"n": n, "backend": backend, "path": path, "skipped": True})
                    continue
                outs[path] = work / f"n{n}-{backend}-{path}"
                logged_before = access_log_requests(work / f"n{n}-server.log") if backend == "server" else 0
                row = {"n": n, "backend": backend, "path": path + (" (reads only)" if reads else ""),
                       "load": os.getloadavg()[0], **run_report(uri, store, outs[path], path == "per-key", reads)}
                if backend == "server":
                    row["server_log"] = access_log_requests(work / f"n{n}-server.log") - logged_before
                rows.append(row)
                print(format_row(row), flush=True)
            if len(outs) == 2 and not reads:
                diff = differing_files(outs["bulk"], outs["per-key"])
                print(f"N={n} {backend}: report files {'identical' if not diff else 'DIFFER: ' + ', '.join(diff)}"
                      f" ({len(list(outs['bulk'].iterdir()))} files)", flush=True)
                rows[-1]["identical"] = rows[-2]["identical"] = not diff
    return rows


def format_row(row: dict) -> str:
    if row.get("skipped"):
        return f"{row['n']:>6}  {row['backend']:<7} {row['path']:<8} (skipped: above --per-key-max)"
    server = f"  server log {row['server_log']}" if "server_log" in row else ""
    return (f"{row['n']:>6}  {row['backend']:<7} {row['path']:<8} {row['seconds']:8.1f} s  {row['requests']:>7} "
            f"requests = {row['naming_trials'] / row['n']:.2f} per trial + {row['requests'] - row['naming_trials']}"
            f" naming no trial{server}  (read {row['phases']['read']:.1f} s, pooled {row['phases']['pooled']:.1f} s,"
            f" figures {row['phases']['figures']:.1f} s)  load {row['load']:.2f}"
            + (f"  FAILED: {row['error']}" if row["error"] else ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/work/main/forgetray-results/mlflow.db"),
                        help="a sqlite MLflow store with a real sweep execution (read only)")
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument("--parent", help="the source sweep run (default: the experiment's newest)")
    parser.add_argument("--n", type=int, nargs="+", default=[12, 216, 1000])
    parser.add_argument("--backends", nargs="+", choices=["sqlite", "server"], default=["sqlite", "server"])
    parser.add_argument("--per-key-max", type=int, default=216, help="skip the per-key path above this N")
    parser.add_argument("--reads-only", action="store_true",
                        help="time only the report's reads (no tables, figures or logging)")
    parser.add_argument("--work", type=Path, help="where the stores go (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    import signal
    import tempfile

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still stop the server (the finally blocks)

    print(f"forgetray report scale bench: source {args.source} ({args.experiment}); machine: {machine_line()}")
    with (contextlib.nullcontext(str(args.work)) if args.work else tempfile.TemporaryDirectory()) as work:
        Path(work).mkdir(parents=True, exist_ok=True)
        rows = [row for n in args.n for row in measure(args.source, Path(work), n, args.backends, args.per_key_max,
                                                       args.experiment, args.parent, args.reads_only)]
    print(f"\nmachine at the end: {machine_line()}")
    print(f"{'N':>6}  {'store':<7} {'path':<8} {'report':>10}  requests (HTTP, counted on the client)")
    for row in rows:
        print(format_row(row))


if __name__ == "__main__":
    main()
