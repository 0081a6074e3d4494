"""Continual-learning metrics (docs/methods.md §9): the pure functions on matrices worked out by hand, the trial driver's
summaries read back from a real (sqlite) MLflow run, a re-reported step not logged twice, and the report's table."""

from __future__ import annotations

import json

import math

import pytest

from forgetray.metrics.continual import backward_transfer, forgetting, forgetting_by_benchmark

# Steps t = 0 (base), 1 (prior phase on x's data), 2 = T (IFT phase on y's data).
MATRIX = [{"x": 0.50, "y": 0.40}, {"x": 0.80, "y": 0.30}, {"x": 0.60, "y": 0.45}]


def test_forgetting_is_the_drop_from_the_best_earlier_value():
    # x: best before T is 0.80 (after the prior phase), final 0.60 -> 0.20.
    assert forgetting(MATRIX, "x") == pytest.approx(0.20)
    # y: never above its final value (0.40, 0.30 < 0.45): signed, as Avalanche and TRACE -> 0.40 - 0.45 = -0.05.
    assert forgetting(MATRIX, "y") == pytest.approx(-0.05)
    assert forgetting_by_benchmark(MATRIX) == {"x": pytest.approx(0.20), "y": pytest.approx(-0.05)}


def test_backward_transfer_skips_steps_without_an_own_benchmark():
    # Only step 1 (own x) counts: a[2][x] - a[1][x] = 0.60 - 0.80. Step 0 has none; the IFT step (T) is not i < T.
    assert backward_transfer(MATRIX, [None, "x", "y"]) == pytest.approx(-0.20)
    # Two prior phases, the first on unrelated data (no own benchmark), the second on y's; T = 3.
    matrix = [{"x": 0.2, "y": 0.1}, {"x": 0.3, "y": 0.1}, {"x": 0.4, "y": 0.7}, {"x": 0.9, "y": 0.5}]
    assert backward_transfer(matrix, [None, None, "y", "x"]) == pytest.approx(0.5 - 0.7)
    # Both prior phases with their own benchmark: mean of (0.9 - 0.3) and (0.5 - 0.7).
    assert backward_transfer(matrix, [None, "x", "y", None]) == pytest.approx((0.6 - 0.2) / 2)
    assert math.isnan(backward_transfer(matrix, [None, None, None, "x"]))  # no step contributes
    with pytest.raises(ValueError, match="4 steps"):
        backward_transfer(matrix, [None, "x"])


def test_one_fine_tuning_step():
    # T = 1 (no prior phases): forgetting = base - last; BWT undefined (step 0 trains on nothing: TRACE's 1/(T-1)).
    matrix = [{"x": 0.7}, {"x": 0.4}]
    assert forgetting(matrix, "x") == pytest.approx(0.3)
    assert math.isnan(backward_transfer(matrix, [None, "x"]))


def test_missing_values_are_left_out():
    matrix = [{"x": 0.9}, {"x": math.nan, "y": 0.2}, {"x": 0.5}]  # a[1][x] not measured; y has no final value
    assert forgetting(matrix, "x") == pytest.approx(0.4)
    assert math.isnan(forgetting(matrix, "y"))
    assert math.isnan(forgetting([{"x": 0.5}], "x"))  # no step before T
    assert math.isnan(backward_transfer(matrix, [None, "y", None]))


def test_unmeasured_as_none_or_absent_and_empty_matrices():
    # None (a probe that logged nothing) is left out like nan; a benchmark measured only at T has no forgetting
    matrix = [{"x": 0.9, "y": None}, {"x": None, "y": 0.6}, {"x": 0.5, "y": 0.7, "z": 0.3}]
    assert forgetting(matrix, "x") == pytest.approx(0.4)
    assert forgetting(matrix, "y") == pytest.approx(-0.1)
    assert math.isnan(forgetting(matrix, "z"))
    assert list(forgetting_by_benchmark(matrix)) == ["x", "y", "z"]
    assert math.isnan(backward_transfer(matrix, [None, "x", None]))  # a[1][x] not measured: nothing to compare
    assert backward_transfer(matrix, [None, "y", None]) == pytest.approx(0.1)
    assert math.isnan(backward_transfer([], []))  # no steps at all: no BWT, not an error


