"""Grid expansion and validation of sweeps (pure, no Ray)."""

import re
from pathlib import Path

import pytest

from forgetray import Sweep, TrialConfig, grid
from forgetray.grids import SWEEP_OPTIONS, flatten, parse_override
from forgetray.spec import SETTINGS, SpecError


def test_grid_expands_to_cartesian_product_in_order():
    sweep = Sweep("s", model=grid(["a-model", "b-model"]), epochs=grid([1, 2, 3]), lr=2e-5)
    assert sweep.size == 6
    assert [(t.model, t.epochs) for t in sweep.trials] == [
        ("a-model", 1), ("a-model", 2), ("a-model", 3), ("b-model", 1), ("b-model", 2), ("b-model", 3)]
    assert all(t.lr == 2e-5 for t in sweep.trials)
    assert sweep.axes == {"model": ("a-model", "b-model"), "epochs": (1, 2, 3)}


def test_single_values_make_one_trial_with_defaults():
    sweep = Sweep("s")
    assert sweep.size == 1 and sweep.trials[0] == TrialConfig()


@pytest.mark.parametrize("kwargs, message", [
    ({"foo": 1}, "unknown axis 'foo'"),
    ({"epochs": 0}, "'epochs' must be >= 1"),
    ({"epochs": grid([2, 0])}, "'epochs' must be >= 1"),
    ({"epochs": "3"}, "'epochs' must be int, got str"),
    ({"epochs": True}, "'epochs' must be int, got bool"),
    ({"lr": "fast"}, "'lr' must be float"),
    ({"zero_stage": 4}, "'zero_stage' must be 0, 1, 2 or 3"),
    ({"batch_size": 10, "workers": 3}, "'batch_size' must be a multiple of workers = 3"),
    ({"batch_size": 16, "micro_batch_size": 3}, "multiple of micro_batch_size x workers = 3"),
    ({"precision": "bf16"}, "bf16/fp16 need gpus_per_worker"),
    ({"primary_score": {"other": "acc"}}, "names benchmark 'other'"),
    ({"primary_score": {"organism-facts": "f1"}}, "must map to one of"),
    ({"model": ""}, "'model' must name a model"),
    ({"lr": grid([1e-3, 1e-3])}, "same trial twice"),
])
def test_invalid_settings_name_the_setting(kwargs, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Sweep("s", **kwargs)


def test_empty_grid_and_bad_grid_values():
    with pytest.raises(SpecError, match="empty"):
        grid([])
    with pytest.raises(SpecError, match="list of values"):
        grid("abc")


def test_bad_sweep_name():
    with pytest.raises(SpecError, match="sweep name"):
        Sweep("has space")


def test_int_is_accepted_for_float_and_converted():
    assert TrialConfig(lr=1).lr == 1.0 and isinstance(TrialConfig(lr=1).lr, float)


def test_derived_batching():
    t = TrialConfig(batch_size=32, workers=2, micro_batch_size=4)
    assert (t.micro_batch, t.grad_accum) == (4, 4)
    t = TrialConfig(batch_size=32, workers=2)
    assert (t.micro_batch, t.grad_accum) == (16, 1)


def test_dict_round_trip_and_hash_stability():
    t = TrialConfig(benchmarks=["organism-facts"], primary_score={"organism-facts": "acc_norm"}, epochs=4)
    back = TrialConfig.from_dict(t.to_dict())
    assert back == t and back.config_hash() == t.config_hash()
    assert TrialConfig(epochs=5).config_hash() != t.config_hash()
    assert t.primary_score_for("organism-facts", "letter") == "acc_norm"
    with pytest.raises(SpecError, match="unknown setting 'nope'"):
        TrialConfig.from_dict({"nope": 1})


def test_overrides():
    sweep = Sweep("s", epochs=grid([1, 2]))
    assert parse_override("lr=0.01") == ("lr", 0.01)
    assert parse_override("epochs=[1,2,3]")[1] == grid([1, 2, 3])
    assert parse_override("model=some/hub-id") == ("model", "some/hub-id")
    changed = sweep.with_overrides(dict([parse_override("epochs=[3]"), parse_override("lr=0.5")]))
    assert [(t.epochs, t.lr) for t in changed.trials] == [(3, 0.5)]
    with pytest.raises(SpecError, match="unknown axis 'epoch'"):
        parse_override("epoch=3")
    with pytest.raises(SpecError, match="key=value"):
        parse_override("epochs")


def test_every_setting_has_a_default_and_flatten():
    assert set(TrialConfig().to_dict()) == set(SETTINGS)
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}}) == {"a.b": 1, "a.c.d": 2, "e": {}}


def _readme_settings_table() -> list[str]:
    """The settings named in the first column of README.md's `| setting | meaning |` table ("Running sweeps"), in
    order: every backticked name of every row, several per row."""
    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    start = lines.index("| setting | meaning |")
    assert lines[start + 1].replace(" ", "") == "|---|---|"
    names = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        first_column = line.split("|")[1]
        found = re.findall(r"`([^`]+)`", first_column)
        assert found, f"a row of the README settings table names no setting: {line[:80]!r}"
        names += found
    return names


