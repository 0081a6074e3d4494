"""Putting the report together: read the sweep's runs, build the tables, draw the figures, write them to a folder
and log them to the sweep's parent run; `run_report` is what `forgetray report` and the end of `forgetray run` call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from forgetray.report.bands import draw_band_figures
from forgetray.report.continual import continual_table, continual_text
from forgetray.report.figures import FIG3A, FIG3B, FIG3C_GLOB, FIG4, FIG5, Drawn, draw_figures
from forgetray.report.panel_data import DATA_GLOB
from forgetray.report.pooled import (POOLED_CSV, POOLED_TXT, load_outcomes, pooled_table, pooled_tags, pooled_text,
                                     replicate_groups, sweep_replicates)
from forgetray.report.reinjection import REINJECTION_CSV, reinjection_table, reinjection_text
from forgetray.report.runs import check_store_exists, load_trials, resolve_parent, varying_settings
from forgetray.report.tables import TEXT_COLUMNS, empty_columns, methods_table, report_text, stage_table
from forgetray.tracking import DEFAULT_RESULTS, Tracker, default_tracking_uri
from forgetray.tracking_history import set_tags

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_ARTIFACT_PATH = "report"  # where the report's files go on the sweep's parent run
DEFAULT_RESULTS_DIR = DEFAULT_RESULTS  # what `forgetray run` uses when given no --tracking-uri
TABLE_CSV, TABLE_TXT, METHODS_CSV = "stage_table.csv", "stage_table.txt", "methods_table.csv"
CONTINUAL_CSV = "continual_table.csv"


@dataclass
class Report:
    """A sweep execution's report. `text` is what the CLI prints; `notes` says what was left out and why;
    `plots` holds each saved figure's matplotlib Figure by file name, for reading back what it shows;
    `pooled_table` is the stage table pooled over replicates (empty unless the sweep ran `replicates=n`);
    `reinjection_table` the IV re-injection table (empty unless a trial ran the dynamics probe)."""

    stage_table: pd.DataFrame
    figures: list[Path]
    text: str
    parent_run_id: str
    out_dir: Path
    notes: list[str] = field(default_factory=list)
    plots: dict[str, Figure] = field(default_factory=dict)
    pooled_table: pd.DataFrame = field(default_factory=pd.DataFrame)
    reinjection_table: pd.DataFrame = field(default_factory=pd.DataFrame)


def _clear_previous(out_dir: Path) -> None:
    """Remove the report's files from an earlier report in out_dir, so a figure skipped now is not left stale
    (and logged again). Other files in out_dir are left alone."""
    names = (FIG3A, FIG3B, FIG4, FIG5, TABLE_CSV, TABLE_TXT, METHODS_CSV, CONTINUAL_CSV, POOLED_CSV, POOLED_TXT,
             REINJECTION_CSV)
    for path in [*(out_dir / name for name in names), *out_dir.glob(FIG3C_GLOB), *out_dir.glob(DATA_GLOB)]:
        path.unlink(missing_ok=True)


def build_report(experiment: str, tracking_uri: str, out_dir: Path, parent_run_id: str | None = None,
                 log_to_mlflow: bool = True, per_key_history: bool = False) -> Report:
    """The report of one sweep execution (default: the experiment's newest), written to out_dir and, with
    log_to_mlflow, logged to the sweep's parent run under `report/`, with the pooled verdicts as its tags
    (`pooled.pooled_tags`) when the sweep ran replicates. `per_key_history` reads every trial's metrics one key
    at a time, as runs without `metrics/history.parquet` are (the same report, slower: for comparing the two).

    Raises SpecError (one line) when the store, the experiment, the sweep run or its trials cannot be found."""
    check_store_exists(tracking_uri)
    tracker = Tracker(tracking_uri)
    parent = resolve_parent(tracker, experiment, parent_run_id)
    read_notes: list[str] = []
    trials = load_trials(tracker, experiment, parent, read_notes, per_key=per_key_history)
    varying = varying_settings(trials)
    table = stage_table(trials, varying)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir)
    # A replicated sweep (docs/methods.md §10) is also pooled per grid point, and draws Figures 3b/3c over its seeds.
    groups = replicate_groups(trials, sweep_replicates(parent), varying)
    pooled_notes = load_outcomes(tracker, groups)
    pooled = pooled_table(groups)
    # Each figure comes back drawn and saved, or as the one line saying which data it lacks.
    results = draw_figures(trials, varying, out_dir, per_trial_checkpoints=not groups)
    if groups:
        results[1:1] = draw_band_figures(groups, pooled, out_dir)
    drawn = [result for result in results if isinstance(result, Drawn)]
    notes = [result for result in results if isinstance(result, str)] + pooled_notes + read_notes
    empty = empty_columns(table)
    if not table.empty and empty:
        headings = ", ".join(TEXT_COLUMNS[column][0] for column in empty)
        notes.append(f"columns with nothing logged, left out of the text table: {headings}")
    before = [t.name for t in trials if t.judged_before_margin_rule]
    if before:
        notes.append("judged before the margin rule (stage/code is the significance test's, shown as `test`; no R_0, "
                     f"no intervals, no margin-rule stage): {', '.join(before)}")
    unjudged = [t.name for t in trials if t.epochs and not t.judged_before_margin_rule and not t.transition()[0]]
    if unjudged:
        notes.append(f"no stage logged (no restoration?) for: {', '.join(unjudged)}")

    methods = methods_table(trials, varying)
    continual = continual_table(trials, varying)  # empty unless some trial has prior phases
    text = report_text(experiment, parent, trials, varying, table, notes, methods,
                       continual_text(continual, varying) if not continual.empty else None)
    reinjection = reinjection_table(trials, varying)  # empty unless some trial ran the IV dynamics probe
    if not reinjection.empty:
        reinjection.to_csv(out_dir / REINJECTION_CSV, index=False)
        text += "\n" + reinjection_text(reinjection, varying) + "\n"
    if not pooled.empty:
        pooled.to_csv(out_dir / POOLED_CSV, index=False)
        (out_dir / POOLED_TXT).write_text(pooled_text(pooled))
        text += "\n" + pooled_text(pooled)
    table.to_csv(out_dir / TABLE_CSV, index=False)
    if not methods.empty:
        methods.to_csv(out_dir / METHODS_CSV, index=False)
    if not continual.empty:
        continual.to_csv(out_dir / CONTINUAL_CSV, index=False)
    (out_dir / TABLE_TXT).write_text(text)
    if log_to_mlflow:
        tracker.log_artifacts(parent.info.run_id, out_dir, REPORT_ARTIFACT_PATH)
        set_tags(tracker, parent.info.run_id, pooled_tags(pooled))  # the pooled verdicts, searchable in the UI
    return Report(stage_table=table, figures=[out_dir / d.file for d in drawn], text=text,
                  parent_run_id=parent.info.run_id, out_dir=out_dir, notes=notes,
                  plots={d.file: d.figure for d in drawn}, pooled_table=pooled, reinjection_table=reinjection)


def default_out_dir(experiment: str) -> Path:
    return DEFAULT_RESULTS_DIR / "report" / experiment


def run_report(experiment: str, tracking_uri: str | None = None, parent_run_id: str | None = None,
               out_dir: Path | None = None, log_to_mlflow: bool = True) -> Report:
    """Build the report and print it with the figure paths: what `forgetray report` does, and how `forgetray run`
    ends. Defaults are those of `forgetray run`: the sqlite store in ./forgetray-results, the newest sweep run."""
    tracking_uri = tracking_uri or default_tracking_uri(DEFAULT_RESULTS_DIR)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(experiment)
    report = build_report(experiment, tracking_uri, out_dir, parent_run_id=parent_run_id, log_to_mlflow=log_to_mlflow)
    print(report.text, end="")
    print(f"\nreport files in {report.out_dir}:")
    pooled = [report.out_dir / POOLED_CSV, report.out_dir / POOLED_TXT] if not report.pooled_table.empty else []
    for path in [*report.figures, report.out_dir / TABLE_CSV, report.out_dir / TABLE_TXT, *pooled]:
        print(f"  {path}")
    if log_to_mlflow:
        print(f"logged to MLflow run {report.parent_run_id} under {REPORT_ARTIFACT_PATH}/")
    return report
