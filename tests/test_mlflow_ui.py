"""What the MLflow UI reads, written on a real sqlite store without Ray: the experiment's kind and description, run
names that lead with the swept settings, descriptions saying what `step` means (from the registry), datasets,
CSV copies of Parquet tables, the saved view the printed link opens, and the system-metrics switch."""

from __future__ import annotations

import json
import re
import time

import pandas as pd
import psutil
import pytest

from forgetray import tracking
from forgetray.metrics import registry
from forgetray.spec import TrialConfig
from forgetray.grids import Sweep, grid, per, replicate_group
from forgetray.records import grid_point
from forgetray.trial import run_name, trial_datasets, varying_settings
from forgetray import ui


@pytest.fixture
def tracker(tmp_path):
    return tracking.Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "artifacts")


EXAMPLE_FIELDS = {"bench": "mmlu", "k": 3, "epoch": 12, "group": "stem"}  # a value for every field but state and key


def _section_regex(shown: str) -> re.Pattern:
    """A chart section as the guide shows it (`{a,b}/<bench>/`) -> the regex of the sections it stands for."""
    out = ""
    for part in re.split(r"(\{[^}]*\}|<[^>]+>)", shown):
        if part.startswith("{"):
            out += "(" + "|".join(map(re.escape, part[1:-1].split(","))) + ")"
        elif part.startswith("<"):
            out += "[^/]+"
        else:
            out += re.escape(part)
    return re.compile(out)


def test_metric_guide_covers_every_step_meaning_and_names_the_chart_sections():
    guide = tracking.metric_guide()
    lines = guide.splitlines()
    assert lines[-1] == "- `system/`: MLflow's system metrics (when enabled), step = sample number"
    shown = {}  # step text -> the chart sections listed for it
    for line in lines[:-1]:
        found = re.fullmatch(r"- step = \*\*(.+?)\*\*: (.+)", line)
        assert found, line
        shown[found[1]] = [section.strip("`") for section in found[2].split(", ")]
    # one line per step meaning that has metrics, in the registry's order
    meanings = [m for m in registry.STEPS if any(metric.step == m for metric in registry.METRICS)]
    assert list(shown) == [registry.STEPS[m][1] for m in meanings]
    # The UI's chart section of a metric is its name up to the last '/': every concrete name of every metric has
    # its section on its own step meaning's line (e.g. one `restore/probe_ppl/` for every restoring trajectory).
    for metric in registry.METRICS:
        patterns = [_section_regex(section) for section in shown[registry.STEPS[metric.step][1]]]
        for state in (metric.states if "state" in metric.fields else [None]):
            for key in (metric.keys if "key" in metric.fields else [None]):
                fields = {f: EXAMPLE_FIELDS.get(f) for f in metric.fields}
                fields.update({"state": state} if state else {}, **({"key": key} if key else {}))
                section = metric.name(**fields).rsplit("/", 1)[0] + "/"
                assert any(p.fullmatch(section) for p in patterns), (metric.pattern, section, patterns)
    assert "restore/probe_ppl/" in shown[registry.STEPS["restoring step"][1]]
    assert "{base,sft,restored,control}/<bench>/" in shown[registry.STEPS["epoch"][1]]


def test_run_names_lead_with_the_swept_settings():
    trials = [TrialConfig(model="/m/tiny-llama", dataset=d, lr=lr).to_dict()
              for d in ("organism-math", "organism-alpaca") for lr in (5e-3, 1e-4)]
    assert varying_settings(trials) == ["dataset", "lr"]
    names = [run_name(TrialConfig.from_dict(t), trials) for t in trials]
    # short values of what differs (a name without the prefix all its values share), a number with its key
    assert names == ["math·lr=5e-3", "math·lr=1e-4", "alpaca·lr=5e-3", "alpaca·lr=1e-4"]
    single = [trials[0]]
    assert run_name(TrialConfig.from_dict(trials[0]), single) == "tiny-llama"


def test_replicates_are_named_seed_last_and_share_their_grid_point():
    # the quick start's grid: lr follows the dataset (per), so it adds nothing to a name
    sweep = Sweep("q", model=grid(["organism-tiny", "organism-small"]), dataset=grid(["organism-alpaca", "organism-math"]),
                  lr=per("dataset", {"organism-alpaca": 5e-3, "organism-math": 4e-3}), replicates=3)
    trials = [t.to_dict() for t in sweep.trials]
    names = [run_name(t, trials) for t in sweep.trials]
    assert names[:4] == ["tiny·alpaca·s0", "tiny·alpaca·s1", "tiny·alpaca·s2", "tiny·math·s0"]
    assert len(set(names)) == 12 and max(map(len, names)) <= 15
    points = {grid_point(t, trials): replicate_group(t) for t in sweep.trials}
    assert sorted(points) == ["small·alpaca", "small·math", "tiny·alpaca", "tiny·math"]
    assert len(set(points.values())) == 4  # one label per grid point, as forgetray's replicate groups are


