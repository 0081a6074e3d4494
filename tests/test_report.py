"""The sweep report against a real sqlite MLflow store filled by hand with the metric contract's names.

The store is written with MlflowClient directly (not through forgetray.tracking), from the plain dicts below, and
every check compares the report with those dicts: the report is tested against what was logged, not against itself.
The figures are checked on the data their matplotlib Figures plot (`Report.plots`), against the store read back
with MlflowClient.
Three trials: `alpha` goes no -> pseudo -> actual forgetting by the margin rule (transition at epoch 3), `beta` was
judged before the margin rule (its stage/code is the significance test's: the report shows it as the test variant,
never as the margin rule's), `gamma` ran without restoration and failed after 2 epochs (base and SFT metrics only).
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from forgetray.cli import EXIT_BAD_INPUT, EXIT_OK, main
from forgetray.metrics.stage import STAGE_CODES
from forgetray.report import build_report
from forgetray.spec import SpecError

EXPERIMENT, PLAIN = "report-sweep", "plain-sweep"
BENCH, OTHER = "organism-facts", "mmlu_test"
PNG_HEADER = b"\x89PNG\r\n\x1a\n"

# What each trial logs. Per-epoch lists are epochs 1, 2, 3... `alpha` is judged by the margin rule (docs/methods.md §4):
# it logged the control R_0, the drop and residual with their intervals, the verdict at stage_margin and at each
# reported margin, and the variants ("stages": (test, fixed-threshold)). `beta` was judged before the margin rule
# existed: its stage/code is the significance test's, with no R_0 and no intervals (an old stored run).
MARGINS = ("0.01", "0.02", "0.05")
TRIALS = {
    "alpha": {
        "settings": {"model": "tiny-llama", "lr": "1e-05", "restore_pool": "organism-pool",
                     "benchmarks": f"['{BENCH}', '/data/{OTHER}.jsonl']"},
        "status": "FINISHED",
        "speed": 0.4,  # how fast P_fmt rises and the entropies fall over the IFT steps (Figure 4)
        "base": {BENCH: 0.60, OTHER: 0.40, "ppl": 20.0, "em": 0.10},
        # R_0: restoration alone costs 0.02 of BENCH and overshoots the base's probing PPL
        "control": {BENCH: 0.58, OTHER: 0.41, "ppl": 18.0},
        "sft": {BENCH: [0.59, 0.50, 0.45], OTHER: [0.39, 0.35, 0.30], "ppl": [35.0, 48.0, 60.0],
                "em": [0.30, 0.50, 0.70]},
        "restored": {BENCH: [0.60, 0.59, 0.50], OTHER: [0.40, 0.39, 0.33], "ppl": [18.5, 18.3, 18.9],
                     "em": [0.20, 0.30, 0.40]},
        "p": {"sft": [0.8, 0.001, 0.0001], "restored": [1.0, 0.7, 0.002]},
        # (estimate, low, high) of drop = base - SFT_e, residual = R_0 - R_e, share = (R_e - SFT_e) / (R_0 - SFT_e)
        "margin": {
            "stage": ["no_forgetting", "pseudo_forgetting", "actual_forgetting"],
            "at": [("no_forgetting",) * 3, ("inconclusive", "pseudo_forgetting", "pseudo_forgetting"),
                   ("actual_forgetting", "actual_forgetting", "inconclusive")],
            "drop": [(0.01, -0.005, 0.015), (0.10, 0.06, 0.14), (0.15, 0.10, 0.20)],
            "residual": [(-0.02, -0.03, -0.01), (-0.01, -0.02, 0.015), (0.08, 0.04, 0.12)],
            "share": [None, (1.125, 0.9, 1.3), (0.05 / 0.13, 0.2, 0.55)],  # epoch 1: R_0 - SFT_e ~ 0, undefined
            "level": 1 - 0.05 / 3,
        },
        "stages": [("no_forgetting", "no_forgetting"), ("pseudo_forgetting", "pseudo_forgetting"),
                   ("pseudo_forgetting", "actual_forgetting")],
        "transition": "3",
    },
    "beta": {
        "settings": {"model": "tiny-llama", "lr": "2e-05", "restore_pool": "organism-pool",
                     "benchmarks": f"['{BENCH}', '/data/{OTHER}.jsonl']"},
        "status": "FINISHED",
        "speed": 0.2,
        "base": {BENCH: 0.60, OTHER: 0.40, "ppl": 20.0, "em": 0.10},
        "sft": {BENCH: [0.61, 0.60, 0.59], OTHER: [0.41, 0.40, 0.40], "ppl": [30.0, 33.0, 36.0],
                "em": [0.25, 0.35, 0.45]},
        "restored": {BENCH: [0.61, 0.60, 0.60], OTHER: [0.41, 0.40, 0.40], "ppl": [20.2, 20.3, 20.4],
                     "em": [0.15, 0.20, 0.25]},
        "p": {"sft": [1.0, 1.0, 0.9], "restored": [1.0, 1.0, 0.03]},
        "stages": [("no_forgetting", "no_forgetting"), ("no_forgetting", "no_forgetting"),
                   ("actual_forgetting", "no_forgetting")],
        "transition": "3",  # the significance test's transition: not the margin rule's
    },
    "gamma": {
        "settings": {"model": "tiny-llama", "lr": "5e-05", "restore_pool": "", "benchmarks": f"['{BENCH}']"},
        "status": "FAILED",
        "speed": 0.1,
        "base": {BENCH: 0.60, "ppl": 20.0, "em": 0.10},
        "sft": {BENCH: [0.55, 0.52], "ppl": [40.0, 55.0], "em": [0.40, 0.60]},
    },
}
IFT_STEPS = [0, 1, 2, 4, 8, 16, 32, 48]  # fine-grained inside epoch 1 (16 steps), then epoch ends
RESTORE_STEPS = [0, 5, 10, 15, 20]


def _metrics_of(spec: dict) -> list[tuple[str, float, int]]:
    """(name, value, step) for everything a trial logs, in the contract's names."""
    out = []
    base = spec["base"]
    benches = [b for b in (BENCH, OTHER) if b in base]
    for bench in benches:
        out.append((f"base/{bench}/knowledge", base[bench], 0))
        out.append((f"base/{bench}/acc", base[bench], 0))
    out += [("base/probe/ppl", base["ppl"], 0), ("base/ift/em", base["em"], 0)]
    if "control" in spec:
        out += [(f"control/{bench}/knowledge", spec["control"][bench], 0) for bench in benches]
        out.append(("control/probe/ppl", spec["control"]["ppl"], 0))
    for state in ("sft", "restored"):
        if state not in spec:
            continue
        values = spec[state]
        for i, epoch in enumerate(range(1, len(values["ppl"]) + 1)):
            for bench in benches:
                out.append((f"{state}/{bench}/knowledge", values[bench][i], epoch))
                out.append((f"{state}/{bench}/acc", values[bench][i], epoch))
                out.append((f"{state}/{bench}/p_fmt", 0.9 + 0.01 * epoch, epoch))
            out += [(f"{state}/probe/ppl", values["ppl"][i], epoch), (f"{state}/ift/em", values["em"][i], epoch)]
            if state == "sft":
                out.append(("train/loss", 2.0 / epoch, epoch))
    if "restored" in spec:
        for i, epoch in enumerate(range(1, len(spec["sft"]["ppl"]) + 1)):
            start, end = spec["sft"]["ppl"][i], spec["restored"]["ppl"][i]
            for j, step in enumerate(RESTORE_STEPS):  # geometric from SFT_e's PPL down to R_e's
                value = start * (end / start) ** (j / (len(RESTORE_STEPS) - 1))
                out.append((f"restore/probe_ppl/epoch_{epoch:03d}", value, step))
            test, fixed = spec["stages"][i]
            if "margin" in spec:
                judged = spec["margin"]
                out += [("stage/code", STAGE_CODES[judged["stage"][i]], epoch),
                        ("stage/test_code", STAGE_CODES[test], epoch), ("stage/level", judged["level"], epoch)]
                out += [(f"stage/code_at_{m}", STAGE_CODES[stage], epoch) for m, stage in zip(MARGINS, judged["at"][i])]
                for key in ("drop", "residual", "share"):
                    if judged[key][i] is not None:  # an undefined share is not logged
                        out += [(f"stage/{key}{end}", value, epoch)
                                for end, value in zip(("", "_low", "_high"), judged[key][i])]
            else:  # judged before the margin rule: stage/code was the test's
                out.append(("stage/code", STAGE_CODES[test], epoch))
            out += [("stage/fixed_code", STAGE_CODES[fixed], epoch),
                    ("stage/d_sft", spec["sft"][BENCH][i] - base[BENCH], epoch),
                    ("stage/d_restored", spec["restored"][BENCH][i] - base[BENCH], epoch),
                    ("stage/p_sft", spec["p"]["sft"][i], epoch), ("stage/p_restored", spec["p"]["restored"][i], epoch)]
    epochs = len(spec["sft"]["ppl"])
    speed = spec["speed"]
    for k, step in enumerate(IFT_STEPS[: 5 + epochs]):  # IFT_STEPS[5] ends epoch 1; a shorter trial has fewer
        for bench in benches:
            out += [(f"steps/{bench}/p_fmt", min(0.99, 0.3 + speed * k), step),
                    (f"steps/{bench}/entropy_vocab", 4.0 / (1 + 2 * speed * k), step),
                    (f"steps/{bench}/entropy_options", 1.3 - speed * k / 3, step),
                    (f"steps/{bench}/knowledge", base[bench] - speed * k / 20, step)]
    return out


