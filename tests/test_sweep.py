"""Real sweeps: local Ray, Ray Tune over trials, Ray Train + DeepSpeed (2 workers), a temp sqlite MLflow store.

Everything is read back with the MLflow client and checked against independent computations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import local_ray
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


# The Stanford Alpaca prompt templates, written out here (not imported) for the independent token count.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_epoch_tokens(path, tokenizer, max_length):
    """Tokens in one IFT epoch of an Alpaca JSONL file: per example [BOS] + prompt ids + response ids + [EOS]
    (prompt and response tokenized separately), cut to max_length; examples left without a response token (the
    response's ids and its EOS) are dropped."""
    total = 0
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        template = ALPACA_WITH_INPUT if record.get("input") else ALPACA_NO_INPUT
        prompt = tokenizer(template.format(instruction=record["instruction"], input=record.get("input", "")),
                           add_special_tokens=False)["input_ids"]
        response = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        ids = [tokenizer.bos_token_id] + prompt + response + [tokenizer.eos_token_id]
        if 1 + len(prompt) >= max_length:
            continue  # nothing of the response (nor its EOS) survives the cut
        total += min(len(ids), max_length)
    return total


def exact_mcnemar(reference, other):
    """Two-sided exact McNemar test of `other` against `reference` (per-question correctness): an exact binomial
    test of the discordant pairs against Binomial(n_discordant, 1/2). Returns (p, acc(other) - acc(reference))."""
    reference, other = [bool(x) for x in reference], [bool(x) for x in other]
    gained = sum(1 for r, o in zip(reference, other) if not r and o)
    lost = sum(1 for r, o in zip(reference, other) if r and not o)
    n = gained + lost
    if n == 0:
        return 1.0, 0.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1))
    return min(1.0, 2 * tail / 2**n), (gained - lost) / len(reference)


N_QUESTIONS = 40  # the restoration test's benchmark
STAGE_CODE = {"not_restored": -1, "no_forgetting": 0, "pseudo_forgetting": 1, "actual_forgetting": 2}
MARGIN_CODE = {"inconclusive": -2, **STAGE_CODE}


def expected_stage(base, sft, restored, base_ppl, restored_ppl, alpha=0.05, ppl_tolerance=0.05):
    """docs/methods.md §4 / README step 8, recomputed: not restored if R_e's probing PPL exceeds (1 + tol) x base's;
    else actual if R_e dropped, pseudo if only SFT_e dropped, no otherwise (drop = lower accuracy and p < alpha)."""
    p_sft, d_sft = exact_mcnemar(base, sft)
    p_restored, d_restored = exact_mcnemar(base, restored)
    if not restored_ppl <= (1 + ppl_tolerance) * base_ppl:  # a nan perplexity is not restored either
        stage = "not_restored"
    elif d_restored < 0 and p_restored < alpha:
        stage = "actual_forgetting"
    elif d_sft < 0 and p_sft < alpha:
        stage = "pseudo_forgetting"
    else:
        stage = "no_forgetting"
    return stage, p_sft, p_restored


def test_two_trial_sweep_with_two_deepspeed_workers(tmp_path, fixture_files, hub_model, ray_session):

    from forgetray import Sweep, grid, run
    from forgetray.data.questions import load_mc_jsonl
    from forgetray.probes import probe_knowledge, summarize_knowledge
    from forgetray.train.worker import FAIL_ONCE_ENV

    marker = tmp_path / "failed-once"
    # One worker of one trial fails right after its epoch-1 checkpoint; Ray Train must restart it from there.
    fail_once = {FAIL_ONCE_ENV: f"{marker}:1"}
    local_ray(fail_once)

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
    # Tune's default loggers are off (MLflow has the metrics): no TensorBoard event files, no result.json
    tune_dir = next((tmp_path / "storage").glob("e2e/*/tune"))
    assert not list(tune_dir.rglob("events.out.tfevents*")) and not list(tune_dir.rglob("result.json"))
    state = [json.loads((c / "state.json").read_text()) for c in ckpts]
    ckpt = next(c for c, s in zip(ckpts, state) if s["metrics"]["train/loss"] ==
                pytest.approx(client(uri).get_metric_history(local.info.run_id, "train/loss")[-1].value))
    model = AutoModelForCausalLM.from_pretrained(ckpt / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "model")
    questions = load_mc_jsonl(fixture_files["benchmark"])
    with torch.no_grad():
        frame = probe_knowledge(model, tokenizer, questions, batch_size=3, max_length=256, bos="auto")
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