def test_experiment_opens_in_the_classic_view_with_a_description(tracker):
    run_id = tracker.start_sweep_run("my-study", "20260101-000000", {"sweep.name": "my-study"}, description="hello")
    experiment = tracker.client.get_experiment_by_name("my-study")
    assert experiment.tags[tracking.TAG_EXPERIMENT_KIND] == "custom_model_development"
    note = experiment.tags[tracking.TAG_NOTE]
    assert note.startswith("forgetray sweep **my-study**: ") and note.endswith(
        "What `step` means, by chart section:\n\n" + tracking.metric_guide())
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
    fragment = ui.charts_view(tracker, parent)
    experiment = tracker.client.get_experiment_by_name("s")
    assert fragment == (f"#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
                        f"&viewStateShareKey=forgetray-{parent}&compareRunsMode=CHART")
    state = json.loads(experiment.tags[f"mlflow.sharedViewState.forgetray-{parent}"])
    assert state["searchFilter"] == f"tags.`mlflow.parentRunId` = '{parent}'"
    assert state["chartsSearchFilter"] == ui.KNOWLEDGE_CHARTS and state["runsHiddenMode"] == "SHOW_ALL"
    # grouped by grid point, each group drawn as its mean with a min/max band (tests/test_mlflow_browser.py draws it)
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "forgetray.grid_point"}]
    assert state["useGroupedValuesInCharts"] is True
    # The filter is one MLflow search accepts, and it finds the trials (not the parent).
    child = tracker.start_trial_run("s", parent, "k", "h", {})
    found = tracker.client.search_runs([experiment.experiment_id], filter_string=state["searchFilter"])
    assert [r.info.run_id for r in found] == [child]
    assert ui.ui_base("http://mlflow:5000/") == "http://mlflow:5000"
    assert ui.ui_base("sqlite:////x/mlflow.db") == "http://127.0.0.1:5000"


def test_ui_finds_the_store_or_names_the_path_it_looked_at(tmp_path, capsys):
    from forgetray.cli import main

    assert main(["ui", str(tmp_path / "nowhere")]) == 2
    assert f"no MLflow store at {tmp_path / 'nowhere' / 'mlflow.db'}" in capsys.readouterr().err
    (tmp_path / "mlflow.db").write_bytes(b"")
    db = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert ui.store_uri(str(tmp_path)) == ui.store_uri(str(tmp_path / "mlflow.db")) == ui.store_uri(db) == db
    assert ui.store_uri("http://mlflow:5000") == "http://mlflow:5000"


def test_system_metrics_switch_and_monitor(tracker, monkeypatch):
    assert not tracking.system_metrics_wanted(None, 0) and tracking.system_metrics_wanted("auto", 1)
    assert tracking.system_metrics_wanted("1", 0) and not tracking.system_metrics_wanted("0", 4)
    run_id = tracker.start_trial_run("s", tracker.start_sweep_run("s", "e", {}), "k", "h", {})
    with tracking.system_metrics(tracker.uri, run_id, sampling_interval=0.5):
        time.sleep(2.5)
    first = len(tracker.client.get_metric_history(run_id, "system/cpu_utilization_percentage"))
    with tracking.system_metrics(tracker.uri, run_id, sampling_interval=0.5):  # a resumed trial's monitor
        time.sleep(1.5)
    history = {name: tracker.client.get_metric_history(run_id, name) for name in (
        "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
        "system/system_memory_usage_percentage")}
    cpu = sorted(history["system/cpu_utilization_percentage"], key=lambda m: m.step)
    # a sample every 0.5 s (plus the time to log it): at most 6 in the first block, 4 in the second, the second's
    # numbered on from the first's (no step twice)
    assert 2 <= first <= 6 and first < len(cpu) <= 10, (first, [m.step for m in cpu])
    assert [m.step for m in cpu] == list(range(len(cpu)))
    assert all(0.0 <= m.value <= 100.0 for m in cpu)
    # the memory samples: the megabytes are the percentage of this machine's memory (each rounded to 0.1)
    total_mb = psutil.virtual_memory().total / 1e6
    used = {m.step: m.value for m in history["system/system_memory_usage_megabytes"]}
    for m in history["system/system_memory_usage_percentage"]:
        assert 0 < m.value < 100 and m.value == pytest.approx(100 * used[m.step] / total_mb, abs=0.11), m
    # and near what this machine uses now (other processes come and go: within 20 points)
    assert abs(history["system/system_memory_usage_percentage"][-1].value
               - 100 * psutil.virtual_memory().used / psutil.virtual_memory().total) < 20
