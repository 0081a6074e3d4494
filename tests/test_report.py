"""The sweep report against a real sqlite MLflow store filled by hand with the metric contract's names.

The store is written with MlflowClient directly (not through forgetray.tracking), from the plain dicts below, and
every check compares the report with those dicts: the report is tested against what was logged, not against itself.
The figures are checked on the data their matplotlib Figures plot (`Report.plots`), against the store read back
with MlflowClient.
Three trials: `alpha` goes no -> pseudo -> actual forgetting (transition at epoch 3), `beta` never forgets, `gamma`
ran without restoration and failed after 2 epochs (base and SFT metrics only).
"""

from __future__ import annotations

import math
import time

import pandas as pd
import pytest

from forgetray.cli import EXIT_BAD_INPUT, EXIT_OK, main
from forgetray.metrics.stage import STAGE_CODES
from forgetray.report import build_report
from forgetray.spec import SpecError

EXPERIMENT, PLAIN = "report-sweep", "plain-sweep"
BENCH, OTHER = "organism-facts", "mmlu_test"
PNG_HEADER = b"\x89PNG\r\n\x1a\n"

# What each trial logs. Per-epoch lists are epochs 1, 2, 3...; "stages" are (test stage, fixed-threshold stage).
TRIALS = {
    "alpha": {
        "settings": {"model": "tiny-llama", "lr": "1e-05", "restore_pool": "organism-pool",
                     "benchmarks": f"['{BENCH}', '/data/{OTHER}.jsonl']"},
        "status": "FINISHED",
        "speed": 0.4,  # how fast P_fmt rises and the entropies fall over the IFT steps (Figure 4)
        "base": {BENCH: 0.60, OTHER: 0.40, "ppl": 20.0, "em": 0.10},
        "sft": {BENCH: [0.59, 0.50, 0.45], OTHER: [0.39, 0.35, 0.30], "ppl": [35.0, 48.0, 60.0],
                "em": [0.30, 0.50, 0.70]},
        "restored": {BENCH: [0.60, 0.59, 0.50], OTHER: [0.40, 0.39, 0.33], "ppl": [20.5, 20.8, 20.9],
                     "em": [0.20, 0.30, 0.40]},
        "p": {"sft": [0.8, 0.001, 0.0001], "restored": [1.0, 0.7, 0.002]},
        "stages": [("no_forgetting", "no_forgetting"), ("pseudo_forgetting", "pseudo_forgetting"),
                   ("actual_forgetting", "actual_forgetting")],
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
        "p": {"sft": [1.0, 1.0, 0.9], "restored": [1.0, 1.0, 1.0]},
        "stages": [("no_forgetting", "no_forgetting")] * 3,
        "transition": "none",
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
            out += [("stage/code", STAGE_CODES[test], epoch), ("stage/fixed_code", STAGE_CODES[fixed], epoch),
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
        for i, (stage, _) in enumerate(spec.get("stages", [])):
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
                assert (row["stage"], row["stage_fixed"]) == spec["stages"][i]
                assert row[f"{OTHER}/knowledge_restored"] == pytest.approx(spec["restored"][OTHER][i])
            else:  # the degraded trial: nothing about R_e or stages, and no made-up values
                assert math.isnan(row["knowledge_restored"]) and math.isnan(row["ppl_restored"])
                assert pd.isna(row["stage"]) and pd.isna(row["stage_fixed"])
                assert math.isnan(row["p_sft"])


def test_transition_epoch_per_trial(report):
    transition = report.stage_table.groupby("trial")["transition"].first()
    assert transition["alpha"] == 3
    assert pd.isna(transition["beta"]) and pd.isna(transition["gamma"])
    lines = {line.split(" (")[0].strip(): line for line in report.text.splitlines() if "transition" in line
             or "not judged" in line}
    assert "transition epoch 3" in lines["alpha"] and "1 no, 2 pseudo, 3 actual" in lines["alpha"]
    assert "transition none within 3 epoch(s)" in lines["beta"]
    assert "not judged" in lines["gamma"] and "FAILED" in lines["gamma"]


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
    """One line per restored checkpoint, the probing PPL along its restoration; the base model's PPL as a level.
    gamma restored nothing: no panel."""
    series = {(trial, f"epoch {int(name.rsplit('_', 1)[1])}"): points
              for trial, history in logged.items() for name, points in history.items() if name.startswith("restore/")}
    levels = {(trial, "base"): logged[trial]["base/probe/ppl"][1][0] for trial in ("alpha", "beta")}
    assert len(series) == 6
    _assert_plots(report.plots["fig3a_restoring_ppl.png"], series, levels)


def test_fig3b_plots_sft_and_restored_ppl_per_epoch(report, logged):
    series = {(trial, state): history[f"{state}/probe/ppl"] for trial, history in logged.items()
              for state in ("sft", "restored") if f"{state}/probe/ppl" in history}
    levels = {(trial, "base"): history["base/probe/ppl"][1][0] for trial, history in logged.items()}
    assert set(series) == {("alpha", "sft"), ("alpha", "restored"), ("beta", "sft"), ("beta", "restored"),
                           ("gamma", "sft")}
    _assert_plots(report.plots["fig3b_ppl_vs_epoch.png"], series, levels)


@pytest.mark.parametrize("bench", [BENCH, OTHER])
def test_fig3c_plots_accuracy_and_stages(report, logged, bench):
    """Knowledge of SFT_e and R_e per epoch, base as a level; on the primary benchmark each epoch's background is
    the colour of the stage logged for it."""
    from matplotlib.colors import to_rgba

    from forgetray.report.figures import STAGE_COLORS

    shown = {trial: history for trial, history in logged.items() if f"sft/{bench}/knowledge" in history}
    series = {(trial, state): history[f"{state}/{bench}/knowledge"] for trial, history in shown.items()
              for state in ("sft", "restored") if f"{state}/{bench}/knowledge" in history}
    levels = {(trial, "base"): history[f"base/{bench}/knowledge"][1][0] for trial, history in shown.items()}
    figure = report.plots[f"fig3c_accuracy_{bench}.png"]
    _assert_plots(figure, series, levels)
    spans = {(ax.get_gid(), patch.get_gid()): patch.get_facecolor() for ax in figure.axes for patch in ax.patches
             if patch.get_gid()}
    by_code = {code: stage for stage, code in STAGE_CODES.items()}
    expected = {} if bench != BENCH else {
        (trial, f"stage {epoch}"): to_rgba(STAGE_COLORS[by_code[int(code)]])
        for trial, history in shown.items() if "stage/code" in history
        for epoch, code in zip(*history["stage/code"])}
    assert spans.keys() == expected.keys() and len(expected) == (6 if bench == BENCH else 0)
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
    # A row of the table: alpha's epoch 2, pseudo forgetting, its accuracies as logged.
    row = next(line for line in text.splitlines() if line.startswith("alpha") and " pseudo " in line)
    assert "0.600" in row and "0.500" in row and "0.590" in row and "48.00" in row
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
    assert "dR" in report.text.split("notes:")[1]  # the columns left out are named
    assert _report_artifacts(store["uri"], store["plain_parent"]) == logged_before  # log_to_mlflow=False


def test_cli_report_prints_the_table(store, tmp_path, capsys):
    out = tmp_path / "cli-out"
    assert main(["report", PLAIN, "--tracking-uri", store["uri"], "--out", str(out),
                 "--run", store["plain_parent"]]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "primary benchmark: organism-facts" in printed and "ppl sft" in printed
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


# --- a replicated sweep (METHODS.md §10): the pooled stage table and Figures 3b/3c over seeds ------------------------

REPLICATED = "replicated-sweep"
# Per group (lr) and seed, per epoch: the questions as (count, base, sft, restored) correctness rows, base right on
# the first 16 of 20 questions in every replicate and epoch (one base model per replicate).
OUTCOMES = {
    "1e-3": {1: [[(5, 1, 0, 1), (11, 1, 1, 1), (4, 0, 0, 0)], [(4, 1, 0, 1), (12, 1, 1, 1), (4, 0, 0, 0)],
                 [(6, 1, 0, 1), (10, 1, 1, 1), (4, 0, 0, 0)]],
             2: [[(4, 1, 0, 0), (1, 1, 0, 1), (11, 1, 1, 1), (4, 0, 0, 0)]] * 2
                + [[(6, 1, 0, 0), (10, 1, 1, 1), (4, 0, 0, 0)]]},
    "2e-3": {1: [[(5, 1, 0, 1), (1, 1, 1, 0), (10, 1, 1, 1), (4, 0, 0, 0)]] * 3,
             2: [[(8, 1, 0, 1), (8, 1, 1, 1), (4, 0, 0, 0)], [(2, 1, 0, 1), (14, 1, 1, 1), (2, 0, 1, 0), (2, 0, 0, 0)],
                 [(16, 1, 1, 1), (3, 0, 1, 0), (1, 0, 0, 0)]]},
}
# Probing PPL per group and seed at epochs 1, 2 (base 10.0 everywhere); lr 2e-3 seed 1 is not restored at epoch 1.
PPL = {"1e-3": {"sft": [[30, 40], [32, 44], [34, 48]], "restored": [[10.1, 10.2], [10.2, 10.3], [10.0, 10.4]]},
       "2e-3": {"sft": [[31, 41], [33, 45], [35, 49]], "restored": [[10.1, 10.2], [10.8, 10.3], [10.2, 10.1]]}}


def _per_question(lr: str, seed: int) -> pd.DataFrame:
    frames = []
    for epoch, by_seed in OUTCOMES[lr].items():
        rows = [row[1:] for row in by_seed[seed] for _ in range(row[0])]
        frames.append(pd.DataFrame({"epoch": epoch, "index": range(len(rows)),
                                    **{f"{state}_correct": [bool(r[i]) for r in rows]
                                       for i, state in enumerate(("base", "sft", "restored"))}}))
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
            metrics = [(f"base/{BENCH}/knowledge", 0.8, 0), ("base/probe/ppl", 10.0, 0)]
            for epoch, rows in frame.groupby("epoch"):
                metrics += [(f"{state}/{BENCH}/knowledge", rows[f"{state}_correct"].mean(), epoch)
                            for state in ("sft", "restored")]
                metrics += [(f"{state}/probe/ppl", PPL[lr][state][seed][epoch - 1], epoch)
                            for state in ("sft", "restored")]
            params = [Param("trial.lr", lr), Param("trial.seed", str(seed)), Param("trial.stage_alpha", "0.05"),
                      Param("trial.ppl_tolerance", "0.05"), Param("trial.benchmarks", f"['{BENCH}']"),
                      Param(f"resolved.benchmarks.{BENCH}.score", "acc")]
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


def test_pooled_table_equals_the_hand_computation(replicated):
    """The pooled rule by hand (exact McNemar on discordant pairs summed over the 3 seeds, B = drops, C = gains,
    p = 2 P[X <= min(B, C)], X ~ Bin(B + C, 1/2)); per seed the single-trial rule; knowledge = correct / 20.
    lr 1e-3, epoch 1: SFT drops 5, 4, 6 (alone p = 2/32, 2/16, 2/64: only seed 2 < 0.05): B = 15, p = 2/2^15; R_e
      drops none: p = 1. Pseudo; 1/3 agree. SFT knowledge 0.55, 0.60, 0.50: mean 0.55, sd 0.05.
    lr 1e-3, epoch 2: SFT drops 5, 5, 6: B = 16, p = 2/2^16; R_e drops 4, 4, 6 (alone 2/16, 2/16, 2/64): B = 14,
      p = 2/2^14, dR = -14/60. Actual; 1/3 agree. SFT 0.55, 0.55, 0.50: mean 1.6/3, sd sqrt(3)/60; R_e 0.6, 0.6,
      0.5: mean 1.7/3, sd sqrt(3)/30. Transition: pooled 2; per seed none, none, 2: median none, range 2-2, 1/3.
    lr 2e-3, epoch 1: B = 15 as above, but seed 1's R_e PPL 10.8 > 10.0 * 1.05: not restored (2/3 restored);
      per seed no, not restored, no: 1/3 agree; R_e drops 1 each: B = 3, p = 2/8.
    lr 2e-3, epoch 2: SFT drops 8, 2, 0 and gains 0, 2, 3: B = 10, C = 5, p = 2 (1 + 15 + 105 + 455 + 1365 + 3003)
      / 2^15 = 9888/32768; dS = -5/60. No forgetting; per seed pseudo (p = 2/2^8), no, no: 2/3 agree. SFT 0.40,
      0.80, 0.95: mean 43/60, sd sqrt(((24-43)^2 + (48-43)^2 + (57-43)^2) / 2)/60 = sqrt(291)/60. No transition."""
    table = replicated["report"].pooled_table
    groups = replicated["groups"]
    expected = [  # group, epoch, stage, agreeing, own stages, restored, p_sft, p_restored, d_sft, d_restored
        (groups["1e-3"], 1, "pseudo_forgetting", "1/3", "no,no,pseudo", "3/3", 2 / 2**15, 1.0, -15 / 60, 0.0),
        (groups["1e-3"], 2, "actual_forgetting", "1/3", "no,no,actual", "3/3", 2 / 2**16, 2 / 2**14, -16 / 60,
         -14 / 60),
        (groups["2e-3"], 1, "not_restored", "1/3", "no,not restored,no", "2/3", 2 / 2**15, 2 / 2**3, -15 / 60,
         -3 / 60),
        (groups["2e-3"], 2, "no_forgetting", "2/3", "pseudo,no,no", "3/3", 9888 / 32768, 1.0, -5 / 60, 0.0),
    ]
    assert len(table) == len(expected)
    for row, (group, epoch, stage, agreeing, own, restored, p_sft, p_restored, d_sft, d_restored) in zip(
            table.to_dict("records"), expected):
        assert (row["group"], row["epoch"], row["stage"], row["agreeing"], row["replicate_stages"], row["restored"],
                row["replicates"], row["seeds"], row["benchmark"]) == \
            (group, epoch, stage, agreeing, own, restored, 3, "0,1,2", BENCH)
        assert (row["p_sft"], row["p_restored"], row["d_sft"], row["d_restored"]) == \
            pytest.approx((p_sft, p_restored, d_sft, d_restored))
        assert row["knowledge_base_mean"] == pytest.approx(0.8) and row["knowledge_base_sd"] == pytest.approx(0.0)
    knowledge = {(r["group"], r["epoch"]): (r["knowledge_sft_mean"], r["knowledge_sft_sd"],
                                            r["knowledge_restored_mean"], r["knowledge_restored_sd"])
                 for r in table.to_dict("records")}
    assert knowledge[(groups["1e-3"], 1)] == pytest.approx((0.55, 0.05, 0.8, 0.0))
    assert knowledge[(groups["1e-3"], 2)] == pytest.approx((1.6 / 3, 3**0.5 / 60, 1.7 / 3, 3**0.5 / 30))
    assert knowledge[(groups["2e-3"], 1)] == pytest.approx((0.55, 0.0, 0.75, 0.0))
    assert knowledge[(groups["2e-3"], 2)] == pytest.approx((43 / 60, 291**0.5 / 60, 0.8, 0.0))
    first = table[table["group"] == groups["1e-3"]].iloc[0]
    assert (first["transition_pooled"], first["transition_low"], first["transition_high"],
            first["transition_reached"]) == (2, 2, 2, "1/3") and pd.isna(first["transition_median"])
    second = table[table["group"] == groups["2e-3"]].iloc[0]
    assert pd.isna(second["transition_pooled"]) and second["transition_reached"] == "0/3"
    assert list(table["lr"]) == ["1e-3", "1e-3", "2e-3", "2e-3"] and "seed" not in table.columns


def test_pooled_table_files_text_and_logging(replicated):
    report, out = replicated["report"], replicated["root"] / "out"
    csv = pd.read_csv(out / "pooled_stage_table.csv")
    assert list(csv["stage"]) == list(report.pooled_table["stage"])
    text = (out / "pooled_stage_table.txt").read_text()
    assert text in report.text and "pooled over replicates" in text
    assert "lr=1e-3 (seeds 0,1,2)" in text and "transition epoch: pooled 2; replicates median none, range 2-2" in text
    line = next(row for row in text.splitlines() if row.strip().startswith("2  actual"))
    assert "1/3" in line and "0.533+-0.029" in line
    assert {"pooled_stage_table.csv", "pooled_stage_table.txt"} <= _report_artifacts(replicated["uri"],
                                                                                      replicated["parent"])


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
    seeds as the band, the base level; 3c's background is the pooled stage."""
    from matplotlib.colors import to_rgba

    from forgetray.report.figures import STAGE_COLORS

    report, groups = replicated["report"], replicated["groups"]
    assert set(report.plots) == {"fig3b_ppl_vs_epoch.png", f"fig3c_accuracy_{BENCH}.png"}
    ppl_series, acc_series, ppl_levels, acc_levels = {}, {}, {}, {}
    for lr, group in groups.items():
        ppl_levels[(group, "base")], acc_levels[(group, "base")] = 10.0, 0.8
        for state in ("sft", "restored"):
            mean, _ = _mean_min_max(PPL[lr][state])
            ppl_series[(group, state)] = ([1, 2], mean)
            knowledge = [[_per_question(lr, s).query(f"epoch == {e}")[f"{state}_correct"].mean() for e in (1, 2)]
                         for s in range(3)]
            acc_series[(group, state)] = ([1, 2], _mean_min_max(knowledge)[0])
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
    # By hand: lr 2e-3 restored PPL at epoch 1 is 10.1, 10.8, 10.2 over seeds: band 10.1-10.8, mean 31.1/3.
    assert _band_of(panels[groups["2e-3"]], "restored band")[1.0] == pytest.approx((10.1, 10.8))
    # SFT knowledge of lr 2e-3 at epoch 2: 0.40, 0.80, 0.95.
    acc_panels = {ax.get_gid(): ax for ax in fig3c.axes if ax.get_visible()}
    assert _band_of(acc_panels[groups["2e-3"]], "sft band")[2.0] == pytest.approx((0.40, 0.95))
    spans = {(ax.get_gid(), p.get_gid()): p.get_facecolor() for ax in fig3c.axes for p in ax.patches if p.get_gid()}
    pooled = {(groups["1e-3"], "stage 1"): "pseudo_forgetting", (groups["1e-3"], "stage 2"): "actual_forgetting",
              (groups["2e-3"], "stage 1"): "not_restored", (groups["2e-3"], "stage 2"): "no_forgetting"}
    assert spans.keys() == pooled.keys()
    for key, stage in pooled.items():
        assert spans[key] == pytest.approx(to_rgba(STAGE_COLORS[stage])), key


def test_a_sweep_without_replicates_has_no_pooled_table(report, store):
    assert report.pooled_table.empty and "pooled over replicates" not in report.text
    assert not (store["root"] / "out" / "pooled_stage_table.csv").exists()
