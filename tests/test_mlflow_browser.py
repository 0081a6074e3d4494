"""`forgetray ui` on a real store with replicates, looked at in a real browser (headless Chromium over the DevTools
protocol, tests/cdp.py): the printed link's chart draws one line per grid point (the mean of its replicates) with a
band from their min to their max, and a run clicked in it opens in the Model training mode, not GenAI.

The store is written by forgetray's own code (`records.attach_trial_run`, as a trial does; no Ray): 2 grid points x
3 replicates, a knowledge metric over 4 epochs. The screenshot of the view is the README's docs/images/grouped_view.png
(`FORGETRAY_UPDATE_SCREENSHOT=1` writes it there; otherwise into the test's temporary folder).

Without Chromium the test fails saying how to install it (scripts/setup.sh installs it where it can): a skipped
browser test would hide a broken view in every run on a machine that lacks it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdp import INSTALL_HINT, Browser, chromium_path
from forgetray import plan
from forgetray.grids import Sweep, grid
from forgetray.records import attach_trial_run
from forgetray.tracking import Tracker

pytestmark = pytest.mark.slow  # a server and a browser start: ~40 s on 2 busy cores

REPO = Path(__file__).resolve().parent.parent
METRIC = "sft/organism-facts/knowledge"
SCREENSHOT = REPO / "docs" / "images" / "grouped_view.png"


def _value(point: int, seed: int, epoch: int) -> float:
    """A replicate's knowledge after `epoch`: the grid points apart, the seeds spread more with every epoch."""
    return round(0.9 - 0.2 * point - 0.05 * epoch * (1 + seed), 4)


@pytest.fixture
def store(tmp_path):
    """A results folder whose mlflow.db holds one sweep execution: 2 grid points (model) x 3 replicates (seeds)."""
    sweep = Sweep("ui-demo", model=grid(["organism-tiny", "organism-small"]), dataset="organism-alpaca",
                  replicates=3, epochs=3)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "artifacts")
    parent = tracker.start_sweep_run(sweep.name, "20260101-000000", {"sweep.replicates": 3})
    context = {"parent_run_id": parent, "sweep_name": sweep.name, "trials": [t.to_dict() for t in sweep.trials]}
    resolved = {"model": {"path": "/m"}, "dataset": {"kind": "local", "name": "alpaca", "path": "/d/alpaca.jsonl"},
                "benchmarks": {}, "probe_set": {"kind": "file", "name": "probe", "path": "/d/probe.jsonl"},
                "restore_pool": None, "prior_datasets": []}
    logged: dict[str, dict[int, list[float]]] = {}  # grid point -> epoch -> the replicates' values
    for trial in sweep.trials:
        point = ["organism-tiny", "organism-small"].index(trial.model)
        run = attach_trial_run(tracker, context, trial, resolved, tmp_path / "trials" / trial.config_hash(),
                               plan.plan(trial))
        for epoch in range(4):
            value = _value(point, trial.seed, epoch)
            tracker.log_metrics(run, {METRIC: value, "train/loss": 1.0 + value}, epoch)
            logged.setdefault(["tiny", "small"][point], {}).setdefault(epoch, []).append(value)
        tracker.end_run(run, ok=True)
    tracker.end_run(parent, ok=True)
    return tmp_path, logged


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ui(store):
    """`forgetray ui STORE` running; (the view's link it printed, what was logged)."""
    folder, logged = store
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "forgetray.cli", "ui", str(folder), "--port", str(_free_port())],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("ui-demo: "):
                yield line.split(": ", 1)[1].strip(), logged
                break
        else:
            pytest.fail("forgetray ui printed no link within 180 s:\n" + "".join(lines))
        if not lines or not lines[-1].startswith("ui-demo: "):
            pytest.fail("forgetray ui ended without a link:\n" + "".join(lines))
    finally:
        process.terminate()  # its SIGTERM handler stops the MLflow server it started
        process.wait(60)


# Per chart: its title, and per trace its fill, fill colour, line colour and points (x, y); per legend entry its
# text and colour (MLflow draws the legend itself, beside Plotly's plot).
CHARTS_JS = """Array.from(document.querySelectorAll('.js-plotly-plot')).map(g => {
    let card = g;
    while (card && !card.querySelector('svg:not(.main-svg) + span')) card = card.parentElement;
    return {traces: g.data.map(d => ({fill: d.fill || null, fillcolor: d.fillcolor || null,
                                      x: Array.from(d.x || []), y: Array.from(d.y || [])})),
            legend: card ? Array.from(card.querySelectorAll('svg:not(.main-svg) + span')).map(s => ({
                text: s.textContent, color: (s.previousElementSibling.querySelector('path') || {style: {}}).style.stroke
            })).filter(e => e.color) : []};
})"""
ROWS_JS = "Array.from(document.querySelectorAll('.ag-row')).map(r => r.innerText.replace(/\\s+/g, ' ').trim())"


