"""The sweep report: the stage table, the methods table and the figures of PS (docs/methods.md §4), rebuilt from a sweep's
MLflow runs alone (no checkpoint is opened, so a report can be made long after the checkpoints are gone).

Layout, one concept per module, each depending only on those above it: `runs` reads the sweep's parent run and
its trial runs through `forgetray.tracking.Tracker` into `TrialData` (metric names parsed and built through
`forgetray.metrics.registry`; `history` reads each trial's metrics in one download); `tables` turns trials into the
stage table, the methods table and the printed text; `figures` draws Figures 3a/3b/3c/4/5 with matplotlib
(imported only when a figure is drawn) and hands back each `Figure`; `build` puts them together, writes the
folder and logs it to the parent run (`build_report`, `run_report`). A sweep run with `replicates=n` is also pooled per grid point: `pooled` (the pooled stage table)
and `bands` (Figures 3b/3c over seeds). What a trial did not log is left out, with a line in `Report.notes`; the
report never fails on a missing metric, and never turns any other error (a bug, a store that does not answer, a
setting that does not parse) into a note: those fail the report with their cause.

    report = build_report("quickstart", "sqlite:///forgetray-results/mlflow.db", Path("report"))
    print(report.text)            # the stage table and each trial's transition epoch
    report.stage_table            # one row per trial x epoch (also stage_table.csv / .txt in out_dir)
    report.figures                # the PNGs, also logged to the sweep's parent run under report/
"""

from forgetray.report.build import (DEFAULT_RESULTS_DIR, METHODS_CSV, REPORT_ARTIFACT_PATH, TABLE_CSV, TABLE_TXT,
                                    Report, build_report, default_out_dir, run_report)
from forgetray.report.figures import FIG3A, FIG3B, FIG4, FIG5, Drawn
from forgetray.report.runs import TrialData
from forgetray.report.tables import STAGE_COLUMNS, methods_table, methods_text, stage_table

__all__ = ["DEFAULT_RESULTS_DIR", "FIG3A", "FIG3B", "FIG4", "FIG5", "METHODS_CSV", "REPORT_ARTIFACT_PATH",
           "STAGE_COLUMNS", "TABLE_CSV", "TABLE_TXT", "Drawn", "Report", "TrialData", "build_report",
           "default_out_dir", "methods_table", "methods_text", "run_report", "stage_table"]