def test_readme_settings_table_lists_exactly_the_settings():
    """Every TrialConfig setting has a row in the README's table, and the table names no setting that does not
    exist (a renamed or removed one), nor one twice."""
    documented = _readme_settings_table()
    assert len(documented) == len(set(documented)), [n for n in documented if documented.count(n) > 1]
    missing = [name for name in SETTINGS if name not in documented]
    unknown = [name for name in documented if name not in SETTINGS]
    assert not missing, f"settings missing from README.md's settings table: {missing}"
    assert not unknown, f"README.md's settings table names settings TrialConfig does not have: {unknown}"
    # the sweep options are not trial settings (so not in the table), but the README says how to set each
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for option in SWEEP_OPTIONS:
        assert option not in SETTINGS and option not in documented
        assert f"--set {option}=" in readme, f"README.md never shows `--set {option}=...`"


def test_cases_set_several_settings_together_crossed_with_the_grids():
    arms = [{"iv_task": ""}, {"iv_task": "t.jsonl"}, {"iv_task": "t.jsonl", "iv_degree": 0.0}]
    sweep = Sweep("s", epochs=grid([1, 2]), cases=arms, replicates=2)
    assert [(t.epochs, t.iv_task, t.iv_degree, t.seed) for t in sweep.trials] == [
        (e, task, degree, seed) for e in (1, 2) for task, degree in (("", 1.0), ("t.jsonl", 1.0), ("t.jsonl", 0.0))
        for seed in (0, 1)]
    assert sweep.axes == {"epochs": (1, 2), "iv_task": ("", "t.jsonl", "t.jsonl"), "iv_degree": (1.0, 1.0, 0.0)}
    assert sweep.to_dict()["cases"] == arms
    assert len(sweep.replicate_groups) == 6
    # an override replaces what the cases set; {} is the case of the defaults
    assert [(t.iv_task, t.iv_degree) for t in Sweep("s", cases=[{}, {"iv_task": "t.jsonl"}]).trials] == [
        ("", 1.0), ("t.jsonl", 1.0)]
    assert {(t.epochs, t.iv_degree) for t in Sweep("s", cases=arms[1:]).with_overrides({"epochs": 3}).trials} == {
        (3, 1.0), (3, 0.0)}
    assert [t.iv_degree for t in Sweep("s", cases=arms[1:]).with_overrides({"iv_task": "u.jsonl"}).trials] == [
        1.0, 0.0]
    with pytest.raises(SpecError, match="same trial twice"):  # the override makes two cases one trial
        sweep.with_overrides({"iv_degree": 0.5})
    for bad, message in (({"lr": 1e-3}, "cases must be a list"), ([3], r"cases\[0\] must be a mapping"),
                         ([{"nonsense": 1}], r"cases\[0\]: unknown setting 'nonsense'"),
                         ([{"epochs": 3}], r"cases\[0\] sets 'epochs', which the sweep also sets"),
                         ([{"lr": grid([1e-3])}], "plain values"), ([{"lr": -1.0}], "'lr'")):
        with pytest.raises(SpecError, match=message):
            Sweep("s", epochs=2, cases=bad)
    with pytest.raises(SpecError, match="replicates=2"):
        Sweep("s", cases=[{"seed": 1}], replicates=2)


def test_per_makes_a_setting_follow_another():
    from forgetray.grids import per

    sweep = Sweep("s", dataset=grid(["a.jsonl", "b.jsonl"]), epochs=grid([1, 2]),
                  lr=per("dataset", {"a.jsonl": 5e-3, "b.jsonl": 4e-3}))
    assert [(t.dataset, t.epochs, t.lr) for t in sweep.trials] == [
        ("a.jsonl", 1, 5e-3), ("a.jsonl", 2, 5e-3), ("b.jsonl", 1, 4e-3), ("b.jsonl", 2, 4e-3)]
    assert sweep.axes == {"dataset": ("a.jsonl", "b.jsonl"), "epochs": (1, 2)}  # not an axis: no extra trials
    assert sweep.to_dict()["settings"]["lr"] == {"per": "dataset", "values": [["a.jsonl", 5e-3], ["b.jsonl", 4e-3]]}
    # a single value (or the default) of the followed setting works too; an override replaces the rule
    assert Sweep("s", dataset="b.jsonl", lr=per("dataset", {"b.jsonl": 1e-4})).trials[0].lr == 1e-4
    assert {t.lr for t in sweep.with_overrides({"lr": 1e-3}).trials} == {1e-3}
    with pytest.raises(SpecError, match=r"'lr' = per\('dataset', \.\.\.\) has no value for dataset='b.jsonl'"):
        Sweep("s", dataset=grid(["a.jsonl", "b.jsonl"]), lr=per("dataset", {"a.jsonl": 5e-3}))
    # what a newcomer meets with `--set dataset=my.jsonl` on the quickstart: the error says how to go on
    with pytest.raises(SpecError, match=r"has no value for dataset='my.jsonl' .*; give it one with --set lr=VALUE"):
        sweep.with_overrides({"dataset": "my.jsonl"})
    with pytest.raises(SpecError, match="'lr' = per\\('lr'"):
        Sweep("s", lr=per("lr", {1: 2}))
    with pytest.raises(SpecError, match="must be another setting"):
        Sweep("s", lr=per("nonsense", {1: 2}))
    with pytest.raises(SpecError, match="non-empty dict"):
        per("dataset", {})
    with pytest.raises(SpecError, match="'lr'"):  # the followed value is validated like any setting
        Sweep("s", dataset="a.jsonl", lr=per("dataset", {"a.jsonl": -1.0}))
