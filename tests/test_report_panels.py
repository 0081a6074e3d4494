"""Panel figures past `panel_data.MAX_PANELS` panels (issue 19: a 216-trial Figure 3a was 54 rows of panels and most
of the report's time): the first MAX_PANELS panels are drawn, the title says so, and every panel's data goes to
`<figure>.csv`, checked here against what the trials logged (read back with MlflowClient, as test_report does) and
against the pooled table. MAX_PANELS is lowered to 1 so that test_report.py's small stores cross it."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from test_report import BENCH, EXPERIMENT, REPLICATED, TRIALS, _fill_replicated, _fill_store, _logged

from forgetray.report import build_report, panel_data


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("panels-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    parent = _fill_store(uri, root / "artifacts")
    replicated = _fill_replicated(uri, root / "artifacts-replicated", root / "tmp")
    return {"uri": uri, "parent": parent, "replicated": replicated["parent"], "root": root}


@pytest.fixture
def one_panel(monkeypatch):
    monkeypatch.setattr(panel_data, "MAX_PANELS", 1)


def _series(data: pd.DataFrame, panel: str, series: str) -> tuple[list, list]:
    rows = data[(data["panel"] == panel) & (data["series"] == series)]
    return rows["x"].tolist(), rows["y"].tolist()


def test_capped_fig3a_draws_one_panel_and_writes_every_trajectory(store, one_panel, tmp_path):
    report = build_report(EXPERIMENT, store["uri"], tmp_path, log_to_mlflow=False)
    figure = report.plots["fig3a_restoring_ppl.png"]
    assert [ax.get_gid() for ax in figure.axes if ax.get_gid()] == ["alpha"]  # gamma restored nothing: no panel
    assert "[first 1 of 2 panels" in figure.get_suptitle()
    data = pd.read_csv(tmp_path / "fig3a_restoring_ppl.csv")
    logged = _logged(store["uri"], report.parent_run_id)
    expected = {(trial, f"epoch {int(name.rsplit('_', 1)[1])}"): points for trial, history in logged.items()
                for name, points in history.items() if name.startswith("restore/")}
    assert {(p, s) for p, s in zip(data["panel"], data["series"]) if s.startswith("epoch")} == set(expected)
    for (trial, series), (steps, values) in expected.items():
        xs, ys = _series(data, trial, series)
        assert xs == steps and ys == pytest.approx(values), (trial, series)
    for trial in ("alpha", "beta"):  # the base level, a row without x
        xs, ys = _series(data, trial, "base")
        assert math.isnan(xs[0]) and ys == pytest.approx([logged[trial]["base/probe/ppl"][1][0]])
    assert _series(data, "alpha", "control")[1] == pytest.approx([TRIALS["alpha"]["control"]["ppl"]])


def test_capped_fig3c_keeps_every_stage_and_the_legend_only_the_drawn(store, one_panel, tmp_path):
    report = build_report(EXPERIMENT, store["uri"], tmp_path, log_to_mlflow=False)
    data = pd.read_csv(tmp_path / f"fig3c_accuracy_{BENCH}.csv")
    assert set(data["panel"]) == {"alpha", "beta", "gamma"}
    stages = data[data["series"].str.startswith("stage")]
    assert dict(zip(stages.loc[stages["panel"] == "alpha", "x"], stages.loc[stages["panel"] == "alpha", "stage"])) \
        == dict(enumerate(TRIALS["alpha"]["margin"]["stage"], start=1))
    # Figures 4 and 5 draw every trial's line but name none past the cap.
    for name in ("fig4_format_entropy.png", "fig5_em.png"):
        labels = [t.get_text() for legend in report.plots[name].legends for t in legend.get_texts()]
        assert not any(label.startswith(("alpha", "beta")) for label in labels), name
        assert "too many to name" in report.plots[name].get_suptitle()


def test_capped_band_figures_write_each_group_mean_and_range(store, one_panel, tmp_path):
    report = build_report(REPLICATED, store["uri"], tmp_path, log_to_mlflow=False)
    groups = list(dict.fromkeys(report.pooled_table["group"]))
    assert len(groups) == 2
    figure = report.plots["fig3b_ppl_vs_epoch.png"]
    assert [ax.get_gid() for ax in figure.axes if ax.get_gid()] == groups[:1]
    data = pd.read_csv(tmp_path / f"fig3c_accuracy_{BENCH}.csv")
    table = report.pooled_table
    for group in groups:
        stages = data[(data["panel"] == group) & data["series"].str.startswith("stage")]
        rows = table[table["group"] == group]
        assert dict(zip(stages["x"], stages["stage"])) == dict(zip(rows["epoch"], rows["stage"]))
        mean = data[(data["panel"] == group) & (data["series"] == "sft")]
        spread = data[(data["panel"] == group) & (data["series"] == "sft band")]
        assert mean["x"].tolist() == spread["x"].tolist() == rows["epoch"].tolist()
        # The mean of the seeds' SFT_e knowledge, within the min-max band; the pooled table's mean is the same.
        assert mean["y"].tolist() == pytest.approx(rows["knowledge_sft_mean"].tolist())
        assert (spread["y_min"].to_numpy() <= mean["y"].to_numpy() + 1e-12).all()  # a mean rounds past equal seeds
        assert (mean["y"].to_numpy() <= spread["y_max"].to_numpy() + 1e-12).all()


def test_uncapped_report_writes_no_data_and_removes_stale_data(store, tmp_path):
    stale = tmp_path / "fig3a_restoring_ppl.csv"
    stale.write_text("from an earlier, bigger report\n")
    report = build_report(EXPERIMENT, store["uri"], tmp_path, log_to_mlflow=False)
    assert not list(tmp_path.glob("fig*.csv"))
    assert "first" not in report.plots["fig3a_restoring_ppl.png"].get_suptitle()
    labels = [t.get_text() for legend in report.plots["fig5_em.png"].legends for t in legend.get_texts()]
    assert any(label.startswith("alpha") for label in labels)
