"""scripts/quickstart_docs.py: the README's quickstart block is the margin rule's pooled table read back per replicate
and per checkpoint, for the execution on the sweep file's seeds and for its out-of-sample rerun (seeds 3-5), found
in MLflow by their parent runs' `sweep.*` params; the block between the markers is what gets replaced, and
--print-only leaves the README and docs/ alone."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quickstart_docs.py"
LABEL = "model=organism-tiny, dataset=organism-alpaca"


def _module():
    spec = importlib.util.spec_from_file_location("quickstart_docs_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves its annotations through it
    spec.loader.exec_module(module)
    return module


def _row(epoch, stage, at, replicate_stages, agreeing, restored, knowledge, drop, residual, mcnemar):
    """A pooled-table row as forgetray.report.pooled writes it (the columns the script reads)."""
    row = {"group": "g1", "label": f"{LABEL} (seeds 0,1,2)", "epoch": epoch, "seeds": "0,1,2", "stage": stage,
           "replicate_stages": replicate_stages, "agreeing": agreeing, "restored": restored, "margin": 0.02,
           "level": 1 - 0.05 / 2, "stage_mcnemar": mcnemar, "transition_pooled": 2, "transition_median": 2.0,
           "transition_low": 2.0, "transition_high": 3.0, "transition_reached": "2/3",
           **{f"stage_at_{m}": stage for m in ("0.01", "0.02", "0.05")}, **at}
    for state, value in zip(("base", "control", "sft", "restored"), knowledge):
        row[f"knowledge_{state}_mean"], row[f"knowledge_{state}_sd"] = value, 0.0
    for key, (estimate, low, high) in (("drop", drop), ("residual", residual)):
        row.update({key: estimate, f"{key}_low": low, f"{key}_high": high})
    return row


POOLED = pd.DataFrame([  # in epoch order 2, 1: the script sorts
    _row(2, "actual_forgetting", {"stage_at_0.05": "inconclusive"}, "actual,inconclusive,actual", "2/3", "3/3",
         (1.0, 0.99, 0.80, 0.95), (0.20, 0.15, 0.25), (0.04, 0.03, 0.06), "actual_forgetting"),
    _row(1, "pseudo_forgetting", {}, "pseudo,pseudo,not restored", "2/3", "2/3", (1.0, 0.99, 0.90, 0.99),
         (0.10, 0.07, 0.13), (0.0, -0.01, 0.01), "not_restored"),
])


def test_each_replicates_sequence_is_read_across_the_checkpoints():
    docs = _module()
    (row,) = docs.summary_rows(POOLED)
    assert row["epochs"] == "1 2" and row["seeds"] == ["0", "1", "2"]
    assert row["replicates"] == ["P A", "P ?", "x A"]  # seed 1 inconclusive at epoch 2; seed 2 not restored at 1
    assert row["pooled"] == "P A" and row["agreeing"] == "2 2" and row["restored"] == "2 3"
    assert row["transition"] == "2" and row["replicates transition"] == "2, 2-3 (2/3 reached actual)"
    table = docs.summary_markdown([row])
    assert "| seed 0 | seed 1 | seed 2 |" in table
    assert f"| {LABEL} | 1 2 | P A | P ? | x A | P A | 2 2 | 2 | 2, 2-3 (2/3 reached actual) | 2 3 |" in table


def test_the_checkpoint_table_has_r0_the_intervals_and_the_verdicts_at_each_margin():
    docs = _module()
    rows = docs.checkpoint_rows(POOLED)
    table = docs.checkpoint_markdown(rows)
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert lines == [
        f"| {LABEL} | 1 | pseudo (2/3) | 1.000 | 0.990 | 0.900 | 0.990 | +0.100 [+0.070, +0.130] | "
        "+0.000 [-0.010, +0.010] | P/P/P | not restored |",
        "|  | 2 | actual (2/3) | 1.000 | 0.990 | 0.800 | 0.950 | +0.200 [+0.150, +0.250] | +0.040 [+0.030, +0.060] | "
        "A/A/? | actual |",
    ]
    assert "| base | R_0 | SFT_e | R_e |" in table and "McNemar variant" in table


def _parent(run_id: str, seed: int | None, start: int, **settings: str):
    params = {"sweep.name": "quickstart", "sweep.replicates": "3", "sweep.settings.epochs": "4",
              **{f"sweep.settings.{k}": v for k, v in settings.items()}}
    if seed is not None:
        params["sweep.settings.seed"] = str(seed)
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, start_time=start), data=SimpleNamespace(params=params))


def test_the_out_of_sample_execution_is_found_by_its_seeds():
    """In sample: the newest execution on the sweep file's first seed (0); out of sample: the newest execution of
    the same sweep (every other sweep.* param equal) whose seeds share none with it."""
    docs = _module()
    runs = [  # newest first, as Tracker.sweep_runs returns them
        _parent("smoke-3", 3, 9, epochs="1"),  # a smoke test on seeds 3-5: another sweep
        _parent("overlap", 2, 8),  # seeds 2-4 share seed 2 with 0-2
        _parent("rerun", 3, 7),
        _parent("in", 0, 6),
        _parent("older-rerun", 4, 5),
        _parent("old", 0, 4),
        _parent("before-params", None, 3),  # a sweep run that did not log its seed
    ]
    chosen, rerun = docs.find_executions(runs, 0)
    assert (chosen.info.run_id, rerun.info.run_id) == ("in", "rerun")
    chosen, rerun = docs.find_executions(runs, 0, "old")  # --run: its out of sample is still the newest rerun
    assert (chosen.info.run_id, rerun.info.run_id) == ("old", "rerun")
    chosen, rerun = docs.find_executions(runs[3:], 0)
    assert (chosen.info.run_id, rerun.info.run_id) == ("in", "older-rerun")
    assert docs.find_executions(runs[5:], 0)[1] is None and docs.find_executions(runs[6:], 0) == (None, None)
    execution = docs._execution(runs[2])
    assert (execution.seeds, execution.replicates) == ("3-5", 3)
    with pytest.raises(SystemExit, match="not an execution"):
        docs.find_executions(runs, 0, "nope")


# --- end to end on an MLflow store: two executions of `quickstart`, seeds 0-2 and 3-5 -----------------------------

QUESTIONS = 10
# per first seed: per epoch how many of the 10 questions SFT_e loses and R_e loses (base and R_0 answer all of them)
LOST = {0: {1: (5, 0), 2: (5, 5)},  # pseudo, then actual forgetting
        3: {1: (0, 0), 2: (5, 0)}}  # no forgetting, then pseudo


def _fill(uri: str, root: Path) -> dict[int, str]:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment("quickstart", artifact_location=(root / "artifacts").as_uri())
    now, parents = int(time.time() * 1000), {}
    # oldest to newest: seeds 0-2, their rerun on 3-5, and a smoke run on 6-8 with other settings (not the rerun)
    for k, (first, epochs) in enumerate(((0, "2"), (3, "2"), (6, "1"))):
        parent = client.create_run(experiment, start_time=now + 1000 * k, tags={"forgetray.kind": "sweep"}).info.run_id
        client.log_batch(parent, params=[Param("sweep.name", "quickstart"), Param("sweep.replicates", "3"),
                                         Param("sweep.settings.seed", str(first)),
                                         Param("sweep.settings.epochs", epochs)])
        client.set_terminated(parent)
        parents[first] = parent
        for seed in range(first, first + 3) if first in LOST else []:
            run = client.create_run(experiment, tags={"forgetray.kind": "trial", "mlflow.parentRunId": parent,
                                                      "forgetray.trial": f"t.s{seed}",
                                                      "forgetray.replicate_group": "g"}).info.run_id
            index = np.arange(QUESTIONS)
            frame = pd.concat([pd.DataFrame({"epoch": epoch, "index": index, "base_correct": True,
                                             "sft_correct": index >= sft, "restored_correct": index >= restored,
                                             "control_correct": True})
                               for epoch, (sft, restored) in LOST[first].items()], ignore_index=True)
            metrics = [("base/facts/knowledge", 1.0, 0), ("control/facts/knowledge", 1.0, 0),
                       ("base/probe/ppl", 4.0, 0), ("control/probe/ppl", 3.0, 0)]
            for epoch, rows in frame.groupby("epoch"):
                metrics += [(f"{state}/facts/knowledge", rows[f"{state}_correct"].mean(), epoch)
                            for state in ("sft", "restored")]
                metrics += [("sft/probe/ppl", 9.0, epoch), ("restored/probe/ppl", 3.0, epoch)]
            client.log_batch(run, metrics=[Metric(n, float(v), now, int(s)) for n, v, s in metrics],
                             params=[Param("trial.seed", str(seed)), Param("trial.benchmarks", "['facts']")])
            path = root / "tmp" / f"{first}-{seed}" / "per_question_facts.parquet"
            path.parent.mkdir(parents=True)
            frame.to_parquet(path)
            client.log_artifact(run, str(path), "stages")
            client.set_terminated(run)
    return parents


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return {"uri": uri, "parents": _fill(uri, root)}


def test_print_only_prints_both_tables_and_leaves_readme_and_docs_alone(store, tmp_path, capsys):
    docs = _module()
    readme, results = docs.README.read_bytes(), (docs.DOCS / "results.md").read_bytes()
    assert docs.main(["--tracking-uri", store["uri"], "--print-only", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert docs.README.read_bytes() == readme and (docs.DOCS / "results.md").read_bytes() == results
    in_sample, out_of_sample = printed.split("**Out of sample")
    assert "**The quickstart (seeds 0-2" in in_sample and "| P A |" in in_sample  # pooled: pseudo, then actual
    assert "+0.500 [+" in in_sample and "| 1.000 | 1.000 | 0.500 | 1.000 |" in in_sample  # base, R_0, SFT_1, R_1
    assert out_of_sample.startswith(" (seeds 3-5") and "| n P |" in out_of_sample and "seed 3 |" in out_of_sample
    assert (tmp_path / "out" / "pooled_stage_table.csv").is_file()
    assert (tmp_path / "out" / "out_of_sample" / "pooled_stage_table.csv").is_file()


def test_the_block_and_results_are_written(store, tmp_path, monkeypatch):
    docs = _module()
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{docs.START}\nold block\n{docs.END}\nafter\n")
    monkeypatch.setattr(docs, "README", readme)
    monkeypatch.setattr(docs, "DOCS", tmp_path / "docs")
    monkeypatch.setattr(docs, "machine", lambda: "a machine")
    (tmp_path / "docs").mkdir()
    assert docs.main(["--tracking-uri", store["uri"]]) == 0
    text = readme.read_text()
    assert text.startswith(f"before\n{docs.START}\nMeasured by `make quickstart` on a machine")
    assert "old block" not in text and text.endswith(f"{docs.END}\nafter\n")
    assert "**The quickstart (seeds 0-2" in text and "**Out of sample (seeds 3-5" in text
    results = (tmp_path / "docs" / "results.md").read_text()
    assert results.count("forgetray report: experiment 'quickstart'") == 2  # both executions' reports
    assert (tmp_path / "docs" / "out_of_sample" / "stage_table.txt").is_file()


def test_the_block_says_when_the_out_of_sample_rerun_is_absent():
    docs = _module()
    execution = docs.Execution("r", 0, 3, "2026-12-07")
    text = docs.block((execution, POOLED), None, "3-5", "a machine")
    assert "**The quickstart (seeds 0-2, run 2026-12-07)**" in text
    assert text.rstrip().endswith("**Out of sample (seeds 3-5)**: no execution in this store "
                                  "(`forgetray run sweeps/quickstart.py --set seed=3`).")
    assert "at delta = 0.02" in text and "0.975" in text  # the margin and the intervals' level, from the table
