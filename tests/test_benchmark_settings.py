"""Benchmarks by name in a trial's settings: task names, `name@dir` local copies and suites resolve before any
compute, with errors naming the setting; the BOS rule follows the model unless set."""

from __future__ import annotations

import pytest

from forgetray import tasks
from forgetray.resources import clear_cache, resolve_trial
from forgetray.spec import SpecError, TrialConfig


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    import task_fixtures

    return task_fixtures.write_all(tmp_path_factory.mktemp("tasks"))


def _trial(fixture_files, **settings) -> TrialConfig:
    clear_cache()
    return TrialConfig(model=str(fixture_files["model"]), dataset=str(fixture_files["dataset"]),
                       probe_set=str(fixture_files["probe_set"]), **settings)


def test_task_names_resolve_to_local_copies_with_their_protocol(fixture_files, task_data):
    trial = _trial(fixture_files, benchmarks=[f"arc_easy@{task_data['arc_easy']}",
                                               f"hellaswag@{task_data['hellaswag']}"])
    resolved = resolve_trial(trial)
    arc, hella = resolved["benchmarks"]["arc_easy"], resolved["benchmarks"]["hellaswag"]
    assert (arc["kind"], arc["task"], arc["local"], arc["score"]) == ("task", "arc_easy", True, "acc")
    assert arc["path"] == str(task_data["arc_easy"])
    assert hella["score"] == "acc_norm"  # HellaSwag's standard score (lm-eval), not acc
    assert resolved["bos"] == "auto"  # a local model follows its tokenizer's rule, as lm-eval


def test_a_task_without_a_local_copy_is_read_from_the_hub_by_the_workers(fixture_files):
    bench = resolve_trial(_trial(fixture_files, benchmarks=["mmlu"]))["benchmarks"]["mmlu"]
    assert (bench["local"], bench["path"], bench["score"]) == (False, tasks.get("mmlu").dataset_path, "acc")


def test_cf_suite_expands_to_every_task_once(fixture_files):
    resolved = resolve_trial(_trial(fixture_files, benchmarks=["cf-suite", "mmlu"]))
    assert tuple(resolved["benchmarks"]) == tasks.suite("cf-suite")
    assert len(resolved["benchmarks"]) == 17


def test_bad_task_settings_name_the_setting(fixture_files, tmp_path):
    with pytest.raises(SpecError, match="'benchmarks'.*does not exist"):
        resolve_trial(_trial(fixture_files, benchmarks=[f"arc_easy@{tmp_path / 'missing'}"]))
    with pytest.raises(SpecError, match="'primary_score'.*offers acc, acc_norm, not 'mc2'"):
        resolve_trial(_trial(fixture_files, benchmarks=["arc_easy"], primary_score={"arc_easy": "mc2"}))
    with pytest.raises(SpecError, match="'primary_score'.*mc2 is a probability"):
        resolve_trial(_trial(fixture_files, benchmarks=["truthfulqa_mc2"], restore_pool=str(fixture_files["probe_set"])))
    with pytest.raises(SpecError, match="'bos'"):
        TrialConfig(bos="sometimes")
    with pytest.raises(SpecError, match="'letter_rule'"):
        TrialConfig(letter_rule="first")


def test_organism_models_keep_their_bos(use_test_organism):
    clear_cache()
    assert resolve_trial(TrialConfig(model="organism-tiny"))["bos"] == "always"
    assert resolve_trial(TrialConfig(model="organism-tiny", bos="never"))["bos"] == "never"
