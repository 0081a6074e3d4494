"""Per-task prediction parity: `probes.probe_task` against lm-eval 0.4.13's OWN tasks run end to end by
`lm_eval.simple_evaluate` (HFLM on the same tiny random Llama and tokenizer, offline), for every task of the cf-suite
that lm-eval has and each of the three tokenizer families.

lm-eval's task is its installed yaml `include`d by a temporary yaml that only points it at the fixture's local files
(the mechanism of tests/test_tasks.py, whose yaml table and RACE conversion are reused); its shots are forgetray's
standard (MMLU 5, every other task 0). One simple_evaluate call per (task, family) (MMLU: its three fixture
subjects' tasks in one call; about a second each, the file about 40 s on 2 cores), then, doc by doc, lm-eval's
logged samples (`arguments`: the requests; `filtered_resps`: the continuations' log-likelihoods; the per-doc metric
values) against probe_task's rows: the same requests, log-likelihoods to 1e-4, acc / acc_norm / mc1 correctness
and predictions exactly, mc2 values to 1e-4, and the task means with lm-eval's aggregated results. MMLU's `letter` is forgetray's on purpose (docs/methods.md §3): it is checked to
be lm-eval's " k" probability plus the bare "k" piece's.

The fixture's choices are of equal length in the acc_norm tasks (ARC, HellaSwag, OpenBookQA), where acc_norm could
not differ from acc: their eval rows are rewritten here with choices of 1 to 26 characters, and a guard checks that
length normalisation, and counting the target delimiter in the length, change some predictions.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

import task_fixtures
import tokenizer_fixtures
from forgetray import tasks
from forgetray.probes import letter_token_ids, merge_shards, probe_task, score_prompts, summarize_task
from forgetray.probes.tasks import acc_norm_prediction, mc2

lm_eval = pytest.importorskip("lm_eval")
from test_tasks import LM_TASKS, LM_YAML, eleuther_race  # noqa: E402  (the yaml table and RACE conversion)

torch.set_num_threads(1)

PARITY_TASKS = tuple(n for n in tasks.suite("cf-suite") if tasks.get(n).lm_eval_task is not None)
# Choice texts of very different lengths (words the fixture tokenizers know), for the acc_norm tasks' eval rows.
TEXTS = ("no", "a", "Oslo", "the old town of Velmar", "one two three four", "yes", "Rome and Paris", "maybe", "B",
         "the planet has three moons", "Lund", "river runs past")
N_ROWS = 20  # eval rows of each acc_norm task
ACC_NORM_TASKS = tuple(n for n in PARITY_TASKS if "acc_norm" in tasks.get(n).scores)


def lm_ids(name: str) -> list[str]:
    """The lm-eval task ids standing for forgetray task `name` (MMLU: one per fixture subject, in forgetray's order)."""
    if name == "mmlu":
        return [f"fr_mmlu_{s}" for s in tasks.get("mmlu").configs if s in task_fixtures.MMLU_SUBJECTS]
    return [f"fr_{name}"]


def varied_choices(key: str, n: int) -> list[str]:
    """n different TEXTS, drawn by a generator seeded with `key` (a str seed is hashed with sha512: reproducible)."""
    return random.Random(key).sample(TEXTS, n)


def rewrite_eval_rows(data: dict[str, Path]) -> None:
    """Rows of very different choice lengths in the acc_norm tasks' eval splits (same schema, N_ROWS rows)."""
    import datasets

    edits = {  # task -> (eval file, how row i becomes a varied-length row): every task of ACC_NORM_TASKS
        "arc_challenge": ("ARC-Challenge/test.parquet", lambda r, i: {**r, "question": f"Which {i}?", "choices": {
            "text": varied_choices(f"arc_challenge{i}", len(r["choices"]["label"])), "label": r["choices"]["label"]}}),
        "arc_easy": ("ARC-Easy/test.parquet", lambda r, i: {**r, "question": f"What is {i}?", "choices": {
            "text": varied_choices(f"arc_easy{i}", len(r["choices"]["label"])), "label": r["choices"]["label"]}}),
        "hellaswag": ("validation.parquet", lambda r, i: {**r, "ind": i, "label": str(i % 4), "ctx_a": f"Row {i}.",
                                                          "endings": varied_choices(f"hellaswag{i}", 4)}),
        "openbookqa": ("main/test.parquet", lambda r, i: {**r, "id": f"{i}-test", "question_stem": f"Pick {i}:",
                                                          "choices": {
            "text": varied_choices(f"openbookqa{i}", 4), "label": r["choices"]["label"]}}),
    }
    assert set(edits) == set(ACC_NORM_TASKS)
    for name, (rel, edit) in edits.items():
        path = data[name] / rel
        table = datasets.Dataset.from_parquet(str(path))
        rows = [edit(dict(table[i % len(table)]), i) for i in range(N_ROWS)]
        datasets.Dataset.from_list(rows, features=table.features).to_parquet(str(path))


def task_yamls(folder: Path, data: dict[str, Path]) -> None:
    """An include-yaml per lm-eval task id, pointed at the fixture's files, with forgetray's standard shots."""
    folder.mkdir()
    for name in PARITY_TASKS:
        task = tasks.get(name)
        for task_id in lm_ids(name):
            if name == "mmlu":
                subject = task_id.removeprefix("fr_mmlu_")
                yaml_rel, config_dir = f"mmlu/default/mmlu_{subject}.yaml", data[name] / subject
            else:
                yaml_rel, config = LM_YAML[name][0], task.configs[0]
                config_dir = data[name] / config if config else data[name]
            if yaml_rel.startswith("race/"):
                builder, files = "json", {"test": str(eleuther_race(config_dir, folder / f"{task_id}.jsonl"))}
            else:
                builder, files = "parquet", {p.stem: str(p) for p in sorted(config_dir.glob("*.parquet"))}
            (folder / f"{task_id}.yaml").write_text(json.dumps({  # JSON is YAML; `include` takes an absolute path
                "include": str(LM_TASKS / yaml_rel), "task": task_id, "dataset_path": builder, "dataset_name": None,
                "dataset_kwargs": {"data_files": files}, "num_fewshot": task.num_fewshot,
            }))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import datasets

    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("task-parity")
    data = task_fixtures.write_all(root / "data")
    rewrite_eval_rows(data)
    task_yamls(root / "yaml", data)
    families = {f: tokenizer_fixtures.build_family(f, root / "models") for f in tokenizer_fixtures.FAMILIES}
    return {"data": data, "yaml": root / "yaml", "families": families, "runs": {}}


def lm_eval_run(setup, name: str, family: str) -> dict:
    """lm-eval's results for forgetray task `name` on `family`'s model: one simple_evaluate call (cached, as the
    guard test reads the acc_norm tasks' runs again)."""
    if (name, family) not in setup["runs"]:
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        model, tokenizer = tokenizer_fixtures.load(setup["families"][family])
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu")
        start = time.perf_counter()
        # lm-eval adds torch's environment report to its results (pip list, compiler versions: ~0.5 CPU-s of
        # subprocesses per call, 20 calls here); nothing compared reads it, so it is left out.
        with mock.patch("lm_eval.evaluator.add_env_info", lambda results: None):
            out = lm_eval.simple_evaluate(
                model=lm, tasks=lm_ids(name), log_samples=True, bootstrap_iters=0,
                task_manager=TaskManager(include_path=str(setup["yaml"]), include_defaults=False), verbosity="ERROR")
        out["seconds"] = time.perf_counter() - start
        setup["runs"][name, family] = out
    return setup["runs"][name, family]


def lm_eval_docs(run: dict, name: str) -> list[dict]:
    """lm-eval's logged samples of forgetray task `name` in forgetray's prompt order (MMLU: subject by subject),
    each with what forgetray compares: `requests` (context, continuation) pairs, `lls` (the continuations'
    log-likelihoods after lm-eval's filters), `choices` (lm-eval's doc_to_choice strings: the continuations less
    lm-eval's own target delimiter) and `gold` (lm-eval's target as an index)."""
    out = []
    for task_id in lm_ids(name):
        delimiter = run["configs"][task_id]["target_delimiter"]
        for sample in sorted(run["samples"][task_id], key=lambda s: s["doc_id"]):
            requests = [tuple(a[:2]) for a in sample["arguments"]]
            choices = [cont.removeprefix(delimiter) for _, cont in requests]
            target = sample["target"]
            gold = target if isinstance(target, int) else choices.index(target)  # COPA's target is its choice text
            out.append({**sample, "requests": requests, "lls": [float(ll) for ll, _ in sample["filtered_resps"]],
                        "choices": choices, "gold": gold})
    return out


def lm_eval_mean(run: dict, name: str, metric: str) -> float:
    """lm-eval's mean of `metric` over the task's docs (MMLU: its subject tasks' means weighted by size, which is
    what lm-eval's `mmlu` group reports)."""
    counts = [len(run["samples"][i]) for i in lm_ids(name)]
    return sum(run["results"][i][f"{metric},none"] * n for i, n in zip(lm_ids(name), counts)) / sum(counts)


@pytest.mark.parametrize("family", tokenizer_fixtures.FAMILIES)
@pytest.mark.parametrize("name", PARITY_TASKS)
def test_probe_task_predicts_as_lm_eval(setup, name, family):
    task = tasks.get(name)
    run = lm_eval_run(setup, name, family)
    docs = lm_eval_docs(run, name)
    model, tokenizer = tokenizer_fixtures.load(setup["families"][family])
    prompts = task.load(setup["data"][name])
    frame = probe_task(model, tokenizer, task, prompts, bos="auto", batch_size=3, max_length=2048)
    assert len(frame) == len(docs) == len(prompts) and frame["index"].tolist() == list(range(len(prompts)))

    for row, prompt, doc in zip(frame.itertuples(), prompts, docs):
        assert [(prompt.context, c) for c in prompt.continuations] == doc["requests"], row.id  # the same requests
        assert row.gold == doc["gold"], row.id
        assert row.option_logprobs == pytest.approx(doc["lls"], abs=1e-4), row.id
        for score in task.scores:
            metric = "acc_norm" if score == "acc_norm" else "acc"  # mc1, mc2 and MMLU's acc are lm-eval's `acc`
            if score == "mc2":
                assert row.mc2 == pytest.approx(doc["acc"], abs=1e-4), row.id
            elif score != "letter":  # MMLU's letter: check_mmlu
                assert getattr(row, f"{score}_correct") == bool(doc[metric]), (row.id, score)
                want = (acc_norm_prediction(doc["lls"], [len(c) for c in doc["choices"]]) if score == "acc_norm"
                        else int(np.argmax(doc["lls"])))  # lm-eval's pred / pred_norm from its own lls
                assert getattr(row, f"{score}_pred") == want, (row.id, score)

    summary = summarize_task(frame, task)
    for score in task.scores:
        if score != "letter":  # mc2: its per-question values agree to 1e-4, accuracies exactly
            want = lm_eval_mean(run, name, "acc_norm" if score == "acc_norm" else "acc")
            assert summary[score] == pytest.approx(want, abs=1e-4 if score == "mc2" else 1e-12), score
    if name == "mmlu":
        check_mmlu(frame, summary, run, model, tokenizer, prompts, [d["lls"] for d in docs])

    # Sharded over two ranks and merged: the same rows.
    shards = [probe_task(model, tokenizer, task, prompts, batch_size=3, shard=(r, 2)) for r in (0, 1)]
    merged = merge_shards(shards)
    assert [len(s) for s in shards] == [(len(prompts) + 1) // 2, len(prompts) // 2]
    floats = [c for c in ("option_logprobs", "letter_probs", "mc2") if c in frame]  # batches differ: rounding
    assert merged.drop(columns=floats).equals(frame.drop(columns=floats))
    for column in floats:
        for a, b in zip(merged[column], frame[column]):
            assert a == pytest.approx(b, abs=1e-5), column


def check_mmlu(frame, summary, run, model, tokenizer, prompts, lls) -> None:
    """MMLU: each category (one fixture subject each) is its lm-eval subject task's acc; macro is their mean;
    `letter` is forgetray's merged rule, on purpose: each letter's probability is lm-eval's " k" plus the bare
    "k" piece's."""
    categories = {"abstract_algebra": "stem", "high_school_us_history": "humanities", "sociology": "social_sciences"}
    accs = {subject: run["results"][f"fr_mmlu_{subject}"]["acc,none"] for subject in categories}
    for subject, category in categories.items():
        assert summary[f"acc_{category}"] == pytest.approx(accs[subject], abs=1e-12), category
    assert summary["acc_macro"] == pytest.approx(np.mean(list(accs.values())), abs=1e-12)
    assert set(summary) == {"acc", "letter"} | {f"{s}_{c}" for s in ("acc", "letter")
                                                for c in (*categories.values(), "macro")}
    sets = letter_token_ids(tokenizer, 4)
    assert all(len(s) == 2 for s in sets)  # a spaced and a bare piece per letter in every family
    bare = score_prompts(model, tokenizer, prompts, bos="auto", answer_sets=[[s[1]] for s in sets])
    for row, theirs, b in zip(frame.itertuples(), lls, bare):
        merged = np.exp(theirs) + np.array(b.answer_probs)
        assert row.letter_probs == pytest.approx(merged.tolist(), rel=1e-4), row.id
        assert row.letter_pred == int(np.argmax(merged)) and row.letter_correct == (row.letter_pred == row.gold)


@pytest.mark.parametrize("family", tokenizer_fixtures.FAMILIES)
@pytest.mark.parametrize("name", ACC_NORM_TASKS)
def test_acc_norm_rows_can_tell_the_rules_apart(setup, name, family):
    """Guard: on the rewritten rows, for every acc_norm task and family, lm-eval's acc_norm differs from acc on some
    doc, and dividing by the continuation's length WITH the delimiter would change some acc_norm prediction, so the
    parity test above would see either mistake."""
    docs = lm_eval_docs(lm_eval_run(setup, name, family), name)
    differs_from_acc, differs_with_delimiter = 0, 0
    for doc in docs:
        lls, lengths = doc["lls"], [len(c) for c in doc["choices"]]
        norm = acc_norm_prediction(lls, lengths)
        differs_from_acc += norm != int(np.argmax(lls))
        differs_with_delimiter += norm != acc_norm_prediction(lls, [n + 1 for n in lengths])
    assert differs_from_acc > 0 and differs_with_delimiter > 0, (differs_from_acc, differs_with_delimiter)


def test_rules_by_hand():
    """Ties go to the first choice (numpy argmax, as lm-eval); mc2 equals lm-eval's own process_results_mc2, and
    stays a number where lm-eval's exp underflows (the documented difference)."""
    from lm_eval.tasks.truthfulqa.utils import process_results_mc2

    assert acc_norm_prediction([-2.0, -4.0, -1.0], [2, 4, 1]) == 0  # -1, -1, -1: a three-way tie
    assert acc_norm_prediction([-3.0, -4.0], [1, 4]) == 1
    lls = [-1.5, -0.2, -3.0, -0.7]
    doc = {"mc2_targets": {"labels": [1, 0, 1, 0]}}
    assert mc2(lls, (0, 2)) == pytest.approx(process_results_mc2(doc, [(ll, False) for ll in lls])["acc"], abs=1e-12)
    with np.errstate(all="ignore"):
        assert np.isnan(process_results_mc2(doc, [(ll - 2000, False) for ll in lls])["acc"])
    assert mc2([ll - 2000 for ll in lls], (0, 2)) == pytest.approx(mc2(lls, (0, 2)), abs=1e-9)


@pytest.mark.parametrize("name", [n for n in tasks.suite("cf-suite") if tasks.get(n).lm_eval_task is None])
def test_probe_task_runs_the_tasks_lm_eval_lacks(setup, name):
    """AX-b, AX-g, OpenBookQA-fact, CSL (OpenCompass's): no lm-eval run to compare with; probe_task scores them with
    the same rules (CSL's letters with no delimiter: " A" and "A" merged at the position after "答：")."""
    task = tasks.get(name)
    model, tokenizer = tokenizer_fixtures.load(setup["families"]["metaspace"])
    prompts = task.load(setup["data"][name])
    frame = probe_task(model, tokenizer, task, prompts, batch_size=2)
    assert frame["id"].tolist() == [p.id for p in prompts] and frame["gold"].tolist() == [p.gold for p in prompts]
    for row in frame.itertuples():
        if "acc" in task.scores:
            assert row.acc_pred == int(np.argmax(row.option_logprobs))
        if "letter" in task.scores:
            assert row.letter_pred == int(np.argmax(row.letter_probs)) and 0 < sum(row.letter_probs) <= 1
    assert set(summarize_task(frame, task)) == set(task.scores)
