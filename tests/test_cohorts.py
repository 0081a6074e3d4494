"""A grid point's replicates run in turn in one Ray Train worker group (`sharing.cohorts`, Sweep(share_workers=True)):
each keeps its own MLflow run, checkpoints and metrics, each logged once per step, also when a worker of the second
replicate fails and Ray Train restarts the group; and the numbers are those of the same trials run apart."""


import pytest
from conftest import local_ray

from test_sweep import runs_of, steps



def _sweep(fixture_files, pool, share_workers, seeds=None):
    """The three replicates (seeds 0, 1, 2), or the same trials of `seeds` alone (`seed=grid(seeds)`: the same
    configs, hashes and numbers, forgetray.grids)."""
    from forgetray import Sweep, grid

    copies = {"replicates": 3} if seeds is None else {"seed": grid(seeds)}
    return Sweep("cohort", model=str(fixture_files["model"]), dataset=str(fixture_files["dataset"]), epochs=2,
                 lr=3e-3, batch_size=8, max_length=256, benchmarks=[str(fixture_files["benchmark"])],
                 probe_set=str(fixture_files["probe_set"]), probe_passages=16, probe_batch_size=8,
                 restore_pool=str(pool), restore_lr=1e-3, restore_batch_size=4, restore_seq_len=64,
                 restore_trajectory_points=2, restore_group=0, share_workers=share_workers, **copies)


def _by_seed(uri, metric):
    from mlflow import MlflowClient

    _, trials = runs_of(uri, "cohort")
    client = MlflowClient(uri)
    return {int(t.data.params["trial.seed"]): [m.value for m in sorted(client.get_metric_history(t.info.run_id, metric),
                                                                       key=lambda m: m.step)] for t in trials}


@pytest.mark.slow
def test_replicates_share_one_worker_group(tmp_path, fixture_files, ray_session):
    from fixtures import make_pool_file
    from mlflow import MlflowClient

    from forgetray import run
    from forgetray.train.worker import FAIL_ONCE_ENV

    pool = make_pool_file(tmp_path / "pool.jsonl", n=300)
    marker = tmp_path / "failed-once"
    fail_once = {FAIL_ONCE_ENV: f"{marker}:1:1"}  # the second replicate (seed 1) fails after its epoch-1 checkpoint
    # One CPU: one trial at a time, so the three replicates are one cohort (sharing.cohorts splits only for slots).
    local_ray(fail_once, num_cpus=1)
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    table = run(_sweep(fixture_files, pool, True), tracking_uri=shared, storage=tmp_path / "shared")
    assert marker.exists(), "the injected failure did not happen"
    assert table.attrs["failed_trials"] == 0

    parents, trials = runs_of(shared, "cohort")
    assert len(trials) == 3 and {t.info.status for t in trials} == {"FINISHED"}
    for t in trials:  # every state once per step: the finished first replicate was not run again on the restart
        assert steps(shared, t.info.run_id, "base/bench/acc") == [0]
        assert steps(shared, t.info.run_id, "control/bench/acc") == [0]
        assert steps(shared, t.info.run_id, "train/loss") == [1, 2]
        assert steps(shared, t.info.run_id, "sft/bench/acc") == [1, 2]
        assert steps(shared, t.info.run_id, "restored/bench/acc") == [1, 2]
        assert "stage/code" in t.data.metrics
    # One Ray Train run for the three: its folder holds each replicate's checkpoints; each trial's ift/ links there.
    execution = next((tmp_path / "shared" / "cohort").iterdir())
    runs = list((execution / "cohorts").iterdir())
    assert len(runs) == 1 and len([d for d in runs[0].iterdir() if d.is_dir()]) == 3
    # The first replicate finished before the second one's failure and was not run again on the restart.
    first = next(d for d in runs[0].iterdir() if ".s0-" in d.name)
    assert all(f.stat().st_mtime < marker.stat().st_mtime for f in first.rglob("state.json"))
    # Each run ended when its replicate was done, not when the group was: the first before the third's training.
    by_seed = {int(t.data.params["trial.seed"]): t for t in trials}
    assert by_seed[0].info.end_time < min(m.timestamp for m in MlflowClient(shared).get_metric_history(
        by_seed[2].info.run_id, "train/loss"))
    for trial_dir in (execution / "trials").iterdir():
        ift = trial_dir / "ift"
        assert ift.is_symlink() and ift.resolve().parent == runs[0].resolve()
        assert sorted(d.name for d in ift.iterdir()) == ["epoch_001", "epoch_002", "restored_epoch_001",
                                                         "restored_epoch_002"]

    # The same trials apart (share_workers=False: one worker group each) give the same numbers on this machine: the
    # two that ran after another replicate in the shared workers (seed 1 after seed 0 and the restart, seed 2 after
    # seed 1), where anything a member left behind would show; seed 0 ran first, as a trial alone does. On the same
    # Ray (a restart costs 5-15 s): the injected failure's marker exists, so it does not fire again.
    apart = f"sqlite:///{tmp_path / 'apart.db'}"
    run(_sweep(fixture_files, pool, False, seeds=[1, 2]), tracking_uri=apart, storage=tmp_path / "apart")
    assert not list((tmp_path / "apart").glob("cohort/*/cohorts"))
    for metric in ("train/loss", "sft/bench/acc", "sft/probe/ppl", "control/probe/ppl", "restored/probe/ppl"):
        together, alone = _by_seed(shared, metric), _by_seed(apart, metric)
        assert together.keys() == {0, 1, 2} and alone.keys() == {1, 2}, metric
        assert {seed: together[seed] for seed in (1, 2)} == alone, metric


def test_resume_of_an_execution_from_before_worker_groups_says_how(tmp_path, fixture_files):
    """An execution without the option recorded ran one worker group per trial: --resume must say how to match it
    (before Ray starts), not that the sweep changed."""
    import json

    from fixtures import make_pool_file

    from forgetray import run
    from forgetray.spec import SpecError

    sweep = _sweep(fixture_files, make_pool_file(tmp_path / "pool.jsonl", n=50), True)
    execution = tmp_path / "storage" / "cohort" / "20260101-000000"
    execution.mkdir(parents=True)
    state = {"sweep": {k: v for k, v in sweep.to_dict().items() if k != "share_workers"},
             "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "parent_run_id": "x",
             "trials": [{"config_hash": t.config_hash(), "name": t.short_name()} for t in sweep.trials]}
    (execution / "sweep.json").write_text(json.dumps(state))
    with pytest.raises(SpecError, match="ran with share_workers=False: resume with --set share_workers=false"):
        run(sweep, storage=tmp_path / "storage", resume=True)
