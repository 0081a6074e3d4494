"""The MLflow UI for a sweep: the saved view the printed link opens (its trials grouped by grid point, replicates as
one line with a min/max band) and `forgetray ui [STORE]`, which starts MLflow's UI on a store and prints that link.

    forgetray ui [STORE] [--port N] [--host H]

STORE: a results folder (its `mlflow.db`), a sqlite file or a tracking URI; default `./forgetray-results`. Without a
sqlite file there it exits 2 naming the path it looked at. With an `http(s)://` tracking server (already a UI) it only
prints the links. Otherwise it runs `mlflow server` until interrupted (Ctrl-C).

Links carry `workflowType=machine_learning`: MLflow 3.17's UI takes its mode (GenAI: traces, no runs table; or
Model training) from that URL parameter, else from the browser's last choice, else GenAI, whatever the
experiment's `mlflow.experimentKind` tag says. A link without it (a run page typed in, a bookmark) opens in GenAI
mode on a fresh browser.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from forgetray.tracking import DEFAULT_RESULTS, TAG_KIND, TAG_PARENT, Tracker

# A trial run's grid point (`records.grid_point`: its run name without the seed): what the view groups by, so a grid
# point's replicates are one line (their mean) with a band (their min and max) in every chart.
TAG_GRID_POINT = "forgetray.grid_point"
TAG_SHARED_VIEW = "mlflow.sharedViewState."  # + a key: the UI state `?viewStateShareKey=<key>` opens
ML_MODE = "workflowType=machine_learning"
KNOWLEDGE_CHARTS = "/knowledge$"  # the charts the view shows (a regular expression over metric names)
DEFAULT_PORT = 5000
# `mlflow server` on a busy 2-core machine: one gunicorn/uvicorn worker (with more, workers that time out at start
# are killed and the server never answers), and no job-execution workers (another process pool at start).
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
START_TIMEOUT_S = 120.0


def ui_base(tracking_uri: str, port: int = DEFAULT_PORT) -> str:
    """Where the UI of this store is: the tracking server itself, else `forgetray ui`'s address."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) \
        else f"http://127.0.0.1:{port}"


def run_link(experiment_id: str, run_id: str) -> str:
    """A run's page (relative, like the view's link), in Model training mode."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{ML_MODE}"


def charts_view(tracker: Tracker, parent_run_id: str) -> str:
    """Save the UI view of one sweep execution's trials and return its address (relative:
    `#/experiments/<id>/runs?...`; prefix the UI's base URL). The view (an experiment tag the UI reads for
    `viewStateShareKey`): the runs filtered to the execution's trials, grouped by their grid point (tag
    forgetray.grid_point; the UI adds the parent run back, alone in the group of runs without the tag, and draws
    nothing for it: it has no metrics), each group drawn as one line, the mean of its replicates, with a band from
    their min to their max (`useGroupedValuesInCharts`); chart mode, charts filtered to `.../knowledge`."""
    experiment_id = tracker.client.get_run(parent_run_id).info.experiment_id
    key = f"forgetray-{parent_run_id}"
    tracker.client.set_experiment_tag(experiment_id, TAG_SHARED_VIEW + key, json.dumps({
        "searchFilter": f"tags.`{TAG_PARENT}` = '{parent_run_id}'",
        "orderByKey": "attributes.start_time", "orderByAsc": True,
        "chartsSearchFilter": KNOWLEDGE_CHARTS, "runsHiddenMode": "SHOW_ALL", "hideEmptyCharts": True,
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": TAG_GRID_POINT}]},
        "useGroupedValuesInCharts": True,
    }))
    return f"#/experiments/{experiment_id}/runs?{ML_MODE}&viewStateShareKey={key}&compareRunsMode=CHART"


# --- forgetray ui ---

def store_uri(store: str | None) -> str:
    """STORE -> its tracking URI; SystemExit-worthy ValueError naming the path when there is no store there."""
    if store and "://" in store:
        if store.startswith("sqlite:///"):
            path = Path(store[len("sqlite:///"):])
            if not path.is_file():
                raise ValueError(f"no MLflow store at {path} (from {store})")
        return store
    path = Path(store).expanduser() if store else DEFAULT_RESULTS
    db = path / "mlflow.db" if path.is_dir() or not path.suffix else path
    if not db.is_file():
        raise ValueError(f"no MLflow store at {db.resolve()} (a results folder holds mlflow.db: "
                         "`forgetray run` writes ./forgetray-results/mlflow.db by default)")
    return f"sqlite:///{db.resolve()}"


def views(uri: str) -> list[tuple[str, str]]:
    """(experiment name, relative link) of every sweep's newest execution in the store, its view saved anew."""
    tracker = Tracker(uri)
    out = []
    for experiment in tracker.client.search_experiments():
        newest = tracker.client.search_runs([experiment.experiment_id], f"tags.`{TAG_KIND}` = 'sweep'",
                                            order_by=["attributes.start_time DESC"], max_results=1)
        if newest:
            out.append((experiment.name, charts_view(tracker, newest[0].info.run_id)))
    return out