# --- the trial driver: summaries from what the run logged --------------------------------------------------------

@pytest.fixture
def tracker(tmp_path):
    from forgetray.tracking import Tracker

    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "artifacts")


def _history(tracker, run_id: str, name: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracker.client.get_metric_history(run_id, name))


def test_trial_driver_completes_the_matrix_and_logs_the_summaries(tracker):
    from forgetray.plan import plan
    from forgetray.spec import TrialConfig
    from forgetray.trial import log_continual

    trial = TrialConfig(benchmarks=["x.jsonl", "y"], epochs=2, own_benchmark="y",
                        prior_phases=[{"dataset": "d.jsonl", "epochs": 1, "own_benchmark": "x.jsonl"}])
    resolved = {"benchmarks": {"x": {}, "y": {}}}  # metric keys in the order of trial.benchmarks
    run_id = tracker.start_trial_run("cl", tracker.start_sweep_run("cl", "e", {}), "t", "h", {})
    # What the workers logged: a[0], a[1] (the probes around the prior phase), the IFT start and two checkpoints.
    for t, row in enumerate(MATRIX[:2]):
        tracker.log_metrics(run_id, {f"continual/{b}/knowledge": v for b, v in row.items()}, step=t)
    tracker.log_metrics(run_id, {"base/x/knowledge": 0.80, "base/y/knowledge": 0.30}, step=0)
    tracker.log_metrics(run_id, {"sft/x/knowledge": 0.1, "sft/y/knowledge": 0.1}, step=1)
    tracker.log_metrics(run_id, {"sft/x/knowledge": 0.60, "sft/y/knowledge": 0.45}, step=2)

    logged = log_continual(tracker, run_id, trial, resolved, plan(trial))
    assert _history(tracker, run_id, "continual/x/knowledge") == [(0, 0.5), (1, 0.8), (2, 0.6)]
    assert _history(tracker, run_id, "continual/y/knowledge") == [(0, 0.4), (1, 0.3), (2, 0.45)]
    assert _history(tracker, run_id, "continual/x/forgetting") == [(2, pytest.approx(0.20))]
    assert _history(tracker, run_id, "continual/y/forgetting") == [(2, pytest.approx(-0.05))]
    assert _history(tracker, run_id, "continual/bwt") == [(2, pytest.approx(-0.20))]  # step 1's own x
    assert set(logged) == {"continual/x/knowledge", "continual/y/knowledge", "continual/x/forgetting",
                           "continual/y/forgetting", "continual/bwt"}
    # A re-run of the trial (resume) logs nothing twice.
    assert log_continual(tracker, run_id, trial, resolved, plan(trial)) == {}
    assert len(_history(tracker, run_id, "continual/bwt")) == 1
    assert len(_history(tracker, run_id, "continual/x/knowledge")) == 3


def test_trial_without_prior_phases_gets_its_forgetting_from_base_and_last_checkpoint(tracker):
    from forgetray.plan import plan
    from forgetray.spec import TrialConfig
    from forgetray.trial import log_continual

    trial = TrialConfig(benchmarks=["x"], epochs=3, own_benchmark="x")
    run_id = tracker.start_trial_run("cl", tracker.start_sweep_run("cl", "e", {}), "t", "h", {})
    tracker.log_metrics(run_id, {"base/x/knowledge": 0.7}, step=0)
    for epoch, value in ((1, 0.9), (2, 0.2), (3, 0.4)):
        tracker.log_metrics(run_id, {"sft/x/knowledge": value}, step=epoch)
    log_continual(tracker, run_id, trial, {"benchmarks": {"x": {}}}, plan(trial))
    assert _history(tracker, run_id, "continual/x/knowledge") == [(0, 0.7), (1, 0.4)]  # a[T] = the last checkpoint
    assert _history(tracker, run_id, "continual/x/forgetting") == [(1, pytest.approx(0.3))]
    assert _history(tracker, run_id, "continual/bwt") == []  # T = 1: undefined, not logged