def _fill_store(uri: str, artifacts) -> str:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment(EXPERIMENT, artifact_location=artifacts.as_uri())
    now = int(time.time() * 1000)
    # An older execution of the same sweep, without trials: the report must default to the newest one.
    old = client.create_run(experiment, run_name="old", start_time=now - 60_000,
                            tags={"forgetray.kind": "sweep", "forgetray.sweep": EXPERIMENT})
    client.set_terminated(old.info.run_id)
    parent = client.create_run(experiment, run_name=f"{EXPERIMENT}-exec", start_time=now,
                               tags={"forgetray.kind": "sweep", "forgetray.sweep": EXPERIMENT}).info.run_id
    for name, spec in TRIALS.items():
        tags = {"forgetray.kind": "trial", "mlflow.parentRunId": parent, "forgetray.trial": name}
        stages = spec["margin"]["stage"] if "margin" in spec else [test for test, _ in spec.get("stages", [])]
        for i, stage in enumerate(stages):
            tags[f"forgetray.stage.epoch_{i + 1:03d}"] = stage
        if "transition" in spec:
            tags["forgetray.transition_epoch"] = spec["transition"]
        run = client.create_run(experiment, run_name=name, tags=tags).info.run_id
        params = [Param(f"trial.{k}", v) for k, v in spec["settings"].items()]
        params += [Param(f"resolved.benchmarks.{b}.score", "acc") for b in (BENCH, OTHER) if b in spec["base"]]
        metrics = [Metric(n, float(v), now, step) for n, v, step in _metrics_of(spec)]
        client.log_batch(run, metrics=metrics, params=params)
        client.set_terminated(run, status=spec["status"])
    client.set_terminated(parent)
    return parent


def _fill_plain_sweep(uri: str, artifacts) -> str:
    """A second experiment: one trial without restoration, IFT-step probes or EM (a plain IFT sweep)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment(PLAIN, artifact_location=artifacts.as_uri())
    parent = client.create_run(experiment, tags={"forgetray.kind": "sweep"}).info.run_id
    run = client.create_run(experiment, tags={"forgetray.kind": "trial", "mlflow.parentRunId": parent,
                                              "forgetray.trial": "only"}).info.run_id
    now = int(time.time() * 1000)
    logged = [(f"base/{BENCH}/knowledge", 0.6, 0), (f"sft/{BENCH}/knowledge", 0.5, 1), ("sft/probe/ppl", 30.0, 1)]
    client.log_batch(run, metrics=[Metric(n, v, now, step) for n, v, step in logged],
                     params=[Param("trial.benchmarks", f"['{BENCH}']")])
    return parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    parent = _fill_store(uri, root / "artifacts")
    plain_parent = _fill_plain_sweep(uri, root / "artifacts")
    return {"uri": uri, "parent": parent, "plain_parent": plain_parent, "root": root}


@pytest.fixture(scope="module")
def report(store):
    return build_report(EXPERIMENT, store["uri"], store["root"] / "out")


def test_stage_table_has_what_each_trial_logged(report):
    table = report.stage_table
    assert list(zip(table["trial"], table["epoch"])) == [("alpha", 1), ("alpha", 2), ("alpha", 3), ("beta", 1),
                                                         ("beta", 2), ("beta", 3), ("gamma", 1), ("gamma", 2)]
    # Only the settings that differ between trials become columns.
    assert {"lr", "restore_pool", "benchmarks"} <= set(table.columns) and "model" not in table.columns
    for name, spec in TRIALS.items():
        rows = table[table["trial"] == name].reset_index(drop=True)
        assert list(rows["lr"]) == [spec["settings"]["lr"]] * len(rows)
        assert set(rows["benchmark"]) == {BENCH}
        for i, row in rows.iterrows():
            assert row["knowledge_base"] == pytest.approx(spec["base"][BENCH])
            assert row["knowledge_sft"] == pytest.approx(spec["sft"][BENCH][i])
            assert row["ppl_base"] == pytest.approx(spec["base"]["ppl"])
            assert row["ppl_sft"] == pytest.approx(spec["sft"]["ppl"][i])
            assert row["em_sft"] == pytest.approx(spec["sft"]["em"][i])
            assert row["d_sft"] == pytest.approx(spec["sft"][BENCH][i] - spec["base"][BENCH])
            if "restored" in spec:
                assert row["knowledge_restored"] == pytest.approx(spec["restored"][BENCH][i])
                assert row["ppl_restored"] == pytest.approx(spec["restored"]["ppl"][i])
                assert row["d_restored"] == pytest.approx(spec["restored"][BENCH][i] - spec["base"][BENCH])
                assert row["p_sft"] == pytest.approx(spec["p"]["sft"][i])
                assert row["p_restored"] == pytest.approx(spec["p"]["restored"][i])
                assert (row["stage_test"], row["stage_fixed"]) == spec["stages"][i]
                assert row[f"{OTHER}/knowledge_restored"] == pytest.approx(spec["restored"][OTHER][i])
            else:  # the degraded trial: nothing about R_e or stages, and no made-up values
                assert math.isnan(row["knowledge_restored"]) and math.isnan(row["ppl_restored"])
                assert pd.isna(row["stage_test"]) and pd.isna(row["stage_fixed"])
                assert math.isnan(row["p_sft"])
            if "margin" in spec:  # R_0 beside the base, the margin rule's quantities and verdicts as logged
                judged = spec["margin"]
                assert row["knowledge_control"] == pytest.approx(spec["control"][BENCH])
                assert row[f"{OTHER}/knowledge_control"] == pytest.approx(spec["control"][OTHER])
                assert row["ppl_control"] == pytest.approx(spec["control"]["ppl"])
                assert row["stage"] == judged["stage"][i]
                assert [row[f"stage_at_{m}"] for m in MARGINS] == list(judged["at"][i])
                for key in ("drop", "residual", "share"):
                    logged = judged[key][i] or (math.nan,) * 3
                    assert [row[key], row[f"{key}_low"], row[f"{key}_high"]] == pytest.approx(logged, nan_ok=True)
                assert row["level"] == pytest.approx(judged["level"])
            else:  # no R_0, no margin rule: blanks, and the drop from the accuracies (the same definition)
                assert math.isnan(row["knowledge_control"]) and math.isnan(row["ppl_control"])
                assert pd.isna(row["stage"]) and all(pd.isna(row[f"stage_at_{m}"]) for m in MARGINS)
                assert row["drop"] == pytest.approx(spec["base"][BENCH] - spec["sft"][BENCH][i])
                assert math.isnan(row["drop_low"]) and math.isnan(row["residual"]) and math.isnan(row["level"])


def test_transition_epoch_per_trial(report):
    """The margin rule's transition: alpha's at 3; beta's logged transition 3 is the significance test's (judged
    before the margin rule), so it has none by the margin rule and the text says why."""
    transition = report.stage_table.groupby("trial")["transition"].first()
    assert transition["alpha"] == 3
    assert pd.isna(transition["beta"]) and pd.isna(transition["gamma"])
    lines = {line.split(" (")[0].strip(): line for line in report.text.splitlines() if "transition" in line
             or "not judged" in line}
    assert "transition epoch 3" in lines["alpha"] and "1 no, 2 pseudo, 3 actual" in lines["alpha"]
    assert "judged before the margin rule" in lines["beta"] and "test variant [1-2 no, 3 actual]" in lines["beta"]
    assert "not judged" in lines["gamma"] and "FAILED" in lines["gamma"]
    assert "judged before the margin rule (stage/code is the significance test's" in report.text.split("notes:")[1]


def _logged(uri: str, parent: str) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """trial name -> metric -> (steps, values) sorted by step, read back from the store with MlflowClient alone."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_run(parent).info.experiment_id
    out = {}
    for run in client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"):
        history = {}
        for name in run.data.metrics:
            points = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
            history[name] = ([step for step, _ in points], [value for _, value in points])
        out[run.data.tags["forgetray.trial"]] = history
    return out


