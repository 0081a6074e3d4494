"""The plan of a trial's phases (forgetray.plan), without Ray: what each phase trains on and with which optimizer,
and the cache keys and exclusions the phases rely on (two bugs found in review)."""

from __future__ import annotations

import json

import pytest

from forgetray.plan import Phase, checkpoint_name, fine_tuning_steps, groups, plan
from forgetray.spec import SpecError, TrialConfig

TRIAL = dict(lr=5e-3, batch_size=16, weight_decay=0.01, warmup_ratio=0.1, lr_schedule="constant", epochs=3,
             max_length=128)


def test_restoration_has_its_own_optimizer_not_the_ift_one():
    trial = TrialConfig(**TRIAL, restore_pool="pool.jsonl", restore_lr=1e-3, restore_batch_size=4,
                        restore_seq_len=64, restore_weight_decay=0.0, restore_warmup_ratio=0.0,
                        restore_lr_schedule="cosine", workers=2)
    phases = plan(trial)
    assert [p.name for p in phases] == ["ift", "restore_001", "restore_002", "restore_003"]
    ift, restore = phases[0], phases[2]
    assert (ift.optimizer.lr, ift.optimizer.weight_decay, ift.optimizer.warmup_ratio, ift.optimizer.schedule) == \
        (5e-3, 0.01, 0.1, "constant")
    # Every optimizer setting of a restoration is the restore_* one, none inherited from IFT.
    assert (restore.optimizer.lr, restore.optimizer.weight_decay, restore.optimizer.warmup_ratio,
            restore.optimizer.schedule) == (1e-3, 0.0, 0.0, "cosine")
    assert (restore.batching.batch_size, restore.batching.micro_batch, restore.batching.grad_accum) == (4, 2, 1)
    assert (restore.data.source, restore.data.format, restore.data.max_length) == ("restoring_set", "packed_text", 64)
    assert restore.epochs == 1 and not restore.drop_last and restore.restores_epoch == 2
    assert restore.methods.sam_rho == 0.0 and restore.methods.wiseft_alpha == 1.0  # the measurement, not a method
    assert (ift.data.format, ift.data.max_length, ift.drop_last, ift.epochs) == ("instructions", 128, True, 3)


def test_restoration_defaults_are_the_documented_ones():
    # README: restore_weight_decay 0, restore_warmup_ratio 0.03, restore_lr_schedule cosine, restore_lr 3e-5.
    restore = plan(TrialConfig(restore_pool="p.jsonl"))[-1].optimizer
    assert (restore.lr, restore.weight_decay, restore.warmup_ratio, restore.schedule) == (3e-5, 0.0, 0.03, "cosine")


def test_prior_phases_default_to_plain_fine_tuning_at_the_trial_lr():
    trial = TrialConfig(**TRIAL, sam_rho=0.05, wiseft_alpha=0.5, rehearsal_ratio=0.25,
                        prior_phases=[{"dataset": "a.jsonl", "epochs": 2},
                                      {"dataset": "b.jsonl", "epochs": 1, "lr": 1e-4, "sam_rho": 0.1,
                                       "rehearsal_ratio": 0.5}])
    first, second, ift = plan(trial)
    assert (first.name, first.kind, first.epochs, first.data.source) == ("prior_1", "prior", 2, "prior_datasets/0")
    assert first.optimizer.lr == 5e-3  # unset: the trial's lr
    assert (first.methods.sam_rho, first.methods.wiseft_alpha, first.methods.rehearsal_ratio) == (0.0, 1.0, 0.0)
    assert first.data.rehearse is None
    assert (second.optimizer.lr, second.methods.sam_rho, second.methods.rehearsal_ratio) == (1e-4, 0.1, 0.5)
    assert second.data.rehearse == "prior_datasets/0"  # rehearsal replays the phase before
    # Prior phases share the IFT phase's batching, schedule and weight decay.
    assert second.optimizer.weight_decay == 0.01 and second.optimizer.schedule == "constant"
    assert (ift.methods.sam_rho, ift.methods.wiseft_alpha, ift.methods.rehearsal_ratio) == (0.05, 0.5, 0.25)
    assert ift.data.rehearse == "prior_datasets/1" and ift.data.source == "dataset"