def test_a_re_reported_continual_probe_is_logged_once(tracker):
    """A restarted worker reports the saved probes again (worker.report_saved_probes): the MLflow callback logs
    each at its fine-tuning step once, whether the earlier report reached it or not."""
    from forgetray.callbacks import make_report_logger

    run_id = tracker.start_trial_run("cl", tracker.start_sweep_run("cl", "e", {}), "t", "h", {})
    report = {"kind": "continual", "epoch": 0, "ft_step": 1, "continual/x/knowledge": 0.25}
    make_report_logger(tracker.uri, {0: (run_id, {})}).after_report(None, [report], None)
    fresh = make_report_logger(tracker.uri, {0: (run_id, {})})  # a new fit (re-attached run) and the same one again
    for logger in (fresh, fresh):
        logger.after_report(None, [{**report, "continual/x/knowledge": 0.99}], None)
        logger.after_report(None, [{"kind": "continual", "epoch": 0, "ft_step": 0, "continual/x/knowledge": 0.5}],
                            None)
    assert _history(tracker, run_id, "continual/x/knowledge") == [(0, 0.5), (1, 0.25)]


def test_a_report_reaches_mlflow_in_one_write_or_not_at_all(tracker, monkeypatch):
    """A driver killed while logging a report must not leave part of it in MLflow (a checkpoint with its loss but
    not its step metrics was seen after a driver kill and resume). The report (epoch metrics, a step metric and two earlier trajectory points, at four
    different steps) goes out in one log_batch; a store that fails after its first write then loses nothing of it."""
    from mlflow.tracking import MlflowClient

    from forgetray.callbacks import make_report_logger
    from forgetray.metrics import registry

    run_id = tracker.start_trial_run("cl", tracker.start_sweep_run("cl", "e", {}), "t", "h", {})
    real, writes = MlflowClient.log_batch, []

    class Killed(Exception):
        pass

    def first_write_only(self, *args, **kwargs):
        writes.append(kwargs.get("metrics"))
        if len(writes) > 1:
            raise Killed("the driver is killed here")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", first_write_only)
    report = {"kind": "ift", "epoch": 2, "global_step": 10, "train/loss": 1.5, "steps/b/p_fmt": 0.25,
              registry.SERIES: [{"global_step": 3, "steps/b/p_fmt": 0.5}, {"global_step": 6, "steps/b/p_fmt": 0.4}]}
    make_report_logger(tracker.uri, {0: (run_id, {})}).after_report(None, [report], None)
    monkeypatch.setattr(MlflowClient, "log_batch", real)
    assert _history(tracker, run_id, "train/loss") == [(2, 1.5)]
    assert _history(tracker, run_id, "steps/b/p_fmt") == [(3, 0.5), (6, 0.4), (10, 0.25)]
    assert len(writes) == 1


def test_a_resumed_checkpoint_whose_report_never_reached_mlflow_is_logged_on_restart(tracker, tmp_path):
    """Ray Train records a checkpoint (the next resume point) before its callbacks log the report: a driver killed
    in between left epoch 2's metrics out of MLflow for good (the driver-kill test saw `[1]` for `[1, 2]`). The
    restarted run reports its resume point again (`report_resumed`, with the checkpoint's saved report): the
    missing epoch and its probes are logged, the epochs MLflow has are not logged twice."""
    import pandas as pd
    import ray.train

    from forgetray.callbacks import make_report_logger
    from forgetray.train.checkpoints import STATE_FILE, checkpoint_state, report_resumed

    run_id = tracker.start_trial_run("cl", tracker.start_sweep_run("cl", "e", {}), "t", "h", {})
    epoch = {1: {"kind": "epoch", "epoch": 1, "global_step": 5, "train/loss": 2.0},
             2: {"kind": "epoch", "epoch": 2, "global_step": 10, "train/loss": 1.5}}
    artifacts = {0: (run_id, {"epoch": (None, "probes/sft/epoch_{epoch:03d}")})}
    make_report_logger(tracker.uri, artifacts).after_report(None, [epoch[1]], None)  # epoch 1 reached MLflow
    checkpoint = tmp_path / "epoch_2"  # epoch 2's checkpoint, as report_checkpoint leaves it; its report was lost
    (checkpoint / "probes").mkdir(parents=True)
    pd.DataFrame({"question": [0, 1], "correct": [1, 0]}).to_parquet(checkpoint / "probes" / "bench.parquet")
    (checkpoint / STATE_FILE).write_text(json.dumps({"epoch": 2, "member": 0, "metrics": epoch[2]}))

    class Context:  # the restarted rank's context: its report goes to the controller's callbacks
        member, reports = 0, []

        def report(self, metrics, checkpoint=None, name=None):
            self.reports.append(({**metrics, "member": self.member}, checkpoint))

    ctx = Context()
    resume = ray.train.Checkpoint(str(checkpoint))
    report_resumed(ctx, resume, checkpoint_state(resume)["metrics"])
    assert [c for _, c in ctx.reports] == [None]  # no new checkpoint: Ray Train would record a second one
    logger = make_report_logger(tracker.uri, artifacts)  # the restarted run's controller
    logger.after_report(None, [ctx.reports[0][0]], None)
    logger.after_report(None, [{**epoch[1], "train/loss": 9.0}], None)  # a report MLflow has: not again
    assert _history(tracker, run_id, "train/loss") == [(1, 2.0), (2, 1.5)]
    logged = tracker.client.list_artifacts(run_id, "probes/sft/epoch_002")
    assert "probes/sft/epoch_002/bench.parquet" in [a.path for a in logged]


