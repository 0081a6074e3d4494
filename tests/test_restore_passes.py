"""restore_max_passes: a restoration that has not brought the probing PPL back to base x (1 + ppl_tolerance) is
restored again (a fresh one-pass restoration of its result), up to the cap; one that has stops after one pass."""

from __future__ import annotations

import pytest
from conftest import local_ray

from forgetray.spec import SpecError, TrialConfig


def test_restore_max_passes_is_validated():
    with pytest.raises(SpecError, match="'restore_max_passes'"):
        TrialConfig(restore_max_passes=0)
    with pytest.raises(SpecError, match="'restore_max_passes'.*zero_stage=3"):
        TrialConfig(restore_max_passes=2, zero_stage=3)


@pytest.mark.slow
def test_restoration_repeats_until_the_pattern_is_back_or_the_cap(tmp_path, use_test_organism, ray_session):
    """Two trials on the test organism (a pre-trained base) whose restoration barely moves the weights (lr 1e-7):
    fine-tuning on arithmetic moves the probing PPL above the base's, and with tolerance 0 it never comes back, so
    the checkpoint takes all 3 passes; with tolerance 1000 the first pass is already within it."""
    import os

    from mlflow.tracking import MlflowClient

    from fixtures import make_pool_file
    from forgetray import Sweep, grid, run

    local_ray({"FORGETRAY_ORGANISM": os.environ["FORGETRAY_ORGANISM"]})
    sweep = Sweep(
        "passes", model="organism-tiny", dataset="organism-math", epochs=1, lr=2e-2,
        batch_size=8, max_length=256, workers=1, zero_stage=0, benchmarks=["organism-facts"],
        probe_set="organism-probe", probe_passages=8, probe_batch_size=8,
        restore_pool=str(make_pool_file(tmp_path / "pool.jsonl", n=300)), restore_lr=1e-7, restore_batch_size=4,
        restore_seq_len=64, restore_trajectory_points=2, restore_group=0, restore_max_passes=3,
        ppl_tolerance=grid([0.0, 1000.0]))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    table = run(sweep, tracking_uri=uri, storage=tmp_path / "storage")
    assert table.attrs["failed_trials"] == 0

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("passes")
    runs = {float(r.data.params["trial.ppl_tolerance"]): r.data.metrics
            for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("forgetray.kind") == "trial"}
    strict, loose = runs[0.0], runs[1000.0]
    one_pass = loose["restored/train/steps"]
    assert loose["restored/train/passes"] == 1 and one_pass > 0
    assert strict["restored/train/passes"] == 3 and strict["restored/train/steps"] == 3 * one_pass
    assert strict["restored/train/tokens"] == 3 * loose["restored/train/tokens"]
    assert strict["sft/probe/ppl"] > strict["base/probe/ppl"]  # the premise: IFT moved the pattern
    assert strict["restored/probe/ppl"] > strict["base/probe/ppl"]

    (strict_id,) = [r.info.run_id for r in client.search_runs([exp.experiment_id])
                    if r.data.params.get("trial.ppl_tolerance") == "0.0"]
    trajectory = {m.step: m.value for m in client.get_metric_history(strict_id, "restore/probe_ppl/epoch_001")}
    # the ends of passes 1 and 2 are on the trajectory (above base, so a pass followed), the last step is R_1
    assert {one_pass, 2 * one_pass, 3 * one_pass} <= set(trajectory)
    assert all(trajectory[s] > strict["base/probe/ppl"] for s in (one_pass, 2 * one_pass))
    assert trajectory[3 * one_pass] == strict["restored/probe/ppl"]

    # The control R_0 (the untouched start through the same recipe) is in each run at step 0, with its probes. At lr
    # 1e-7 it stays the base: its knowledge is the base's, its probing PPL within a hair of the base's. The strict
    # trial's R_1 stayed above the base's PPL, so it is not within 0% of R_0's: "not restored" (-1); the loose one is.
    for metrics in (strict, loose):
        assert metrics["control/organism-facts/knowledge"] == metrics["base/organism-facts/knowledge"]
        assert metrics["control/probe/ppl"] == pytest.approx(metrics["base/probe/ppl"], rel=1e-3)
        assert metrics["control/train/passes"] >= 1
    assert strict["restored/probe/ppl"] > strict["control/probe/ppl"] and strict["stage/code"] == -1
    assert loose["stage/code"] != -1
    assert loose["stage/residual_low"] <= loose["stage/residual"] <= loose["stage/residual_high"]
    artifacts = {a.path for a in client.list_artifacts(strict_id, "probes/control")}
    assert "probes/control/organism-facts.parquet" in artifacts