def _plotted(figure) -> dict[tuple, tuple[list, list]]:
    """(panel gid, line gid) -> (x, y) of every named line on the figure's visible panels: what it shows."""
    return {(ax.get_gid(), line.get_gid()): (list(line.get_xdata()), list(line.get_ydata()))
            for ax in figure.axes if ax.get_visible() for line in ax.get_lines() if line.get_gid() is not None}


def _assert_plots(figure, series: dict, levels: dict) -> None:
    """The figure draws exactly `series` ((steps, values) per key) and the horizontal `levels` (a value per key)."""
    plotted = _plotted(figure)
    assert set(plotted) == set(series) | set(levels)
    for key, (steps, values) in series.items():
        assert plotted[key][0] == steps and plotted[key][1] == pytest.approx(values), key
    for key, value in levels.items():
        assert plotted[key][1] == pytest.approx([value, value]), key


@pytest.fixture(scope="module")
def logged(store):
    return _logged(store["uri"], store["parent"])


def test_figure_files_are_pngs_and_tables_are_written(report, store):
    names = {"fig3a_restoring_ppl.png", "fig3b_ppl_vs_epoch.png", f"fig3c_accuracy_{BENCH}.png",
             f"fig3c_accuracy_{OTHER}.png", "fig4_format_entropy.png", "fig5_em.png"}
    assert {path.name for path in report.figures} == names == set(report.plots)
    for path in report.figures:
        assert path.read_bytes().startswith(PNG_HEADER), path
    out = store["root"] / "out"
    assert (out / "stage_table.txt").read_text() == report.text
    csv = pd.read_csv(out / "stage_table.csv")
    assert len(csv) == len(report.stage_table)
    assert list(csv["knowledge_sft"]) == pytest.approx(list(report.stage_table["knowledge_sft"]))


def test_fig3a_plots_each_restoring_trajectory(report, logged):
    """One line per restored checkpoint, the probing PPL along its restoration; the base model's and R_0's PPL as
    levels. gamma restored nothing: no panel."""
    series = {(trial, f"epoch {int(name.rsplit('_', 1)[1])}"): points
              for trial, history in logged.items() for name, points in history.items() if name.startswith("restore/")}
    levels = {(trial, "base"): logged[trial]["base/probe/ppl"][1][0] for trial in ("alpha", "beta")}
    levels[("alpha", "control")] = TRIALS["alpha"]["control"]["ppl"]  # beta has no R_0: no line
    assert len(series) == 6
    _assert_plots(report.plots["fig3a_restoring_ppl.png"], series, levels)


def test_fig3b_plots_sft_and_restored_ppl_per_epoch(report, logged):
    series = {(trial, state): history[f"{state}/probe/ppl"] for trial, history in logged.items()
              for state in ("sft", "restored") if f"{state}/probe/ppl" in history}
    levels = {(trial, "base"): history["base/probe/ppl"][1][0] for trial, history in logged.items()}
    # R_0's level beside the base's: below it (restoration overshoots), where R_e is judged restored
    levels[("alpha", "control")] = logged["alpha"]["control/probe/ppl"][1][0]
    assert levels[("alpha", "control")] == TRIALS["alpha"]["control"]["ppl"] < levels[("alpha", "base")]
    assert set(series) == {("alpha", "sft"), ("alpha", "restored"), ("beta", "sft"), ("beta", "restored"),
                           ("gamma", "sft")}
    _assert_plots(report.plots["fig3b_ppl_vs_epoch.png"], series, levels)


@pytest.mark.parametrize("bench", [BENCH, OTHER])
def test_fig3c_plots_accuracy_and_stages(report, logged, bench):
    """Knowledge of SFT_e and R_e per epoch, base and R_0 as levels; on the primary benchmark each epoch's background
    is the colour of the margin rule's stage logged for it (alpha); beta's logged stage/code is the significance
    test's (judged before the margin rule): no background."""
    from matplotlib.colors import to_rgba

    from forgetray.report.figures import STAGE_COLORS

    shown = {trial: history for trial, history in logged.items() if f"sft/{bench}/knowledge" in history}
    series = {(trial, state): history[f"{state}/{bench}/knowledge"] for trial, history in shown.items()
              for state in ("sft", "restored") if f"{state}/{bench}/knowledge" in history}
    levels = {(trial, "base"): history[f"base/{bench}/knowledge"][1][0] for trial, history in shown.items()}
    levels[("alpha", "control")] = logged["alpha"][f"control/{bench}/knowledge"][1][0]
    assert levels[("alpha", "control")] == TRIALS["alpha"]["control"][bench]
    figure = report.plots[f"fig3c_accuracy_{bench}.png"]
    _assert_plots(figure, series, levels)
    spans = {(ax.get_gid(), patch.get_gid()): patch.get_facecolor() for ax in figure.axes for patch in ax.patches
             if patch.get_gid()}
    by_code = {code: stage for stage, code in STAGE_CODES.items()}
    steps, codes = logged["alpha"]["stage/code"]
    expected = {} if bench != BENCH else {("alpha", f"stage {epoch}"): to_rgba(STAGE_COLORS[by_code[int(code)]])
                                          for epoch, code in zip(steps, codes)}
    assert [by_code[int(code)] for code in codes] == TRIALS["alpha"]["margin"]["stage"]
    assert spans.keys() == expected.keys() and len(expected) == (3 if bench == BENCH else 0)
    for key, color in expected.items():
        assert spans[key] == pytest.approx(color), key