def test_groups_put_prior_phases_before_ift_and_restorations_by_restore_group():
    trial = TrialConfig(**TRIAL, restore_pool="p.jsonl", restore_group=2,
                        prior_phases=[{"dataset": "a.jsonl", "epochs": 1}])
    named = [[p.name for p in g] for g in groups(trial, plan(trial))]
    # the prior phases apart: their result is trained once per sweep for every trial that shares it
    assert named == [["prior_1"], ["ift"], ["restore_001", "restore_002"], ["restore_003"]]
    alone = TrialConfig(**TRIAL)
    assert [[p.name for p in g] for g in groups(alone, plan(alone))] == [["ift"]]
    # restore_group=0: the restorations in the IFT phase's own Ray Train run, after it
    inline = TrialConfig(**TRIAL, restore_pool="p.jsonl", restore_group=0)
    assert [[p.name for p in g] for g in groups(inline, plan(inline))] == [
        ["ift", "restore_001", "restore_002", "restore_003"]]
    ift, restore = plan(trial)[1], plan(trial)[-1]
    assert checkpoint_name(ift, 7) == "epoch_007" and checkpoint_name(restore, 3) == "restored_epoch_003"
    with pytest.raises(ValueError, match="no checkpoints"):
        checkpoint_name(plan(trial)[0], 1)


def test_phase_round_trips_through_plain_data_and_logs_its_settings():
    trial = TrialConfig(**TRIAL, restore_pool="p.jsonl", sam_rho=0.05)
    for phase in plan(trial):
        assert Phase.from_dict(json.loads(json.dumps(phase.to_dict()))) == phase  # what crosses to the workers
    params = plan(trial)[1].params()
    assert params["restore_001.optimizer.lr"] == 3e-5 and params["restore_001.batching.grad_accum"] == 1
    assert params["restore_001.optimizer.grad_clip"] == 1.0 and params["restore_001.data.format"] == "packed_text"
    assert plan(trial)[0].params()["ift.methods.sam_rho"] == 0.05


def test_restore_settings_are_validated():
    with pytest.raises(SpecError, match="'restore_lr_schedule'"):
        TrialConfig(restore_lr_schedule="linear")
    with pytest.raises(SpecError, match="'restore_warmup_ratio'"):
        TrialConfig(restore_warmup_ratio=1.0)
    with pytest.raises(SpecError, match=r"'prior_phases'\[0\].*unknown key 'stage'"):
        TrialConfig(prior_phases=[{"dataset": "a", "epochs": 1, "stage": 2}])


# --- the two review bugs -------------------------------------------------------------------------------------------

def _resolved(dataset: str) -> dict:
    return {"model": {"path": "/m"}, "dataset": {"path": dataset}, "prior_datasets": [],
            "benchmarks": {"b": {"path": "/b.jsonl", "score": "acc"}}, "probe_set": {"path": "/p.jsonl"},
            "restore_pool": {"path": "/pool.jsonl"}}


def test_base_evaluation_keys_cover_what_the_base_evaluation_depends_on():
    from forgetray.trial import base_em_key, base_eval_key

    trial = TrialConfig(model="organism-tiny", dataset="a.jsonl")
    # The probes do not depend on the IFT data or its settings: trials on two datasets share them ...
    assert base_eval_key(trial, _resolved("/a.jsonl")) == base_eval_key(TrialConfig(model="organism-tiny", lr=0.1),
                                                                       _resolved("/b.jsonl"))
    # ... but the base model's exact memorization does: the dataset, max_length and em_examples each change its key.
    key = base_em_key(trial, _resolved("/a.jsonl"))
    assert base_em_key(trial, _resolved("/b.jsonl")) != key
    assert base_em_key(TrialConfig(model="organism-tiny", max_length=64), _resolved("/a.jsonl")) != key
    assert base_em_key(TrialConfig(model="organism-tiny", em_examples=10), _resolved("/a.jsonl")) != key
    assert base_em_key(TrialConfig(model="organism-tiny", lr=0.5), _resolved("/a.jsonl")) == key
    # A prior phase changes the starting weights, so every cache of the start model.
    prior = TrialConfig(model="organism-tiny", prior_phases=[{"dataset": "p.jsonl", "epochs": 1}])
    resolved = {**_resolved("/a.jsonl"), "prior_datasets": [{"path": "/p.jsonl"}]}
    assert base_eval_key(prior, resolved) != base_eval_key(trial, _resolved("/a.jsonl"))