def test_restoration_stages_and_report_from_a_real_store(tmp_path, fixture_files, ray_session):
    """IFT -> every epoch checkpoint restored (concurrently) -> stages -> report, all from one real tiny sweep."""
    import datasets
    from fixtures import make_benchmark_file, make_pool_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgetray import Sweep, run
    from forgetray.data.questions import load_mc_jsonl
    from forgetray.probes import probe_knowledge
    from forgetray.report import build_report

    pool = make_pool_file(tmp_path / "pool.jsonl", n=800)
    # A benchmark the base model answers (its own letter predictions are the answers), so that fine-tuning can
    # make it forget significantly and the stage rule has drops to judge (a random model's 25% cannot drop).
    benchmark = make_benchmark_file(tmp_path / "bench.jsonl", n=N_QUESTIONS)
    base_model = AutoModelForCausalLM.from_pretrained(fixture_files["model"]).eval()
    with torch.no_grad():
        base_frame = probe_knowledge(base_model, AutoTokenizer.from_pretrained(fixture_files["model"]),
                                     load_mc_jsonl(benchmark), batch_size=5, max_length=256, bos="auto")
    records = [json.loads(line) for line in benchmark.read_text().splitlines()]
    for record, predicted in zip(records, base_frame.sort_values("index")["letter_pred"]):
        record["answer"] = int(predicted)
    benchmark.write_text("".join(json.dumps(r) + "\n" for r in records))
    local_ray()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = Sweep(
        "restore-e2e", model=str(fixture_files["model"]), dataset=str(fixture_files["dataset"]), epochs=3, lr=3e-3,
        batch_size=8, max_length=256, benchmarks=[str(benchmark)],
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
    logged = {name: {m.step: m.value for m in client(uri).get_metric_history(run_id, name)}
              for name in ("sft/probe/ppl", "restored/probe/ppl", "restored/train/steps")}
    for epoch in (1, 2, 3):
        trajectory = {m.step: m.value for m in client(uri).get_metric_history(
            run_id, f"restore/probe_ppl/epoch_{epoch:03d}")}
        last = int(logged["restored/train/steps"][epoch])
        assert sorted(trajectory) == sorted({round(i * last / 3) for i in range(4)}), trajectory
        # its ends are the checkpoints' own probes: SFT_e before the first step, R_e after the last
        assert trajectory[0] == logged["sft/probe/ppl"][epoch] and trajectory[last] == logged["restored/probe/ppl"][epoch]
    # fine-grained probes inside epoch 1 sit between base (step 0) and the end of epoch 1 (5 steps of 8 of 40)
    assert steps(uri, run_id, "steps/bench/p_fmt") == [0, 2, 3, 5, 10, 15]
    tags = client(uri).get_run(run_id).data.tags
    assert tags["forgetray.stage_benchmark"] == "bench"

    # The restoring set holds exactly one IFT epoch's tokens, counted here from the JSONL with the HF tokenizer.
    restoring_dir = next((tmp_path / "storage").glob("restore-e2e/*/restoring/*/dataset")).parent
    tokenizer = AutoTokenizer.from_pretrained(fixture_files["model"])
    ift_tokens = alpaca_epoch_tokens(fixture_files["dataset"], tokenizer, max_length=256)
    restoring = datasets.load_from_disk(str(restoring_dir / "dataset"))
    assert ift_tokens > 0 and sum(len(ids) for ids in restoring["input_ids"]) == ift_tokens
    assert json.loads((restoring_dir / "summary.json").read_text())["budget"] == ift_tokens

    # Every checkpoint's test-variant stage, recomputed from the per-question artifact and the logged probing PPLs
    # with the rule written above (no forgetray code): stage/test_code and the p-values agree. The headline (margin
    # rule, stage/code and the tags) is checked where it is deterministic: its estimates by hand, its intervals
    # around them, its precondition two-sided against R_0's PPL, and the transition tag from its own stages.
    art = client(uri).download_artifacts(run_id, "stages/per_question_bench.parquet", str(tmp_path))
    per_question = pd.read_parquet(art)
    history = {name: {m.step: m.value for m in client(uri).get_metric_history(run_id, name)} for name in (
        "base/probe/ppl", "restored/probe/ppl", "base/bench/knowledge", "sft/bench/knowledge",
        "restored/bench/knowledge", "stage/code", "stage/d_sft", "stage/d_restored", "stage/p_sft",
        "stage/p_restored", "stage/test_code", "stage/drop", "stage/drop_low", "stage/drop_high", "stage/residual",
        "stage/residual_low", "stage/residual_high", "control/probe/ppl", "control/bench/knowledge")}
    base_ppl = history["base/probe/ppl"][0]
    mine, margins = {}, {}
    assert sorted(per_question["epoch"].unique()) == [1, 2, 3]
    for epoch, group in per_question.groupby("epoch"):
        group = group.sort_values("index")
        assert len(group) == N_QUESTIONS and group["index"].is_unique  # every question of the benchmark, once
        base, sft, restored, control = (group[c].astype(bool).tolist() for c in (
            "base_correct", "sft_correct", "restored_correct", "control_correct"))
        # the artifact's columns are the states' logged primary scores
        for state, correct in (("base", base), ("sft", sft), ("restored", restored), ("control", control)):
            logged = history[f"{state}/bench/knowledge"][0 if state in ("base", "control") else epoch]
            assert logged == pytest.approx(sum(correct) / len(correct)), (state, epoch)
        stage, p_sft, p_restored = expected_stage(base, sft, restored, base_ppl, history["restored/probe/ppl"][epoch])
        mine[epoch] = stage
        assert history["stage/test_code"][epoch] == STAGE_CODE[stage], epoch
        n = len(base)
        assert history["stage/drop"][epoch] == pytest.approx((sum(base) - sum(sft)) / n)
        assert history["stage/residual"][epoch] == pytest.approx((sum(control) - sum(restored)) / n)
        for key in ("drop", "residual"):
            assert history[f"stage/{key}_low"][epoch] <= history[f"stage/{key}"][epoch] <= \
                history[f"stage/{key}_high"][epoch]
        headline = tags[f"forgetray.stage.epoch_{epoch:03d}"]
        assert history["stage/code"][epoch] == MARGIN_CODE[headline], epoch
        ratio = history["restored/probe/ppl"][epoch] / history["control/probe/ppl"][0]
        assert (headline == "not_restored") == (abs(ratio - 1) > 0.05), (epoch, ratio)
        margins[epoch] = headline
        assert history["stage/d_sft"][epoch] == pytest.approx((sum(sft) - sum(base)) / len(base))
        assert history["stage/d_restored"][epoch] == pytest.approx((sum(restored) - sum(base)) / len(base))
        assert history["stage/p_sft"][epoch] == pytest.approx(p_sft, rel=1e-12)
        assert history["stage/p_restored"][epoch] == pytest.approx(p_restored, rel=1e-12)
    # the benchmark gives the rule drops to judge (with no drop at all, most mistakes in the rule would pass)
    assert set(mine.values()) - {"no_forgetting", "not_restored"}, mine
    actual = [e for e, stage in sorted(margins.items()) if stage == "actual_forgetting"]
    assert tags["forgetray.transition_epoch"] == (str(actual[0]) if actual else "none")

    report = build_report("restore-e2e", uri, tmp_path / "report")
    assert len(report.stage_table) == 3
    assert {p.name for p in report.figures} >= {"fig3a_restoring_ppl.png", "fig3b_ppl_vs_epoch.png",
                                                 "fig3c_accuracy_bench.png", "fig4_format_entropy.png", "fig5_em.png"}
    parent = runs_of(uri, "restore-e2e")[0][0]
    assert any(p.startswith("report/") for p in
               [f.path for f in client(uri).list_artifacts(parent.info.run_id, "report")])
    # The trial's run ended by storing its whole metric history as one table (issue 19): the report read it in one
    # download, and it holds what MLflow returns key by key.
    from forgetray.report.history import history_of
    from forgetray.tracking import Tracker
    from forgetray.tracking_history import HISTORY_ARTIFACT, TAG_HISTORY, forgetray_keys

    assert not [note for note in report.notes if "one key at a time" in note]
    tracker = Tracker(uri)
    for run in runs_of(uri, "restore-e2e")[1]:
        (tmp_path / "history" / run.info.run_id).mkdir(parents=True)
        table = pd.read_parquet(tracker.download_artifacts(run.info.run_id, HISTORY_ARTIFACT,
                                                           tmp_path / "history" / run.info.run_id))
        keys = forgetray_keys(run.data.metrics)
        assert run.data.tags[TAG_HISTORY] == str(len(table)) and len(keys) > 20
        assert history_of(table, keys) == tracker.metric_history(run.info.run_id, keys)