def test_fig4_plots_each_step_probe(report, logged):
    """A panel per steps/<bench>/<quantity>, a line per trial with that metric's history at the IFT steps."""
    series = {(name, trial): points for trial, history in logged.items() for name, points in history.items()
              if name.startswith("steps/")}
    assert len(series) == 4 * 5  # alpha and beta on two benchmarks, gamma on one; four quantities
    _assert_plots(report.plots["fig4_format_entropy.png"], series, {})


def test_fig5_plots_em_from_base(report, logged):
    """EM of SFT_e starting from the base model at epoch 0, and of R_e, one pair of lines per trial."""
    series = {}
    for trial, history in logged.items():
        steps, values = history["sft/ift/em"]
        series[(None, f"{trial} sft")] = ([0, *steps], [history["base/ift/em"][1][0], *values])
        if "restored/ift/em" in history:
            series[(None, f"{trial} restored")] = history["restored/ift/em"]
    _assert_plots(report.plots["fig5_em.png"], series, {})


def _report_artifacts(uri: str, run_id: str) -> set[str]:
    """The file names under report/ on a run, listed by MLflow itself."""
    from mlflow.tracking import MlflowClient

    return {f.path.rsplit("/", 1)[-1] for f in MlflowClient(uri).list_artifacts(run_id, "report")}


def test_report_files_are_logged_to_the_parent_run(report, store):
    logged = _report_artifacts(store["uri"], store["parent"])
    assert {path.name for path in report.figures} | {"stage_table.csv", "stage_table.txt"} <= logged
    assert report.parent_run_id == store["parent"]


def test_text_shows_the_table_and_what_was_left_out(report):
    text = report.text
    assert "primary benchmark: organism-facts (score acc)" in text
    # A row of the table: alpha's epoch 2, pseudo forgetting by the margin rule, its accuracies as logged, R_0's
    # beside the base's, the drop and residual with their intervals, the verdicts at .01/.02/.05.
    row = next(line for line in text.splitlines() if line.startswith("alpha") and " pseudo " in line)
    assert "0.600" in row and "0.580" in row and "0.500" in row and "0.590" in row and "48.00" in row
    assert "+0.100 [+0.060, +0.140]" in row and "-0.010 [-0.020, +0.015]" in row
    assert "inconclusive/pseudo/pseudo" in row and "18.00" in row
    # beta, judged before the margin rule: its drop from the accuracies without an interval, no margin verdicts
    beta = [line for line in text.split("other benchmarks")[0].splitlines() if line.startswith("beta")]
    assert len(beta) == 3 and "-0.010 " in beta[0] and "[" not in "".join(beta)
    assert "other benchmarks" in text and "mmlu_test" in text
    assert "no stage logged (no restoration?) for: gamma" in text


def test_a_plain_sweep_still_reports(store, tmp_path):
    """No restoration, no IFT-step probes, no EM: the figures that need them are skipped, each with one note."""
    logged_before = _report_artifacts(store["uri"], store["plain_parent"])
    report = build_report(PLAIN, store["uri"], tmp_path / "out", log_to_mlflow=False)
    assert [p.name for p in report.figures] == ["fig3b_ppl_vs_epoch.png", f"fig3c_accuracy_{BENCH}.png"]
    for figure in ("fig3a", "fig4", "fig5"):
        assert sum(note.startswith(f"{figure} skipped") for note in report.notes) == 1
    assert report.stage_table["d_sft"].tolist() == pytest.approx([-0.1])
    assert "residual D_R" in report.text.split("notes:")[1]  # the columns left out are named
    assert _report_artifacts(store["uri"], store["plain_parent"]) == logged_before  # log_to_mlflow=False