def free_port(host: str, wanted: int) -> int:
    """`wanted` if nothing listens there, else a free port the system picks."""
    with socket.socket() as probe:
        try:
            probe.bind((host, wanted))
            return wanted
        except OSError:
            probe.bind((host, 0))
            return probe.getsockname()[1]


def start_server(uri: str, host: str, port: int, log) -> subprocess.Popen:
    """`mlflow server` on the store (the same Python as this one; its page opens in Model training mode:
    `forgetray.ui_app`), as `SERVER_ENV` says; its output to `log`."""
    command = [sys.executable, "-m", "forgetray.ui_app", "--backend-store-uri", uri, "--host", host,
               "--port", str(port), "--workers", "1"]
    return subprocess.Popen(command, env={**os.environ, **SERVER_ENV}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_until_up(base: str, server: subprocess.Popen, timeout_s: float = START_TIMEOUT_S) -> None:
    """Until the server answers its health check; RuntimeError if it exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {server.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"mlflow server did not answer at {base} within {timeout_s:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    """End the server and its workers (its own process group)."""
    import signal

    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forgetray ui", description="start the MLflow UI on a forgetray store "
                                     "and print each sweep's grouped knowledge-curve view")
    parser.add_argument("store", nargs="?", help="results folder, mlflow.db file or tracking URI "
                        "(default: ./forgetray-results)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="(a free one if it is taken)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        uri = store_uri(args.store)
    except ValueError as exc:
        print(f"forgetray ui: error: {exc}", file=sys.stderr)
        return 2
    if uri.startswith(("http://", "https://")):  # a tracking server is its own UI
        _print_links(ui_base(uri), views(uri))
        return 0
    port = free_port(args.host, args.port)
    import signal

    # `kill` (SIGTERM) ends it like Ctrl-C: through the `finally` that stops the server, which runs in a session of
    # its own (a Ctrl-C in the terminal reaches only this process) and would otherwise outlive it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    log_path = Path(uri[len("sqlite:///"):]).parent / "mlflow-ui.log" if uri.startswith("sqlite:///") else None
    with open(log_path, "ab") if log_path else open(os.devnull, "wb") as log:
        server = start_server(uri, args.host, port, log)
        base = f"http://{args.host}:{port}"
        try:
            found = views(uri)  # saved while the server starts
            wait_until_up(base, server)
            print(f"MLflow UI: {base} (store {uri}; Ctrl-C stops it)", flush=True)
            _print_links(base, found)
            server.wait()
        except RuntimeError as exc:
            print(f"forgetray ui: error: {exc}" + (f"; its log: {log_path}" if log_path else ""), file=sys.stderr)
            return 1
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            stop_server(server)
    return 0


def _print_links(base: str, found: list[tuple[str, str]]) -> None:
    if not found:
        print("(no sweep in this store yet)", flush=True)
    for name, fragment in found:
        print(f"{name}: {base}/{fragment}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
