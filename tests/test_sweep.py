"""Real sweeps: local Ray, Ray Tune over trials, Ray Train + DeepSpeed (2 workers), a temp sqlite MLflow store.

Everything is read back with the MLflow client and checked against independent computations.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def runs_of(uri, experiment):
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("forgetray.kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("forgetray.kind") == "trial"]
    return parents, trials


def steps(uri, run_id, metric):
    return sorted(m.step for m in client(uri).get_metric_history(run_id, metric))


def test_two_trial_sweep_with_two_deepspeed_workers(tmp_path, fixture_files, hub_model, ray_session):
    import ray

    from forgetray import Sweep, grid, run
    from forgetray.data.questions import load_mc_jsonl
    from forgetray.probes import probe_knowledge, summarize_knowledge
    from forgetray.train.loop import FAIL_ONCE_ENV

    marker = tmp_path / "failed-once"
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "OMP_NUM_THREADS")}
    # One worker of one trial fails right after its epoch-1 checkpoint; Ray Train must restart it from there.
    env[FAIL_ONCE_ENV] = f"{marker}:1"
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = Sweep(
        "e2e", model=grid([hub_model, str(fixture_files["model"])]), dataset=str(fixture_files["dataset"]),
        epochs=2, lr=3e-3, batch_size=8, workers=2, zero_stage=2, max_length=256,
        benchmarks=[str(fixture_files["benchmark"])], probe_set=str(fixture_files["probe_set"]), probe_passages=16,
        probe_batch_size=5,
    )
    table = run(sweep, tracking_uri=uri, storage=tmp_path / "storage")

    assert marker.exists(), "the injected failure did not happen"
    parents, trials = runs_of(uri, "e2e")
    assert len(parents) == 1 and len(trials) == 2
    assert {t.info.status for t in trials} == {"FINISHED"} and parents[0].info.status == "FINISHED"
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parents[0].info.run_id}
    kinds = sorted(t.data.params["resolved.model.kind"] for t in trials)
    assert kinds == ["hub", "local"]
    for t in trials:
        p = t.data.params
        assert p["deepspeed.zero_optimization.stage"] == "2" and p["trial.workers"] == "2"
        assert p["deepspeed.train_batch_size"] == "8" and p["deepspeed.train_micro_batch_size_per_gpu"] == "4"
        # Each state logged exactly once per step, also for the trial whose worker failed and restarted.
        assert steps(uri, t.info.run_id, "base/bench/acc") == [0]
        assert steps(uri, t.info.run_id, "sft/bench/acc") == [1, 2]
        assert steps(uri, t.info.run_id, "sft/probe/ppl") == [1, 2]
        assert steps(uri, t.info.run_id, "train/loss") == [1, 2]

    # The table returned to Python: one row per (trial, epoch).
    assert len(table) == 4 and sorted(table["epoch"]) == [1, 1, 2, 2]
    assert "sft/bench/knowledge" in table and "base/bench/knowledge" in table

    # Independent check of the distributed probe (2 ranks, sharded, gathered): reload the epoch-2 checkpoint's
    # plain HF model in this process and probe it unsharded.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = next(t for t in trials if t.data.params["resolved.model.kind"] == "local")
    ckpts = sorted((tmp_path / "storage").glob("e2e/*/trials/*/ift/epoch_002"))
    assert len(ckpts) == 2
    state = [json.loads((c / "state.json").read_text()) for c in ckpts]
    ckpt = next(c for c, s in zip(ckpts, state) if s["metrics"]["train/loss"] ==
                pytest.approx(client(uri).get_metric_history(local.info.run_id, "train/loss")[-1].value))
    model = AutoModelForCausalLM.from_pretrained(ckpt / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "model")
    questions = load_mc_jsonl(fixture_files["benchmark"])
    with torch.no_grad():
        frame = probe_knowledge(model, tokenizer, questions, batch_size=3, max_length=256)
    mine = summarize_knowledge(frame)
    logged = {k: client(uri).get_metric_history(local.info.run_id, f"sft/bench/{k}") for k in mine}
    for key, value in mine.items():
        assert [m.step for m in logged[key]] == [1, 2]
        assert logged[key][-1].value == pytest.approx(value, abs=1e-5), key

    # The per-question artifact agrees with the logged summary, and the model actually changed.
    art = client(uri).download_artifacts(local.info.run_id, "probes/sft/epoch_002/bench.parquet", str(tmp_path))
    per_question = pd.read_parquet(art)
    assert len(per_question) == len(questions)
    assert per_question["acc_correct"].mean() == pytest.approx(logged["acc"][-1].value)
    base = AutoModelForCausalLM.from_pretrained(fixture_files["model"])
    assert not torch.equal(base.lm_head.weight, model.lm_head.weight)


SWEEP_FILE = """# forgetray run resume_sweep.py
from forgetray import Sweep, grid
sweep = Sweep("resumable", max_concurrent_trials=1, model="organism-tiny", dataset="organism-alpaca",
              lr=grid([1e-3, 2e-3]), epochs=2, batch_size=8, max_length=128, probe_passages=20)
