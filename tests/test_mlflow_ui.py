"""What the MLflow UI reads, written on a real sqlite store without Ray: the experiment's kind and description, run
names that lead with the swept settings, descriptions saying what `step` means (from the registry), datasets,
CSV copies of Parquet tables, the saved view the printed link opens, and the system-metrics switch."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest

from forgetray import tracking
from forgetray.metrics import registry
from forgetray.spec import TrialConfig
from forgetray.trial import run_name, trial_datasets, varying_settings


@pytest.fixture
def tracker(tmp_path):
    return tracking.Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "artifacts")


def test_metric_guide_covers_every_step_meaning_and_names_the_chart_sections():
    guide = tracking.metric_guide()
    for _, text in registry.STEPS.values():
        assert text in guide
    # The UI's chart section of a metric is its name up to the last '/': one section for every restoring trajectory.
    assert "`restore/probe_ppl/`" in guide and "`train/`" in guide and "`{base,sft,restored,control}/<bench>/`" in guide
    assert registry.RESTORE_TRAJECTORY.name(epoch=12).rsplit("/", 1)[0] == "restore/probe_ppl"


def test_run_names_lead_with_the_swept_settings():
    trials = [TrialConfig(model="/m/tiny-llama", dataset=d, lr=lr).to_dict()
              for d in ("organism-math", "organism-alpaca") for lr in (5e-3, 1e-4)]
    assert varying_settings(trials) == ["dataset", "lr"]
    names = [run_name(TrialConfig.from_dict(t), trials) for t in trials]
    assert names[0] == "dataset=organism-math lr=5e-3 tiny-llama"
    assert len(set(names)) == 4 and all(n.endswith(" tiny-llama") for n in names)
    single = [trials[0]]
    assert run_name(TrialConfig.from_dict(trials[0]), single) == "tiny-llama"


def test_experiment_opens_in_the_classic_view_with_a_description(tracker):
    run_id = tracker.start_sweep_run("my-study", "20260101-000000", {"sweep.name": "my-study"}, description="hello")
    experiment = tracker.client.get_experiment_by_name("my-study")
    assert experiment.tags[tracking.TAG_EXPERIMENT_KIND] == "custom_model_development"
    assert "What `step` means" in experiment.tags[tracking.TAG_NOTE]
    assert tracker.get_run(run_id).data.tags[tracking.TAG_NOTE] == "hello"
    # An experiment made before (no kind, no note) gets both when the next execution starts.
    tracker.client.delete_experiment_tag(experiment.experiment_id, tracking.TAG_EXPERIMENT_KIND)
    tracker.start_sweep_run("my-study", "20260101-000001", {})
    assert tracker.client.get_experiment(experiment.experiment_id).tags[tracking.TAG_EXPERIMENT_KIND] == \
        "custom_model_development"


def test_trial_run_has_its_name_description_and_datasets(tracker, tmp_path):
    parent = tracker.start_sweep_run("s", "e", {})
    data = tmp_path / "ift.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    resolved = {"dataset": {"kind": "local", "name": str(data), "path": str(data), "records": 1},
                "prior_datasets": [],
                "benchmarks": {"mmlu": {"kind": "hub", "name": "mmlu", "path": "cais/mmlu", "questions": 14042}},
                "probe_set": {"kind": "file", "name": "p.jsonl", "path": str(tmp_path / "p.jsonl"), "passages": 8},
                "restore_pool": None}
    run_id = tracker.start_trial_run("s", parent, "key-123", "123", {"trial.lr": 0.005},
                                     run_name="lr=5e-3 tiny", description="**what** step means")
    tracker.log_datasets(run_id, trial_datasets(resolved))
    run = tracker.get_run(run_id)
    assert run.info.run_name == "lr=5e-3 tiny" and run.data.tags[tracking.TAG_TRIAL] == "key-123"
    assert run.data.tags[tracking.TAG_NOTE] == "**what** step means"
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"ift", "mmlu", "p"}
    contexts = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in inputs.items()}
    assert contexts == {"ift": "training", "mmlu": "evaluation", "p": "probing"}
    assert json.loads(inputs["ift"].dataset.source) == {"uri": str(data)}
    assert json.loads(inputs["mmlu"].dataset.profile) == {"num_rows": 14042}
    assert inputs["mmlu"].dataset.source_type == "hugging_face" and len(inputs["ift"].dataset.digest) == 8
    data.write_text('{"instruction": "a", "output": "c"}\n')  # other content, other digest
    assert trial_datasets(resolved)[0]["digest"] != inputs["ift"].dataset.digest


def test_parquet_tables_get_a_csv_the_ui_previews(tracker, tmp_path):
    run_id = tracker.start_trial_run("s", tracker.start_sweep_run("s", "e", {}), "k", "h", {})
    frame = pd.DataFrame({"index": [0, 1], "correct": [True, False]})
    tracker.log_table(run_id, frame, "stages/per_question_b.parquet")
    folder = tmp_path / "probes"
    (folder / "sub").mkdir(parents=True)
    frame.to_parquet(folder / "b.parquet")
    frame.to_parquet(folder / "sub" / "c.parquet")
    (folder / "summary.json").write_text("{}")
    tracker.log_artifacts(run_id, folder, "probes/base")
    listed = set(tracker.list_artifacts(run_id, "stages")) | set(tracker.list_artifacts(run_id, "probes/base")) \
        | set(tracker.list_artifacts(run_id, "probes/base/sub"))
    assert {"stages/per_question_b.parquet", "stages/per_question_b.csv", "probes/base/b.parquet",
            "probes/base/b.csv", "probes/base/sub/c.csv", "probes/base/summary.json"} <= listed
    back = pd.read_csv(tracker.download_artifacts(run_id, "probes/base/sub/c.csv", tmp_path / "dl"))
    assert back.equals(frame)


def test_the_printed_link_opens_a_saved_view_of_the_trials(tracker):
    parent = tracker.start_sweep_run("s", "e", {})
    fragment = tracker.trial_charts_view(parent)
    experiment = tracker.client.get_experiment_by_name("s")
    assert fragment == (f"#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
                        f"&viewStateShareKey=forgetray-{parent}&compareRunsMode=CHART")
    state = json.loads(experiment.tags[f"mlflow.sharedViewState.forgetray-{parent}"])
    assert state["searchFilter"] == f"tags.`mlflow.parentRunId` = '{parent}'"
    assert state["chartsSearchFilter"] == tracking.KNOWLEDGE_CHARTS and state["runsHiddenMode"] == "SHOW_ALL"
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "forgetray.kind"}]
    assert state["useGroupedValuesInCharts"] is False
    # The filter is one MLflow search accepts, and it finds the trials (not the parent).
    child = tracker.start_trial_run("s", parent, "k", "h", {})
    found = tracker.client.search_runs([experiment.experiment_id], filter_string=state["searchFilter"])
    assert [r.info.run_id for r in found] == [child]
    assert tracking.ui_base("http://mlflow:5000/") == "http://mlflow:5000"
    assert tracking.ui_base("sqlite:////x/mlflow.db") == "http://127.0.0.1:5000"


def test_system_metrics_switch_and_monitor(tracker, monkeypatch):
    assert not tracking.system_metrics_wanted(None, 0) and tracking.system_metrics_wanted("auto", 1)
    assert tracking.system_metrics_wanted("1", 0) and not tracking.system_metrics_wanted("0", 4)
    run_id = tracker.start_trial_run("s", tracker.start_sweep_run("s", "e", {}), "k", "h", {})
    with tracking.system_metrics(tracker.uri, run_id, sampling_interval=0.5):
        time.sleep(2.5)
    assert any(k.startswith("system/cpu_utilization") for k in tracker.get_run(run_id).data.metrics)