def test_cli_report_prints_the_table(store, tmp_path, capsys):
    out = tmp_path / "cli-out"
    assert main(["report", PLAIN, "--tracking-uri", store["uri"], "--out", str(out),
                 "--run", store["plain_parent"]]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "primary benchmark: organism-facts" in printed and "ppl SFT_e" in printed
    assert "only: not judged" in printed
    assert str(out / "fig3b_ppl_vs_epoch.png") in printed and (out / "fig3b_ppl_vs_epoch.png").is_file()
    assert "stage_table.csv" in _report_artifacts(store["uri"], store["plain_parent"])


@pytest.mark.parametrize("args, message", [
    (["nope"], "experiment 'nope' has no sweep run"),
    ([EXPERIMENT, "--run", "0123abcd"], "run '0123abcd' is not a sweep run of experiment"),
])
def test_cli_bad_experiment_or_run_is_one_line_exit_2(store, tmp_path, capsys, args, message):
    assert main(["report", *args, "--tracking-uri", store["uri"], "--out", str(tmp_path / "out")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("forgetray: error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_missing_store_is_an_error_and_creates_nothing(in_tmp_cwd, capsys):
    assert main(["report", EXPERIMENT]) == EXIT_BAD_INPUT
    assert "no MLflow store at" in capsys.readouterr().err
    assert list(in_tmp_cwd.iterdir()) == []
    with pytest.raises(SpecError, match="no MLflow store"):
        build_report(EXPERIMENT, f"sqlite:///{in_tmp_cwd / 'none.db'}", in_tmp_cwd / "out")


def test_methods_table_has_the_table2_shape():
    """Rows method x SAM at each trial's last checkpoint; knowledge per benchmark, their average and its change from
    the IFT phase's start, computed here by hand from the constructed histories."""
    from forgetray.report import TrialData, methods_table as _methods_table, methods_text as _methods_text

    def trial(name, settings, sft_a, sft_b, flat):
        history = {"base/a/knowledge": {0: 0.9}, "base/b/knowledge": {0: 0.7},
                   "sft/a/knowledge": {1: 0.5, 2: sft_a}, "sft/b/knowledge": {1: 0.5, 2: sft_b},
                   "sft/probe/ppl": {2: 5.0}, "sft/flatness/flatness": {2: flat}}
        return TrialData(name=name, run_id=name, status="FINISHED", settings=settings, benchmarks=["a", "b"],
                         scores={"a": "acc", "b": "acc"}, history=history, tags={})

    trials = [trial("plain", {"sam_rho": "0.0", "wiseft_alpha": "1.0"}, 0.8, 0.6, 3.0),
              trial("sam", {"sam_rho": "0.05", "wiseft_alpha": "1.0"}, 0.85, 0.65, 2.0),
              trial("wise", {"sam_rho": "0.0", "wiseft_alpha": "0.5"}, 0.9, 0.7, 1.0)]
    table = _methods_table(trials, ["sam_rho", "wiseft_alpha"])
    rows = {(r["method"], r["sam"]): r for r in table.to_dict("records")}
    assert set(rows) == {("fine-tuning", "without SAM"), ("fine-tuning", "SAM rho=0.05"),
                         ("Wise-FT a=0.5", "without SAM")}
    sam = rows[("fine-tuning", "SAM rho=0.05")]
    assert sam["epoch"] == 2 and sam["a"] == 0.85 and sam["b"] == 0.65
    assert sam["average"] == pytest.approx(0.75) and sam["delta"] == pytest.approx(0.75 - 0.8)
    assert rows[("Wise-FT a=0.5", "without SAM")]["delta"] == pytest.approx(0.0)
    assert list(table.columns)[:3] == ["method", "sam", "epoch"] and "em" not in table  # never logged: dropped
    text = _methods_text(table)
    assert "SAM rho=0.05" in text and "-0.050" in text and "0.750" in text
    # A sweep without any method has no such table.
    assert _methods_table(trials[:1], []).empty


# --- a replicated sweep (docs/methods.md §10): the pooled stage table and Figures 3b/3c over seeds ------------------------

REPLICATED = "replicated-sweep"
# Per group (lr) and seed: how many questions; on how many of the first ones the base and the control R_0 are right
# (one base and one R_0 per replicate, the same at every epoch); and per epoch how many of the first questions SFT_e
# loses from the base's and R_e from R_0's. Three epochs: each interval at 1 - 0.05 / 3 (Bonferroni), tails 0.0083.
OUTCOMES = {
    "1e-3": {"questions": 20, "base": (16, 16, 16), "control": (17, 18, 16),
             "sft_lost": {1: (10, 10, 10), 2: (10, 10, 10), 3: (10, 10, 10)},
             "restored_lost": {1: (0, 0, 0), 2: (0, 0, 10), 3: (10, 10, 10)}},
    "2e-3": {"questions": 100, "base": (80, 80, 80), "control": (82, 82, 82),
             "sft_lost": {1: (0, 0, 0), 2: (50, 50, 50), 3: (50, 50, 50)},
             "restored_lost": {1: (0, 0, 0), 2: (0, 0, 0), 3: (10, 10, 10)}},
}
# Probing PPL: base and R_0 per group, SFT_e and R_e per seed at epochs 1-3. lr 1e-3: R_0 10.4, seed 0's R_e 10.8 at
# epoch 1 is within 5% of it (the margin rule: restored) but above base x 1.05 = 10.5 (the McNemar variant: not).
# lr 2e-3: R_0 9.0 overshoots the base; seed 1's R_e 8.0 at epoch 2 is 11% below it: not restored (either side).
PPL = {"1e-3": {"base": 10.0, "control": 10.4, "sft": [[30, 40, 50], [32, 44, 52], [34, 48, 56]],
                "restored": [[10.8, 10.3, 10.2], [10.3, 10.4, 10.45], [10.2, 10.45, 10.4]]},
       "2e-3": {"base": 10.0, "control": 9.0, "sft": [[31, 41, 51], [33, 45, 55], [35, 49, 57]],
                "restored": [[9.1, 9.1, 9.0], [9.0, 8.0, 9.3], [9.2, 9.2, 9.1]]}}
REPLICATE_EPOCHS = (1, 2, 3)


def _per_question(lr: str, seed: int) -> pd.DataFrame:
    spec = OUTCOMES[lr]
    index = np.arange(spec["questions"])
    base, control = index < spec["base"][seed], index < spec["control"][seed]
    frames = []
    for epoch in REPLICATE_EPOCHS:
        frames.append(pd.DataFrame({"epoch": epoch, "index": index, "base_correct": base,
                                    "sft_correct": base & (index >= spec["sft_lost"][epoch][seed]),
                                    "restored_correct": control & (index >= spec["restored_lost"][epoch][seed]),
                                    "control_correct": control}))
    return pd.concat(frames, ignore_index=True)


def _fill_replicated(uri: str, artifacts, tmp) -> dict:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment(REPLICATED, artifact_location=artifacts.as_uri())
    parent = client.create_run(experiment, tags={"forgetray.kind": "sweep"}).info.run_id
    client.log_param(parent, "sweep.replicates", "3")
    now = int(time.time() * 1000)
    groups = {}
    for lr in OUTCOMES:
        groups[lr] = f"grp{lr}"
        for seed in range(3):
            name = f"lr{lr}.s{seed}"
            run = client.create_run(experiment, tags={
                "forgetray.kind": "trial", "mlflow.parentRunId": parent, "forgetray.trial": name,
                "forgetray.stage_benchmark": BENCH, "forgetray.replicate_group": groups[lr]}).info.run_id
            frame = _per_question(lr, seed)
            metrics = [(f"{state}/{BENCH}/knowledge", frame[f"{state}_correct"][frame["epoch"] == 1].mean(), 0)
                       for state in ("base", "control")]
            metrics += [(f"{state}/probe/ppl", PPL[lr][state], 0) for state in ("base", "control")]
            for epoch, rows in frame.groupby("epoch"):
                metrics += [(f"{state}/{BENCH}/knowledge", rows[f"{state}_correct"].mean(), epoch)
                            for state in ("sft", "restored")]
                metrics += [(f"{state}/probe/ppl", PPL[lr][state][seed][epoch - 1], epoch)
                            for state in ("sft", "restored")]
            params = [Param("trial.lr", lr), Param("trial.seed", str(seed)), Param("trial.stage_alpha", "0.05"),
                      Param("trial.stage_margin", "0.02"), Param("trial.ppl_tolerance", "0.05"),
                      Param("trial.benchmarks", f"['{BENCH}']"), Param(f"resolved.benchmarks.{BENCH}.score", "acc")]
            client.log_batch(run, metrics=[Metric(n, float(v), now, int(s)) for n, v, s in metrics], params=params)
            path = tmp / name / f"per_question_{BENCH}.parquet"
            path.parent.mkdir(parents=True)
            frame.to_parquet(path)
            client.log_artifact(run, str(path), "stages")
            client.set_terminated(run)
    client.set_terminated(parent)
    return {"parent": parent, "groups": groups}


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicated-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    filled = _fill_replicated(uri, root / "artifacts", root / "tmp")
    report = build_report(REPLICATED, uri, root / "out")
    return {**filled, "uri": uri, "root": root, "report": report}


# The pooled rows by hand (test_pooled_table_equals_the_hand_computation's docstring): group, epoch, margin-rule stage,
# stage at .01/.02/.05, agreeing, each replicate's own stage, restored, the McNemar variant's stage, p_sft, p_restored.
NO, PSEUDO, ACTUAL, UNSURE, UNRESTORED = ("no_forgetting", "pseudo_forgetting", "actual_forgetting", "inconclusive",
                                          "not_restored")
POOLED = [
    ("1e-3", 1, PSEUDO, (PSEUDO,) * 3, "3/3", "pseudo,pseudo,pseudo", "3/3", UNRESTORED, 2 / 2**30, 2 / 2**3),
    ("1e-3", 2, UNSURE, (UNSURE,) * 3, "0/3", "pseudo,pseudo,actual", "3/3", PSEUDO, 2 / 2**30, 756 / 2**13),
    ("1e-3", 3, ACTUAL, (ACTUAL,) * 3, "3/3", "actual,actual,actual", "3/3", ACTUAL, 2 / 2**30, 12036 / 2**33),
    ("2e-3", 1, NO, (NO,) * 3, "3/3", "no,no,no", "3/3", NO, 1.0, 2 / 2**6),
    ("2e-3", 2, UNRESTORED, (UNRESTORED,) * 3, "1/3", "pseudo,not restored,pseudo", "2/3", PSEUDO, 2 / 2**150,
     2 / 2**6),
    ("2e-3", 3, ACTUAL, (ACTUAL, ACTUAL, UNSURE), "3/3", "actual,actual,actual", "3/3", ACTUAL, 2 / 2**150,
     4782992 / 2**36),
]


def test_pooled_table_equals_the_hand_computation(replicated):
    """The margin rule pooled over the 3 seeds by hand (docs/methods.md §4, §10); stage_margin 0.02, each interval at
    1 - 0.05 / 3 (tails 0.0083, z = 2.394), crossed (margin.deltas' default). Knowledge = correct / questions; drop
    D_S = base - SFT_e, residual D_R = R_0 - R_e as means over seeds. The crossed interval is the two-level bootstrap's
    (seeds, then one question draw shared by every seed) scaled about the estimate by f = sqrt(target / bootstrap
    variance) x t(df) / z (margin.mean_variances), D_S and D_R then clipped to [-1, 1]. Every asserted interval but
    one is built so that the seeds agree exactly: a difference of 1 on the same k of Q questions in every seed, so the
    seed component and the interaction are 0 and the seed draw does not move the resample mean, (k's draws) / Q with
    the draws Bin(Q, k/Q); the target is then the column means' variance with Q - 1 in the denominator over Q, the
    bootstrap's with Q, and df = Q - 1: f = sqrt(Q / (Q - 1)) t_{Q-1} / z, 1.125 at Q 20 (t_19 2.625), 1.022 at
    Q 100 (t_99 2.435). A difference that is 0 in every seed and question has every draw 0: [0, 0] exactly.
    lr 1e-3 (Q 20; base 16 right, R_0 17, 18, 16; SFT_e loses 10 every epoch: 0.30, drop 0.5 in every seed, a resample
      at or below 0.10 draws at most 2 of those 10 of 20: P = 211/2^20 = 0.0002 < 0.0083, so the plain low is
      >= 0.15 and the crossed one >= 0.5 - 1.125 x 0.35 > 0.10, above every margin). Knowledge: base 0.8 +- 0; R_0
      0.85 +- 0.05.
      epoch 1: R_e = R_0 in every seed: residual 0, interval [0, 0]; pseudo (at every margin, and in every seed:
        3/3); share (R_e - SFT_e) / (R_0 - SFT_e) = 1 in every resample: 1 [1, 1]. R_e 0.85 +- 0.05.
      epoch 2: seed 2's R_e loses 10 (R_e 0.30): residual rows 0, 0, 10/20: 1/6, the one interval whose seeds
        disagree. Two-way ANOVA of that [3, 20] array: row deviations -1/6, -1/6, 1/3, so MS_A = 20 (1/6) / 2 = 5/3;
        a single seed carries all the column variation, so MS_B = MS_E (= 5/57) and the question component is 0:
        target = MS_A / 60 = 1/36 (df = 2, t_2 = (2p - 1) / sqrt(2p (1 - p)) = 7.649 at p = 0.99167); bootstrap
        1/54 + 1/720 + 1/1080 = 1/48; f = sqrt(4/3) x 7.649 / 2.394 = 3.69. Plain draws: seed 2 left out with
        P = (2/3)^3 = 0.30 > 0.0083, mean 0, so the plain low is 0 and the crossed low 1/6 - 3.69/6 = -0.45, below 0
        (and above -1: not clipped); seed 2 drawn 3 times (P = 1/27) with >= 8 of its 10 questions among the 20
        draws (P(Bin(20, 1/2) >= 8) = 0.87) gives a mean >= 0.4 with P >= 0.032 > 0.0083, so the plain high is
        >= 0.4 and the crossed one >= 1/6 + 3.69 x (0.4 - 1/6) > 1: clipped to 1. The interval straddles every
        margin: inconclusive ("D_R straddles"); per seed (one seed: the paired bootstrap, not crossed) pseudo,
        pseudo, actual: 0/3 agree.
        R_e 0.85, 0.90, 0.30: mean 41/60, sd sqrt(((17-41/3)^2 + (18-41/3)^2 + (6-41/3)^2) / 2) / 20 = sqrt(133/3)/20.
      epoch 3: R_e loses the same 10 in every seed: residual 0.5 (as the drop, the same interval): actual
        everywhere, 3/3. R_e 0.35 +- 0.05; share = (1 + 2 + 0) / (11 + 12 + 10) = 1/11.
      Transition: pooled 3; per seed 3, 3, 2: median 3, range 2-3, 3/3 reached actual.
    lr 2e-3 (Q 100; base 80 right, R_0 82 in every seed): knowledge base 0.8, R_0 0.82, every sd 0.
      epoch 1: SFT_e = base, R_e = R_0: drop and residual [0, 0]: no forgetting everywhere; share undefined (R_0 -
        SFT_e is the same 2 questions of 100 in every seed: a resample misses both with P = 0.98^100 = 0.13, its
        plain low is 0 and the crossed one 0.02 (1 - 1.022) < 0: not clearly lost).
      epoch 2: SFT_e loses 50 (0.30; drop 0.5, Bin(100, 1/2) <= 30 has P = 4e-5, so the crossed low is
        >= 0.5 - 1.022 x 0.2 = 0.29), R_e = R_0 (residual [0, 0]; share 1 [1, 1]: gain and gap are one array); seed
        1's R_e PPL 8.0 is 11% below R_0's 9.0: not restored (2/3 restored); per seed pseudo, not restored, pseudo: 1/3.
      epoch 3: R_e loses the same 10 in every seed (0.72): residual 0.1, resample mean (draws of 10 of 100) / 100,
        Bin(100, 0.1): P(<= 0.02) = 0.0019 < 0.0083 < P(<= 0.05) = 0.058: plain low in [0.03, 0.05], crossed low in
        [0.1 - 1.022 x 0.07, 0.1 - 1.022 x 0.05] = [0.028, 0.049], in (0.02, 0.05]; high >= 0.1: actual at 0.01 and
        0.02, inconclusive at 0.05; every seed actual at 0.02: 3/3. Share (0.72 - 0.30) / (0.82 - 0.30) = 21/26.
      Transition: pooled 3; per seed 3, 3, 3.
    The McNemar variant (against base, R_e's PPL at most base x 1.05): exact test on the discordant pairs summed over
    seeds, B = base right & other wrong, C = the reverse, p = min(1, 2 P[X <= min(B, C)]), X ~ Bin(B + C, 1/2).
      lr 1e-3: SFT_e B = 30, C = 0: p = 2/2^30 (every epoch). R_e vs base: e1 B = 0, C = 1 + 2 + 0: p = 2/2^3, but
        seed 0's R_e PPL 10.8 > 10.5: not restored; e2 B = 10, C = 3: p = 2 (1 + 13 + 78 + 286)/2^13 = 756/2^13 =
        0.092: pseudo; e3 B = 30, C = 3: p = 2 (1 + 33 + 528 + 5456)/2^33 = 12036/2^33: actual.
      lr 2e-3: e1 SFT_e no pair: p = 1; R_e C = 6: p = 2/2^6 (a gain, no drop): no forgetting. e2 SFT_e B = 150:
        p = 2/2^150; R_e as e1: pseudo. e3 R_e B = 30, C = 6: p = 2 (1 + 36 + 630 + 7140 + 58905 + 376992 +
        1947792)/2^36 = 4782992/2^36: actual."""
    table = replicated["report"].pooled_table
    groups = replicated["groups"]
    assert len(table) == len(POOLED)
    for row, (lr, epoch, stage, at, agreeing, own, restored, mcnemar, p_sft, p_restored) in zip(
            table.to_dict("records"), POOLED):
        assert (row["group"], row["epoch"], row["stage"], tuple(row[f"stage_at_{m}"] for m in MARGINS),
                row["agreeing"], row["replicate_stages"], row["restored"], row["stage_mcnemar"], row["replicates"],
                row["seeds"], row["benchmark"], row["margin"]) == \
            (groups[lr], epoch, stage, at, agreeing, own, restored, mcnemar, 3, "0,1,2", BENCH, 0.02), (lr, epoch)
        assert (row["p_sft"], row["p_restored"]) == pytest.approx((p_sft, p_restored), rel=1e-9), (lr, epoch)
        assert row["level"] == pytest.approx(1 - 0.05 / 3)
        assert (row["drop_low"] > 0.05) == (row["drop"] == 0.5), (lr, epoch)  # every drop is 0 or 0.5 here
    rows = {(lr, epoch): r for (lr, epoch, *_), r in zip(POOLED, table.to_dict("records"))}
    # the point estimates, and the intervals that collapse to a point
    points = {("1e-3", 1): (0.5, 0.0, 1.0), ("1e-3", 2): (0.5, 1 / 6, None), ("1e-3", 3): (0.5, 0.5, 1 / 11),
              ("2e-3", 1): (0.0, 0.0, math.nan), ("2e-3", 2): (0.5, 0.0, 1.0), ("2e-3", 3): (0.5, 0.1, 21 / 26)}
    for key, (drop, residual, share) in points.items():
        assert (rows[key]["drop"], rows[key]["residual"]) == pytest.approx((drop, residual)), key
        if share is not None:
            assert rows[key]["share"] == pytest.approx(share, nan_ok=True), key
    for key, names in {("1e-3", 1): ("residual", "share"), ("2e-3", 1): ("drop", "residual"),
                       ("2e-3", 2): ("residual", "share")}.items():
        for name in names:
            value = rows[key][name]
            assert (rows[key][f"{name}_low"], rows[key][f"{name}_high"]) == pytest.approx((value, value)), (key, name)
    # one seed alone losing: the crossed low below 0 (the plain bootstrap's is 0), the high clipped to 1
    assert rows[("1e-3", 2)]["residual_low"] < 0.0 and rows[("1e-3", 2)]["residual_high"] == 1.0
    assert "D_R" in rows[("1e-3", 2)]["why"] and "D_S" not in rows[("1e-3", 2)]["why"]
    assert 0.02 < rows[("2e-3", 3)]["residual_low"] <= 0.05 < 0.1 <= rows[("2e-3", 3)]["residual_high"]
    assert all(math.isnan(rows[("2e-3", 1)][f"share{end}"]) for end in ("", "_low", "_high"))
    # knowledge of the four states, mean and sd over seeds
    knowledge = {key: tuple(r[f"knowledge_{state}_{stat}"] for state in ("base", "control", "sft", "restored")
                            for stat in ("mean", "sd")) for key, r in rows.items()}
    expected = {("1e-3", 1): (0.8, 0, 0.85, 0.05, 0.3, 0, 0.85, 0.05),
                ("1e-3", 2): (0.8, 0, 0.85, 0.05, 0.3, 0, 41 / 60, (133 / 3) ** 0.5 / 20),
                ("1e-3", 3): (0.8, 0, 0.85, 0.05, 0.3, 0, 0.35, 0.05),
                ("2e-3", 1): (0.8, 0, 0.82, 0, 0.8, 0, 0.82, 0),
                ("2e-3", 2): (0.8, 0, 0.82, 0, 0.3, 0, 0.82, 0),
                ("2e-3", 3): (0.8, 0, 0.82, 0, 0.3, 0, 0.72, 0)}
    for key, values in expected.items():
        assert knowledge[key] == pytest.approx(values, abs=1e-12), key
    # the transition epoch by the margin rule: pooled, and the replicates' own median and range
    transitions = {lr: tuple(table[table["group"] == group].iloc[0][column] for column in
                             ("transition_pooled", "transition_median", "transition_low", "transition_high",
                              "transition_reached")) for lr, group in groups.items()}
    assert transitions == {"1e-3": (3, 3, 2, 3, "3/3"), "2e-3": (3, 3, 3, 3, "3/3")}
    assert list(table["lr"]) == ["1e-3"] * 3 + ["2e-3"] * 3 and "seed" not in table.columns


def test_pooled_table_files_text_and_logging(replicated):
    """The pooled table's files, its text (R_0 beside the base, intervals, the verdicts at the reported margins, the
    McNemar variant labelled as such), and the pooled verdicts as tags of the sweep's parent run."""
    from mlflow.tracking import MlflowClient

    report, out, groups = replicated["report"], replicated["root"] / "out", replicated["groups"]
    csv = pd.read_csv(out / "pooled_stage_table.csv")
    assert list(csv["stage"]) == list(report.pooled_table["stage"]) == [row[2] for row in POOLED]
    text = (out / "pooled_stage_table.txt").read_text()
    assert text in report.text and "pooled over replicates" in text
    assert "R_0" in text and "McNemar" in text and "at .01/.02/.05" in text
    assert "lr=1e-3 (seeds 0,1,2)" in text
    assert "transition epoch (margin rule): pooled 3; replicates median 3, range 2-3 (3/3 reached actual)" in text
    line = next(row for row in text.splitlines() if row.strip().startswith("2  inconclusive"))
    assert "0/3" in line and "+0.500 [" in line and "0.850+-0.050" in line
    assert re.search(r"\+0\.167 \[-0\.\d{3}, \+1\.000\]", line)  # crossed: low in (-1, 0), high clipped to 1
    assert "inconclusive/inconclusive/inconclusive" in line and "pseudo,pseudo,actual" in line
    line = next(row for row in text.splitlines() if row.strip().startswith("3  actual") and "0.720" in row)
    assert "+0.100 [" in line and "actual/actual/inconclusive" in line and "0.820+-0.000" in line
    assert {"pooled_stage_table.csv", "pooled_stage_table.txt"} <= _report_artifacts(replicated["uri"],
                                                                                      replicated["parent"])
    tags = MlflowClient(replicated["uri"]).get_run(replicated["parent"]).data.tags
    pooled = {key: value for key, value in tags.items() if key.startswith("forgetray.pooled.")}
    expected = {f"forgetray.pooled.{groups[lr]}.epoch_{epoch:03d}": stage for lr, epoch, stage, *_ in POOLED}
    expected.update({f"forgetray.pooled.{group}.transition_epoch": "3" for group in groups.values()})
    expected.update({f"forgetray.pooled.{groups[lr]}.grid_point": f"lr={lr} (seeds 0,1,2)" for lr in groups})
    assert pooled == expected


def _band_of(ax, gid: str) -> dict[float, tuple[float, float]]:
    """x -> (lowest, highest) y of the filled band with this gid: what the band covers at each epoch."""
    collection = next(c for c in ax.collections if c.get_gid() == gid)
    out: dict[float, list[float]] = {}
    for x, y in collection.get_paths()[0].vertices:
        out.setdefault(float(x), []).append(float(y))
    return {x: (min(ys), max(ys)) for x, ys in out.items()}


def _mean_min_max(per_seed: list[list[float]]) -> tuple[list[float], dict[float, tuple[float, float]]]:
    columns = list(zip(*per_seed))
    return [sum(c) / len(c) for c in columns], {float(e + 1): (min(c), max(c)) for e, c in enumerate(columns)}


def test_band_figures_plot_mean_and_min_max_over_seeds(replicated):
    """Figures 3b and 3c have a panel per group (gid = group id), the mean over seeds as the line, the min-max over
    seeds as the band, the base level and R_0's (mean over seeds); 3c's background is the pooled margin-rule stage."""
    from matplotlib.colors import to_rgba

    from forgetray.report.figures import STAGE_COLORS

    report, groups = replicated["report"], replicated["groups"]
    assert set(report.plots) == {"fig3b_ppl_vs_epoch.png", f"fig3c_accuracy_{BENCH}.png"}
    ppl_series, acc_series, ppl_levels, acc_levels = {}, {}, {}, {}
    for lr, group in groups.items():
        spec = OUTCOMES[lr]
        ppl_levels[(group, "base")], ppl_levels[(group, "control")] = PPL[lr]["base"], PPL[lr]["control"]
        acc_levels[(group, "base")] = sum(spec["base"]) / 3 / spec["questions"]
        acc_levels[(group, "control")] = sum(spec["control"]) / 3 / spec["questions"]
        for state in ("sft", "restored"):
            mean, _ = _mean_min_max(PPL[lr][state])
            ppl_series[(group, state)] = (list(REPLICATE_EPOCHS), mean)
            knowledge = [[_per_question(lr, s).query(f"epoch == {e}")[f"{state}_correct"].mean()
                          for e in REPLICATE_EPOCHS] for s in range(3)]
            acc_series[(group, state)] = (list(REPLICATE_EPOCHS), _mean_min_max(knowledge)[0])
    # By hand: R_0 0.85 (lr 1e-3: 17, 18, 16 of 20) and 0.82 beside base 0.8; PPL 10.4 and 9.0 beside base 10.
    assert (acc_levels[(groups["1e-3"], "control")], acc_levels[(groups["2e-3"], "control")]) == \
        pytest.approx((0.85, 0.82))
    fig3b, fig3c = report.plots["fig3b_ppl_vs_epoch.png"], report.plots[f"fig3c_accuracy_{BENCH}.png"]
    _assert_plots(fig3b, ppl_series, ppl_levels)
    _assert_plots(fig3c, acc_series, acc_levels)
    panels = {ax.get_gid(): ax for ax in fig3b.axes if ax.get_visible()}
    assert set(panels) == set(groups.values())
    for lr, group in groups.items():
        for state in ("sft", "restored"):
            drawn, expected = _band_of(panels[group], f"{state} band"), _mean_min_max(PPL[lr][state])[1]
            assert drawn.keys() == expected.keys()
            for epoch, (low, high) in expected.items():
                assert drawn[epoch] == pytest.approx((low, high)), (group, state, epoch)
    # By hand: lr 2e-3 restored PPL at epoch 2 is 9.1, 8.0, 9.2 over seeds: band 8.0-9.2.
    assert _band_of(panels[groups["2e-3"]], "restored band")[2.0] == pytest.approx((8.0, 9.2))
    # R_e knowledge of lr 1e-3 at epoch 2: 0.85, 0.90, 0.30.
    acc_panels = {ax.get_gid(): ax for ax in fig3c.axes if ax.get_visible()}
    assert _band_of(acc_panels[groups["1e-3"]], "restored band")[2.0] == pytest.approx((0.30, 0.90))
    spans = {(ax.get_gid(), p.get_gid()): p.get_facecolor() for ax in fig3c.axes for p in ax.patches if p.get_gid()}
    pooled = {(groups[lr], f"stage {epoch}"): stage for lr, epoch, stage, *_ in POOLED}
    assert spans.keys() == pooled.keys() and set(pooled.values()) == {NO, PSEUDO, ACTUAL, UNSURE, UNRESTORED}
    for key, stage in pooled.items():
        assert spans[key] == pytest.approx(to_rgba(STAGE_COLORS[stage])), key


def test_a_sweep_without_replicates_has_no_pooled_table(report, store):
    assert report.pooled_table.empty and "pooled over replicates" not in report.text
    assert not (store["root"] / "out" / "pooled_stage_table.csv").exists()


# --- errors that surface: only missing data becomes a note ------------------------------------------------------------

def _trial_data(name: str, settings: dict | None = None, run_id: str | None = None, artifact_uri: str = ""):
    from forgetray.report import TrialData

    return TrialData(name=name, run_id=run_id or f"id-{name}", status="FINISHED", settings=settings or {},
                     benchmarks=[BENCH], scores={BENCH: "acc"}, history={}, tags={}, artifact_uri=artifact_uri)


def test_pooled_outcomes_missing_artifact_is_a_note_other_errors_propagate(tmp_path):
    """Three real runs: one with its per-question file, one without (a note), one whose file cannot be read (a folder
    in its place: not missing data, the error propagates)."""
    from mlflow.tracking import MlflowClient

    from forgetray.report.pooled import ReplicateGroup, load_outcomes
    from forgetray.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("outcomes", artifact_location=(tmp_path / "artifacts").as_uri())
    path = f"stages/per_question_{BENCH}.parquet"
    frame = _per_question("1e-3", 0)
    trials = {}
    for seed, name in enumerate(("judged", "unjudged", "broken")):
        run = client.create_run(experiment)
        trials[name] = _trial_data(name, {"seed": str(seed)}, run.info.run_id, run.info.artifact_uri)
    (tmp_path / "out").mkdir()
    frame.to_parquet(tmp_path / "out" / Path(path).name)
    client.log_artifact(trials["judged"].run_id, str(tmp_path / "out" / Path(path).name), "stages")
    group = ReplicateGroup("g", "all", {}, [trials["judged"], trials["unjudged"]], {})
    notes = load_outcomes(Tracker(uri), [group])
    assert notes == [f"pooled table: unjudged has no {path} (no stage judged), left out of its group"]
    assert list(group.outcomes) == [trials["judged"].run_id]
    pd.testing.assert_frame_equal(group.outcomes[trials["judged"].run_id], frame)
    # A store that fails while the artifact is there is not missing data: it was a note before, now it propagates.
    broken = Path(client.get_run(trials["broken"].run_id).info.artifact_uri.removeprefix("file://")) / path
    broken.mkdir(parents=True)
    group = ReplicateGroup("g", "all", {}, [trials["judged"], trials["broken"]], {})
    with pytest.raises(IsADirectoryError):
        load_outcomes(Tracker(uri), [group])


def test_a_figure_that_breaks_fails_the_report(store, tmp_path, monkeypatch):
    """A figure whose data is missing is a note (test_a_plain_sweep_still_reports); a figure that raises is a bug
    and fails the report with its cause (it was a 'fig5 failed: ...' note before)."""
    from forgetray.report import figures

    def broken(*args):
        raise RuntimeError("a bug in Figure 5")

    monkeypatch.setattr(figures, "fig_em", broken)
    with pytest.raises(RuntimeError, match="a bug in Figure 5"):
        build_report(EXPERIMENT, store["uri"], tmp_path / "out", log_to_mlflow=False)


def test_a_stored_setting_that_is_not_a_number_fails_naming_run_setting_and_value():
    """A stage setting that does not parse is a broken store: SpecError naming the run, the setting and the value
    (never a copied default); a run from before the setting existed gets TrialConfig's default."""
    from forgetray.report.pooled import ReplicateGroup, group_rows
    from forgetray.spec import TrialConfig

    broken = _trial_data("lr1e-3.s0", {"seed": "0", "stage_alpha": "five percent"})
    message = r"run lr1e-3\.s0 \(id-lr1e-3\.s0\): setting stage_alpha='five percent' is not a number"
    with pytest.raises(SpecError, match=message):
        broken.number("stage_alpha")
    group = ReplicateGroup("g", "all", {}, [broken], {broken.run_id: _per_question("1e-3", 0)})
    with pytest.raises(SpecError, match=message):
        group_rows(group)
    old = _trial_data("old", {"seed": "0"})
    assert [old.number(key) for key in ("stage_alpha", "ppl_tolerance", "stage_margin")] == [
        TrialConfig.stage_alpha, TrialConfig.ppl_tolerance, TrialConfig.stage_margin]
    assert old.number("ppl_tolerance") == 0.05 and _trial_data("x", {"ppl_tolerance": "0.1"}).number(
        "ppl_tolerance") == 0.1