def test_control_key_is_shared_by_what_restores_the_same_start_the_same_way():
    """R_0 (the start through the trial's restoration recipe) is one per start, restoring set, recipe, seed and probe
    suite: trials that differ only in how they fine-tune share it; anything that changes R_0 itself splits it."""
    from forgetray.keys import control_key

    def key(dataset="/a.jsonl", **settings):
        return control_key(TrialConfig(model="organism-tiny", restore_pool="pool.jsonl", **settings),
                           _resolved(dataset))

    shared = key()
    for fine_tuning in ({"lr": 0.5}, {"epochs": 7}, {"sam_rho": 0.05}, {"wiseft_alpha": 0.5}, {"stage_margin": 0.05},
                        {"lr_schedule": "constant"}):
        assert key(**fine_tuning) == shared, fine_tuning
    for own in ({"seed": 1}, {"restore_lr": 1e-4}, {"restore_batch_size": 4}, {"restore_seq_len": 128},
                {"restore_max_passes": 2}, {"ppl_tolerance": 0.1}, {"zero_stage": 2}, {"probe_passages": 9}):
        assert key(**own) != shared, own
    assert key(dataset="/b.jsonl") != shared  # the restoring set's budget is one epoch of the IFT data's tokens
    # stage_margin is a trial setting (its own run), hashed only off its default (hashes from before it stay)
    assert TrialConfig(stage_margin=0.05).config_hash() != TrialConfig().config_hash()


def test_restoring_set_excludes_exactly_the_probed_passages(tmp_path):
    """The probing set may be an endless stream (a hub dataset): only the `probe_passages` the probes score are read
    and excluded from the restoring set."""
    from forgetray.train.ift import excluded_passages

    path = tmp_path / "probe.jsonl"
    path.write_text("".join(json.dumps({"text": f"passage {i}"}) + "\n" for i in range(1000)))
    trial = TrialConfig(probe_passages=25)
    got = excluded_passages({"probe_set": {"kind": "file", "path": str(path)}}, trial)
    assert got == [f"passage {i}" for i in range(25)]


def test_own_benchmark_is_carried_by_the_plan_and_logged_with_the_phase():
    trial = TrialConfig(**TRIAL, benchmarks=["facts", "data/math.jsonl"], own_benchmark="data/math.jsonl",
                        prior_phases=[{"dataset": "a.jsonl", "epochs": 1, "own_benchmark": "facts"},
                                      {"dataset": "b.jsonl", "epochs": 1}])
    first, second, ift = plan(trial)
    assert (first.data.own_benchmark, second.data.own_benchmark, ift.data.own_benchmark) == \
        ("facts", "", "data/math.jsonl")  # unset: the phase's data has no benchmark of its own
    assert first.params()["prior_1.data.own_benchmark"] == "facts"
    assert ift.params()["ift.data.own_benchmark"] == "data/math.jsonl"
    assert Phase.from_dict(json.loads(json.dumps(first.to_dict()))) == first
    with_restoration = TrialConfig(**TRIAL, restore_pool="p.jsonl", benchmarks=trial.benchmarks,
                                   prior_phases=trial.prior_phases)
    assert [p.name for p in fine_tuning_steps(plan(with_restoration))] == \
        ["prior_1", "prior_2", "ift"]  # steps t = 1..T; the restorations are no fine-tuning step
    assert TrialConfig.from_dict(trial.to_dict()) == trial


@pytest.mark.parametrize("settings, message", [
    (dict(own_benchmark="mmlu"), r"setting 'own_benchmark' must be one of the trial's benchmarks \['facts'\]"),
    (dict(prior_phases=[{"dataset": "a", "epochs": 1, "own_benchmark": "mmlu"}]),
     r"setting 'prior_phases'\[0\]: own_benchmark must be one of the trial's benchmarks \['facts'\].*'mmlu'"),
    (dict(prior_phases=[{"dataset": "a", "epochs": 1, "own_benchmark": 3}]),
     r"setting 'prior_phases'\[0\]: setting 'own_benchmark' must be str"),
])
def test_own_benchmark_must_name_one_of_the_trials_benchmarks(settings, message):
    with pytest.raises(SpecError, match=message):
        TrialConfig(benchmarks=["facts"], **settings)
