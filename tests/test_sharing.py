"""Training shared across trials (forgetray.sharing): the pure grouping and epoch counts on hand-built trials; the
real sweep that checks a shared shorter grid point against an unshared run of it is at the end."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import local_ray

from forgetray import sharing
from forgetray.spec import TrialConfig

STEP = dict(lr_schedule="step", warmup_ratio=0.0)
PRIOR = [{"dataset": "organism-alpaca", "epochs": 3}]


def trials(*configs: dict) -> list[TrialConfig]:
    return [TrialConfig(**c) for c in configs]


def test_prefix_shareable_only_without_the_total():
    assert sharing.prefix_shareable(TrialConfig(**STEP)) == (True, "")
    assert sharing.prefix_shareable(TrialConfig(lr_schedule="constant", warmup_ratio=0.0))[0]
    ok, why = sharing.prefix_shareable(TrialConfig(lr_schedule="cosine", warmup_ratio=0.0))
    assert not ok and why == "lr_schedule 'cosine' depends on the total steps"
    ok, why = sharing.prefix_shareable(TrialConfig(lr_schedule="constant", warmup_ratio=0.03))
    assert not ok and "warm-up" in why


def test_cohorts_are_a_grid_points_replicates_split_for_idle_slots():
    from forgetray import Sweep, grid

    sweep = Sweep("c", model=grid(["organism-tiny", "organism-small"]), lr=grid([1e-3, 2e-3]), replicates=3)
    ts = list(sweep.trials)  # grid points in order, each one's seeds 0, 1, 2 next to each other
    leaders = list(range(len(ts)))
    assert sharing.cohorts(ts, leaders, slots=2) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert sharing.cohorts(ts, leaders, slots=4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    # 6 slots: the two largest cohorts are halved (2 + 1); no slot idles that 12 separate trials would fill
    assert sharing.cohorts(ts, leaders, slots=6) == [[0, 1], [2], [3, 4], [5], [6, 7, 8], [9, 10, 11]]
    assert len(sharing.cohorts(ts, leaders, slots=12)) == 12
    assert sharing.cohorts(ts, leaders, slots=50) == [[i] for i in leaders]  # never split below one trial
    assert sharing.cohorts(ts, leaders, slots=1, share=False) == [[i] for i in leaders]
    # only the leaders given (trajectory followers ride with their leader), in their order
    assert sharing.cohorts(ts, [0, 2, 3, 5], slots=1) == [[0, 2], [3, 5]]
    # trials that differ in anything but the seed never share (here: epochs)
    assert sharing.cohorts(trials({"seed": 0}, {"seed": 1}, {"seed": 0, "epochs": 2}), [0, 1, 2], 1) == [[0, 1], [2]]


def test_trajectories_group_what_differs_only_in_epochs():
    ts = trials({**STEP, "epochs": 1}, {**STEP, "epochs": 3}, {**STEP, "epochs": 2},
                {**STEP, "epochs": 2, "lr": 5e-3},  # another lr: its own trajectory
                {"epochs": 1}, {"epochs": 2})  # cosine: never shared
    assert sharing.trajectories(ts) == [[1, 2, 0], [3], [4], [5]]
    assert sharing.trajectories(ts, share=False) == [[i] for i in range(6)]
    assert sharing.unshared_reasons(ts) == ["epochs grid not shared: lr_schedule 'cosine' depends on the total steps"]


def test_training_epochs_by_hand():
    # 2 seeds x epochs {1, 2} with one 3-epoch prior phase and restoration; plus a cosine pair, no prior
    shared = [{**STEP, "seed": s, "epochs": e, "prior_phases": PRIOR, "restore_pool": "organism-pool"}
              for s in (0, 1) for e in (1, 2)]
    ts = trials(*shared, {"epochs": 1}, {"epochs": 2})
    n = sharing.training_epochs(ts)
    assert n["prior"] == (4 * 3, 2 * 3)  # once per seed: two starts
    assert n["ift"] == (1 + 2 + 1 + 2 + 1 + 2, 2 + 2 + 1 + 2)  # one trajectory per seed; cosine: both
    assert n["restore"] == (6, 4)  # a restoration per checkpoint: the leaders' 2 + 2
    assert (n["without"], n["with"]) == (12 + 9 + 6, 6 + 7 + 4)
    off = sharing.training_epochs(ts, share_trajectories=False)
    assert off["ift"] == (9, 9) and off["prior"] == (12, 6)


def test_start_identity_is_what_shapes_the_start():
    base = TrialConfig(**STEP, prior_phases=PRIOR)
    same = [dataclasses.replace(base, epochs=5), dataclasses.replace(base, sam_rho=0.05),
            dataclasses.replace(base, wiseft_alpha=0.5), dataclasses.replace(base, rehearsal_ratio=0.1),
            dataclasses.replace(base, dataset="organism-math")]  # the IFT phase's own settings
    assert {sharing.start_identity(t) for t in same} == {sharing.start_identity(base)}
    other = [dataclasses.replace(base, seed=1), dataclasses.replace(base, lr=5e-3),  # the prior's lr is the trial's
             dataclasses.replace(base, zero_stage=2), dataclasses.replace(base, model="organism-tiny"),
             dataclasses.replace(base, prior_phases=[{**PRIOR[0], "epochs": 2}])]
    assert len({sharing.start_identity(t) for t in [base, *other]}) == 6
    pinned = [{**PRIOR[0], "lr": 1e-3}]  # an explicit prior lr: the IFT lr no longer shapes the start
    assert sharing.start_identity(dataclasses.replace(base, prior_phases=pinned)) == \
        sharing.start_identity(dataclasses.replace(base, prior_phases=pinned, lr=5e-3))


def test_describe_lines():
    ts = trials(*({**STEP, "epochs": e, "prior_phases": PRIOR} for e in (1, 2)))
    assert sharing.describe(ts) == ["training epochs: 9 without sharing, 5 with (prior phases trained once per start: "
                                    "6 -> 3; epoch prefixes: 3 -> 2)"]
    assert sharing.describe(ts, share_trajectories=False)[1] == "epochs grid not shared: share_trajectories=False"


def test_follower_metrics_by_step_meaning():
    history = {
        "base/b/knowledge": {0: 0.5}, "sft/b/knowledge": {1: 0.6, 2: 0.7}, "train/loss": {1: 2.0, 2: 1.5},
        "steps/b/p_fmt": {0: 0.1, 2: 0.2, 5: 0.3, 10: 0.4},  # inside epoch 1, then epoch ends 5 and 10
        "prior/1/train/loss": {1: 3.0}, "continual/b/knowledge": {0: 0.4, 1: 0.5, 2: 0.7},
        "continual/b/forgetting": {2: 0.0}, "continual/bwt": {2: 0.1}, "stage/code": {1: 0, 2: 1},
        "restore/probe_ppl/epoch_001": {0: 9.0, 3: 8.0}, "restore/probe_ppl/epoch_002": {0: 7.0},
        "restored/probe/ppl": {1: 8.0, 2: 7.5}, "system/cpu_utilization_percentage": {0: 50.0},
    }
    got = sharing.follower_metrics(history, epochs=1, leader_epochs=2, prior_phases=1)
    assert got == {
        0: {"base/b/knowledge": 0.5, "steps/b/p_fmt": 0.1, "continual/b/knowledge": 0.4,
            "restore/probe_ppl/epoch_001": 9.0},
        1: {"sft/b/knowledge": 0.6, "train/loss": 2.0, "prior/1/train/loss": 3.0, "continual/b/knowledge": 0.5,
            "restored/probe/ppl": 8.0},
        2: {"steps/b/p_fmt": 0.2}, 3: {"restore/probe_ppl/epoch_001": 8.0}, 5: {"steps/b/p_fmt": 0.3},
    }
    assert sharing.follower_artifact("probes/base", 1) and sharing.follower_artifact("probes/sft/epoch_001", 1)
    assert not sharing.follower_artifact("probes/restored/epoch_002", 1)
    assert not sharing.follower_artifact("stages", 1)


# --- a real sweep (local Ray, Ray Train + DeepSpeed ZeRO-0 on one CPU worker, sqlite MLflow) ---------------------

WALL_CLOCK = ("train/tokens_per_s", "train/epoch_seconds")


@pytest.mark.slow
def test_shared_training_gives_an_unshared_runs_metrics(tmp_path, fixture_files, ray_session):
    """epochs {1, 2} under the step schedule (restorations in the IFT's workers) is one trajectory: the 2-epoch point
    is trained, the 1-epoch point follows it. A second sweep runs the 1-epoch point alone, unshared: its run must
    have exactly the follower's metrics (CPU, same seed), and the follower its own params, tags and recomputed
    stages / continual values. (A prior phase trained once for several trials: tests/test_methods_sweep.py.)"""

    from mlflow.tracking import MlflowClient

    from fixtures import make_pool_file
    from forgetray import Sweep, grid, run

    local_ray()
    pool = str(make_pool_file(tmp_path / "pool.jsonl", n=300))
    settings = dict(
        model=str(fixture_files["model"]), dataset=str(fixture_files["dataset"]), lr=2e-2, batch_size=8,
        max_length=256, workers=1, zero_stage=0, lr_schedule="step", lr_decay=0.5, warmup_ratio=0.0,
        benchmarks=[str(fixture_files["benchmark"])], primary_score={str(fixture_files["benchmark"]): "acc"},
        probe_set=str(fixture_files["probe_set"]), probe_passages=4, probe_batch_size=8, early_checkpoints=1,
        restore_lr=1e-3, restore_batch_size=4, restore_seq_len=64, restore_trajectory_points=2, restore_group=0)
    shared = Sweep("shared", epochs=grid([1, 2]), restore_pool=pool, **settings)
    plain = Sweep("plain", epochs=1, restore_pool=pool, share_trajectories=False, **settings)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "storage"
    table = run(shared, tracking_uri=uri, storage=storage)
    assert table.attrs["failed_trials"] == 0 and len(table) == 1 + 2  # a row per (trial, checkpoint)
    run(plain, tracking_uri=uri, storage=storage)
    (execution,) = (storage / "shared").iterdir()
    assert len(list((execution / "trials").iterdir())) == 2
    assert len(list((execution / "trials").glob("*/ift"))) == 1, "the 1-epoch point was trained"

    client = MlflowClient(uri)

    def trial_runs(name):
        exp = client.get_experiment_by_name(name)
        return {(r.data.params["trial.epochs"], r.data.params["trial.restore_pool"]): r
                for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("forgetray.kind") == "trial"}

    def metrics(r):
        names = [n for n in r.data.metrics if n not in WALL_CLOCK and not n.startswith("system/")]
        return {n: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, n)) for n in names}

    runs, (reference,) = trial_runs("shared"), trial_runs("plain").values()
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs.values())
    follower, leader = runs[("1", pool)], runs[("2", pool)]
    # (b) the follower's run: its own params, the trajectory it shares, exactly the unshared run's metrics
    assert follower.data.tags["forgetray.trajectory"] == leader.info.run_id == leader.data.tags["forgetray.trajectory"]
    assert "forgetray.trajectory" not in reference.data.tags
    assert follower.data.params["phase.ift.epochs"] == "1" and follower.data.params["trial.epochs"] == "1"
    mine, theirs = metrics(follower), metrics(reference)
    assert mine == theirs
    assert mine["continual/bench/knowledge"][-1] == (1, mine["sft/bench/knowledge"][0][1])  # a[T] = SFT_1
    assert [s for s, _ in mine["stage/code"]] == [1] and [s for s, _ in metrics(leader)["stage/code"]] == [1, 2]
    tags = {k: v for k, v in follower.data.tags.items() if k.startswith("forgetray.stage")}
    assert tags == {k: v for k, v in reference.data.tags.items() if k.startswith("forgetray.stage")}
    arts = {f.path for f in client.list_artifacts(follower.info.run_id, "probes/sft")}
    assert arts == {"probes/sft/epoch_001"}