def _hex(rgb: str) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in re.findall(r"\d+", rgb)[:3])


def test_printed_view_draws_each_grid_point_as_mean_with_min_max_band(ui, tmp_path):
    if chromium_path() is None:
        pytest.fail(INSTALL_HINT)
    link, logged = ui
    with Browser(1600, 1000) as browser:
        browser.open(link.split("#")[0])  # the UI's own page first: keep its assistant panel shut (screenshot)
        browser.wait_for("document.getElementById('root') && document.getElementById('root').children.length")
        browser.eval("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false'),"
                     "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')")
        browser.open(link)
        charts = browser.wait_for(
            f"(() => {{ const c = {CHARTS_JS}; return c.length && c[0].traces.some(t => t.fill && t.y.length > 4)"
            " && c[0].legend.length ? c : null })()", what="a chart with bands and a legend")
        rows = browser.eval(ROWS_JS)
        time.sleep(1)  # the chart's last transition
        shot = browser.screenshot(tmp_path / "grouped_view.png", clip={"x": 0, "y": 0, "width": 1200, "height": 820})
        if os.environ.get("FORGETRAY_UPDATE_SCREENSHOT") == "1":
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, SCREENSHOT)

        # The runs table: a group per grid point, its 3 replicates named by what differs, the seed last.
        # (a row's text: its buttons' labels, a group's colour, its name and size, or a run's name)
        groups = {m[2]: m[1] for m in (re.search(r"(#[0-9a-f]{6}) Group: (\S+) 3$", r) for r in rows) if m}
        assert set(groups) == {"tiny", "small"}, rows
        for point in groups:
            assert [r.split()[-1] for r in rows if r.split() and r.split()[-1].startswith(f"{point}·")] == \
                [f"{point}·s{seed}" for seed in range(3)], rows
        # One chart (the view's filter keeps /knowledge$, train/loss is not drawn), its legend one entry per group
        # (and the parent run's, which has no metrics: the UI's "Unassigned" group).
        assert len(charts) == 1, charts
        traces, legend = charts[0]["traces"], charts[0]["legend"]
        colors = {e["text"].split(" (")[0]: _hex(e["color"]) for e in legend}
        assert {e["text"] for e in legend} >= {f"tiny ({METRIC})", f"small ({METRIC})"}, legend
        assert all(colors[point] == color for point, color in groups.items()), (colors, groups)
        lines = {tuple(zip(t["x"], t["y"])) for t in traces if not t["fill"]}
        for point, epochs in logged.items():
            # the band: Plotly's filled polygon, the min at each epoch one way, the max back; in the group's colour
            band = next(t for t in traces if t["fill"] and t["fillcolor"].lower().startswith(colors[point]))
            points = list(zip(band["x"], band["y"]))
            cut = [x for x, _ in points].index(None)  # the gap between its two sides
            lower, upper = sorted((points[:cut], points[cut + 1:]), key=lambda side: sum(y for _, y in side))
            assert dict(lower) == pytest.approx({e: min(v) for e, v in epochs.items()}), (point, band)
            assert dict(upper) == pytest.approx({e: max(v) for e, v in epochs.items()}), (point, band)
            # the line: the replicates' mean
            mean = {e: sum(v) / len(v) for e, v in epochs.items()}
            assert any(dict(line) == pytest.approx(mean) for line in lines), (point, mean, lines)
        # No replicate drawn alone: two lines in all (Plotly's markers may repeat a line as a second trace).
        assert len({tuple((x, round(y, 6)) for x, y in line) for line in lines}) == 2, lines

        # A replicate clicked in the table opens its run page in the Model training mode (its sidebar: runs and
        # the model registry, not GenAI's observability and evaluation pages).
        browser.eval("Array.from(document.querySelectorAll('a')).find(a => a.textContent === 'small·s1').click()")
        nav = browser.wait_for("location.hash.includes('/runs/') && document.body.innerText.includes('Model metrics')"
                               " && document.querySelector('nav') && document.body.innerText", what="the run page")
        assert "?" not in browser.eval("location.hash"), "the table's run link carries no mode"
        assert "Model registry" in nav and "Observability" not in nav and "Evaluation runs" not in nav, nav[:500]
        assert browser.eval("localStorage.getItem('mlflow.workflowType_v1')") == '"machine_learning"'