# --- the report ----------------------------------------------------------------------------------------------------

def test_continual_table_has_the_matrix_forgetting_and_bwt():
    from forgetray.report.continual import continual_table, continual_text
    from forgetray.report.runs import TrialData

    def trial(name, settings, history):
        return TrialData(name=name, run_id=name, status="FINISHED", settings=settings, benchmarks=["x", "y"],
                         scores={}, history=history, tags={})

    with_prior = trial("a", {"prior_phases": "[{'dataset': 'd', 'epochs': 1, 'own_benchmark': 'x'}]",
                             "own_benchmark": "y", "lr": "0.1"},
                       {f"continual/{b}/knowledge": {t: row[b] for t, row in enumerate(MATRIX)} for b in "xy"}
                       | {"continual/x/forgetting": {2: 0.2}})  # y's forgetting and BWT not logged: computed
    plain = trial("b", {"prior_phases": "[]", "own_benchmark": "", "lr": "0.2"},
                  {"continual/x/knowledge": {0: 0.7, 1: 0.4}, "continual/y/knowledge": {0: 0.5, 1: 0.5}})
    assert continual_table([plain], ["lr"]).empty  # no trial with prior phases: no table
    table = continual_table([with_prior, plain], ["lr"])
    assert list(table.columns) == ["trial", "lr", "row", "step", "phase", "step_own_benchmark", "x", "y", "bwt"]
    a = table[(table.trial == "a") & (table.row == "a")]
    assert list(a.step) == [0, 1, 2] and list(a.phase) == ["before fine-tuning", "prior_1", "ift"]
    assert list(a.step_own_benchmark) == ["", "x", "y"] and list(a.x) == [0.5, 0.8, 0.6]
    summary = table[(table.trial == "a") & (table.row == "forgetting")].iloc[0]
    assert (summary.step, summary.x, summary.y, summary.bwt) == (2, 0.2, pytest.approx(-0.05), pytest.approx(-0.2))
    plain_summary = table[(table.trial == "b") & (table.row == "forgetting")].iloc[0]
    assert plain_summary.x == pytest.approx(0.3) and plain_summary.y == 0 and math.isnan(plain_summary.bwt)
    text = continual_text(table, ["lr"])
    assert "a (lr=0.1):" in text and "forgetting" in text and "-0.200" in text and "prior_1" in text
    # the own_benchmark setting may itself vary across trials: a column of its own beside each step's
    varied = continual_table([with_prior, plain], ["lr", "own_benchmark"])
    assert list(varied[varied.trial == "a"].own_benchmark) == ["y"] * 4
    assert list(varied[(varied.trial == "a") & (varied.row == "a")].step_own_benchmark) == ["", "x", "y"]
    assert "a (lr=0.1, own_benchmark=y):" in continual_text(varied, ["lr", "own_benchmark"])