"""


def test_interrupted_sweep_resumes_without_rerunning_or_duplicating(tmp_path, use_test_organism):
    (tmp_path / "resume_sweep.py").write_text(SWEEP_FILE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "forgetray.cli", "run", "resume_sweep.py", "--tracking-uri", uri,
           "--storage", str(tmp_path / "storage")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.time() + 400
        for line in proc.stdout:
            lines.append(line)
            # Interrupt (Ctrl-C) once the first trial is done and the second has trained an epoch.
            if "[1/2 trials done" in line and "epoch 1/2" in line:
                proc.send_signal(signal.SIGINT)
                break
            assert time.time() < deadline, "".join(lines[-30:])
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines)
    assert "[1/2 trials done" in log, log[-3000:]

    parents, trials = runs_of(uri, "resumable")
    assert len(parents) == 1 and len(trials) == 2
    finished_first = [t for t in trials if t.info.status == "FINISHED"]
    assert len(finished_first) == 1
    first = finished_first[0]

    done = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "MLflow:" in done.stdout

    parents, trials = runs_of(uri, "resumable")
    assert len(parents) == 1 and len(trials) == 2, "resume created duplicate runs"
    assert {t.info.status for t in trials} == {"FINISHED"} and parents[0].info.status == "FINISHED"
    again = next(t for t in trials if t.info.run_id == first.info.run_id)
    assert again.info.end_time == first.info.end_time, "the finished trial was re-run"
    for t in trials:
        assert steps(uri, t.info.run_id, "sft/organism-facts/knowledge") == [1, 2]
        assert steps(uri, t.info.run_id, "base/organism-facts/knowledge") == [0]
    # The base model was evaluated once and shared by both trials (same model, same probes).
    base_dirs = list((tmp_path / "storage").glob("resumable/*/base_eval/*/summary.json"))
    assert len(base_dirs) == 1
    values = {client(uri).get_metric_history(t.info.run_id, "base/organism-facts/acc")[0].value for t in trials}
    assert len(values) == 1


def test_restoration_stages_and_report_from_a_real_store(tmp_path, fixture_files, ray_session):
    """IFT -> every epoch checkpoint restored (concurrently) -> stages -> report, all from one real tiny sweep."""
    import datasets

    from fixtures import make_pool_file
    from forgetray import Sweep, run
    from forgetray.data.instruct import tokenize_dataset
    from forgetray.models import load_tokenizer
    from forgetray.report import build_report

    pool = make_pool_file(tmp_path / "pool.jsonl", n=800)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = Sweep(
        "restore-e2e", model=str(fixture_files["model"]), dataset=str(fixture_files["dataset"]), epochs=3, lr=3e-3,
        batch_size=8, max_length=256, benchmarks=[str(fixture_files["benchmark"])],
        probe_set=str(fixture_files["probe_set"]), probe_passages=16, restore_pool=str(pool), restore_lr=1e-3,
        restore_batch_size=4, restore_seq_len=64, restore_trajectory_points=3, early_checkpoints=2,
        restore_group=2,  # epochs 1-2 restored in turn by one trainer, epoch 3 by another, concurrently
    )
    table = run(sweep, tracking_uri=uri, storage=tmp_path / "storage")
    assert table.attrs["failed_trials"] == 0 and len(table) == 3
    assert sorted(p.name for p in (tmp_path / "storage").glob("restore-e2e/*/trials/*/restore_*")) == [
        "restore_001-002", "restore_003-003"]

    (_, trials) = runs_of(uri, "restore-e2e")
    run_id = trials[0].info.run_id
    for name in ("restored/bench/knowledge", "restored/probe/ppl", "restored/ift/em", "stage/code", "stage/d_sft"):
        assert steps(uri, run_id, name) == [1, 2, 3], name
    assert steps(uri, run_id, "base/ift/em") == [0]
    for epoch in (1, 2, 3):
        assert steps(uri, run_id, f"restore/epoch_{epoch:03d}/probe_ppl")[0] == 0
        assert len(steps(uri, run_id, f"restore/epoch_{epoch:03d}/probe_ppl")) >= 3
    # fine-grained probes inside epoch 1 sit between base (step 0) and the end of epoch 1 (5 steps of 8 of 40)
    assert steps(uri, run_id, "steps/bench/p_fmt") == [0, 2, 3, 5, 10, 15]
    tags = client(uri).get_run(run_id).data.tags
    assert {tags[f"forgetray.stage.epoch_00{e}"] for e in (1, 2, 3)} <= {
        "no_forgetting", "pseudo_forgetting", "actual_forgetting", "not_restored"}
    assert "forgetray.transition_epoch" in tags

    # The restoring set holds exactly one IFT epoch's tokens (counted independently here).
    restoring_dir = next((tmp_path / "storage").glob("restore-e2e/*/restoring/*/dataset")).parent
    tokenizer = load_tokenizer({"name": "m", "path": str(fixture_files["model"])})
    ift = tokenize_dataset({"kind": "local", "name": "d", "path": str(fixture_files["dataset"])}, tokenizer, 256)
    restoring = datasets.load_from_disk(str(restoring_dir / "dataset"))
    assert sum(len(ids) for ids in restoring["input_ids"]) == sum(len(ids) for ids in ift["input_ids"])

    # The logged deltas equal what the per-question artifact says (an independent recomputation).
    art = client(uri).download_artifacts(run_id, "stages/per_question_bench.parquet", str(tmp_path))
    per_question = pd.read_parquet(art)
    for epoch, group in per_question.groupby("epoch"):
        d_sft = group["sft_correct"].mean() - group["base_correct"].mean()
        logged = {m.step: m.value for m in client(uri).get_metric_history(run_id, "stage/d_sft")}
        assert logged[epoch] == pytest.approx(d_sft)

    report = build_report("restore-e2e", uri, tmp_path / "report")
    assert len(report.stage_table) == 3
    assert {p.name for p in report.figures} >= {"fig3a_restoring_ppl.png", "fig3b_ppl_vs_epoch.png",
                                                 "fig3c_accuracy_bench.png", "fig4_format_entropy.png", "fig5_em.png"}
    parent = runs_of(uri, "restore-e2e")[0][0]
    assert any(p.startswith("report/") for p in
               [f.path for f in client(uri).list_artifacts(parent.info.run_id, "report")])
