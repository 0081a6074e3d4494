"""Benchmarks by name in a real sweep: the whole cf-suite read from local copies ($FORGETRAY_TASK_DATA), probed on
the base model and every checkpoint inside Ray Train workers, logged under the registry's names, with CF's
categories; checked against an unsharded probe of the saved model computed here."""

from __future__ import annotations

import os

import pytest
from conftest import local_ray

pytestmark = pytest.mark.slow


def test_cf_suite_in_a_sweep(tmp_path, fixture_files, ray_session, monkeypatch):
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import task_fixtures
    from forgetray import Sweep, run, tasks
    from forgetray.probes import probe_task, summarize_task
    from forgetray.resources import clear_cache

    task_fixtures.write_all(tmp_path / "tasks")
    monkeypatch.setenv(tasks.DATA_ENV, str(tmp_path / "tasks"))  # the workers inherit it
    clear_cache()
    local_ray({k: os.environ[k] for k in ("HF_DATASETS_OFFLINE", tasks.DATA_ENV)})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = Sweep("cf-tasks", model=str(fixture_files["model"]), dataset=str(fixture_files["dataset"]), epochs=1,
                  lr=3e-3, batch_size=8, max_length=256, workers=1, benchmarks=["cf-suite"],
                  probe_set=str(fixture_files["probe_set"]), probe_passages=8, probe_batch_size=8)
    table = run(sweep, tracking_uri=uri, storage=tmp_path / "storage")
    assert table.attrs["failed_trials"] == 0
    # The actors this Ray started, from its control store (Ray's state API needs the dashboard, off here): neither
    # Ray Data's manager nor the placement-group cleaner, which could not have reached that API (forgetray.fit).
    from ray._private.state import actors

    started = {actor["ActorClassName"] for actor in actors().values()}
    assert "RayTrainWorker" in started and not {"DatasetManager", "PlacementGroupCleaner"} & started, started

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cf-tasks")
    (trial,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("forgetray.kind") == "trial"]
    metrics = trial.data.metrics
    ckpt = next((tmp_path / "storage").glob("cf-tasks/*/trials/*/ift/epoch_001"))
    model = AutoModelForCausalLM.from_pretrained(ckpt / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "model")
    primary = {}
    for name in tasks.suite("cf-suite"):
        task = tasks.get(name)
        frame = probe_task(model, tokenizer, task, task.load(tmp_path / "tasks" / name), bos="auto", batch_size=4,
                           max_length=2048)
        mine = summarize_task(frame, task)
        primary[name] = mine[task.primary]
        for score in task.scores:  # every score of every task, logged at epoch 1 under the registry's name
            leaf = "letter_acc" if score == "letter" else score
            assert metrics[f"sft/{name}/{leaf}"] == pytest.approx(mine[score], abs=1e-9), (name, score)
        assert metrics[f"sft/{name}/knowledge"] == pytest.approx(mine[task.primary], abs=1e-9)
        assert f"base/{name}/knowledge" in metrics
    for group in ("stem", "humanities", "social_sciences", "other"):
        if f"acc_{group}" in summarize_task(probe_task(model, tokenizer, tasks.get("mmlu"),
                                                       tasks.get("mmlu").load(tmp_path / "tasks" / "mmlu"),
                                                       bos="auto", max_length=2048), tasks.get("mmlu")):
            assert f"sft/mmlu/group/{group}/acc" in metrics
    # CF's categories from the per-task primary scores, by docs/methods.md §7's formula written out here.
    understanding = ["race_middle", "race_high", "openbookqa_fact", "csl"]
    reasoning = ["boolq", "ax_b", "ax_g", "rte", "copa", "hellaswag", "siqa"]
    expected = {"DK": primary["mmlu"], "Exams": primary["arc_challenge"],
                "Understanding": sum(primary[n] for n in understanding) / 4,
                "Reasoning": sum(primary[n] for n in reasoning) / 7}
    expected["AVG"] = sum(expected.values()) / 4
    for key, value in expected.items():
        assert metrics[f"sft/cf/{key}"] == pytest.approx(value, abs=1e-9), key
