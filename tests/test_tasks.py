"""forgetray.tasks: prompt parity with lm-eval 0.4.13's own tasks, doc by doc, on tiny hub-schema fixtures; the
OpenCompass-defined tasks against their templates; MMLU's and CF's aggregations by hand; loaders and specs.

Parity mechanism: for each task lm-eval has, a yaml written to a temporary folder `include`s the INSTALLED task yaml
(lm_eval/tasks/...) by absolute path, so lm-eval's own doc_to_text/doc_to_choice/doc_to_target/process_docs/
description/fewshot_config (and its `!function` utils, resolved next to the included file) are used unchanged, and
overrides only the data: `dataset_path: parquet` (or json), `dataset_name: null`, `dataset_kwargs.data_files` = the
fixture's split files, plus `num_fewshot`. `TaskManager(include_path=that folder, include_defaults=False)` loads it;
`build_all_requests` builds lm-eval's multiple-choice requests (context, continuation) with the fewshot seed
simple_evaluate uses (1234). No model, no network (HF_*_OFFLINE=1 from conftest).
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

import task_fixtures
from forgetray import tasks
from forgetray.tasks import mmlu

lm_eval = pytest.importorskip("lm_eval")
LM_TASKS = Path(lm_eval.__file__).parent / "tasks"

# forgetray task -> (installed lm-eval yaml, num_fewshot used in the parity run). Few-shot runs on the 0-shot tasks
# check the seeded default sampler too (RACE's shots come from its eval split: the doc itself is left out).
LM_YAML = {
    "arc_challenge": ("arc/arc_challenge.yaml", 2), "arc_easy": ("arc/arc_easy.yaml", 0),
    "hellaswag": ("hellaswag/hellaswag.yaml", 1), "boolq": ("super_glue/boolq/default.yaml", 1),
    "rte": ("super_glue/rte/default.yaml", 0), "copa": ("super_glue/copa/default.yaml", 0),
    "siqa": ("siqa/siqa.yaml", 2), "openbookqa": ("openbookqa/openbookqa.yaml", 0),
    "race_middle": ("race/race.yaml", 0), "race_high": ("race/race.yaml", 1),
    "truthfulqa_mc1": ("truthfulqa/truthfulqa_mc1.yaml", 1), "truthfulqa_mc2": ("truthfulqa/truthfulqa_mc2.yaml", 0),
}
OPENCOMPASS_ONLY = ("ax_b", "ax_g", "openbookqa_fact", "csl")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    import datasets

    datasets.disable_progress_bars()
    return task_fixtures.write_all(tmp_path_factory.mktemp("task-data"))


def eleuther_race(directory: Path, out: Path) -> Path:
    """EleutherAI/race's article-level rows (what lm-eval's race.yaml reads) from ehovy/race question rows,
    grouped independently of forgetray's race_docs: consecutive rows of one article form its `problems` list."""
    import pandas

    rows = pandas.read_parquet(directory / "test.parquet").to_dict("records")
    with out.open("w") as f:
        for article, group in itertools.groupby(rows, key=lambda r: r["article"]):
            problems = [{"answer": r["answer"], "options": list(r["options"]), "question": r["question"]} for r in group]
            f.write(json.dumps({"article": article, "problems": str(problems)}) + "\n")
    return out


def lm_eval_requests(tmp: Path, yaml_rel: str, config_dir: Path, shots: int, task_id: str) -> list[dict]:
    """lm-eval's own requests for its task `yaml_rel` on the local files of `config_dir`: per doc, in order,
    {"context", "continuations", "gold", "doc"}."""
    from lm_eval.tasks import TaskManager

    if yaml_rel.startswith("race/"):
        builder, files = "json", {"test": str(eleuther_race(config_dir, tmp / f"{task_id}-race.jsonl"))}
    else:
        builder, files = "parquet", {p.stem: str(p) for p in sorted(config_dir.glob("*.parquet"))}
    folder = tmp / f"yaml-{task_id}"
    folder.mkdir()
    (folder / f"{task_id}.yaml").write_text(json.dumps({  # JSON is YAML; `include` takes an absolute path
        "include": str(LM_TASKS / yaml_rel), "task": task_id, "dataset_path": builder, "dataset_name": None,
        "dataset_kwargs": {"data_files": files}, "num_fewshot": shots,
    }))
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    task = manager.load([task_id])["tasks"][task_id]
    task.set_fewshot_seed(seed=1234)  # what simple_evaluate does with its default fewshot_random_seed
    task.build_all_requests(limit=None)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    out = []
    for doc_id in sorted(by_doc):
        insts = sorted(by_doc[doc_id], key=lambda i: i.idx)
        contexts = {i.arguments[0] for i in insts}
        assert len(contexts) == 1, "one context per multiple-choice doc"
        doc = insts[0].doc
        target = task.doc_to_target(doc)
        out.append({"context": contexts.pop(), "continuations": tuple(i.arguments[1] for i in insts),
                    "gold": target if isinstance(target, int) else task.doc_to_choice(doc).index(target), "doc": doc})
    return out


def mismatches(prompts, requests) -> list[str]:
    """Where forgetray's prompts and lm-eval's requests differ, doc by doc (empty: byte-identical)."""
    if len(prompts) != len(requests):
        return [f"{len(prompts)} prompts vs {len(requests)} lm-eval docs"]
    bad = []
    for p, r in zip(prompts, requests):
        for what, ours, theirs in (("context", p.context, r["context"]), ("continuations", p.continuations,
                                   r["continuations"]), ("gold", p.gold, r["gold"])):
            if ours != theirs:
                bad.append(f"doc {p.id} {what}: {ours!r} != {theirs!r}")
    return bad


@pytest.mark.parametrize("name", sorted(LM_YAML))
def test_prompts_match_lm_eval_doc_by_doc(name, data, tmp_path):
    task = tasks.get(name)
    yaml_rel, shots = LM_YAML[name]
    requests = lm_eval_requests(tmp_path, yaml_rel, data[name] / str(task.configs[0]) if task.configs[0] else data[name],
                                shots, f"forgetray_{name}")
    prompts = task.load(data[name], num_fewshot=shots)
    assert mismatches(prompts, requests) == []
    if name == "truthfulqa_mc2":  # MC2's true set: the labels lm-eval's process_results_mc2 sums over
        assert [p.true_set for p in prompts] == [
            tuple(i for i, x in enumerate(r["doc"]["mc2_targets"]["labels"]) if x == 1) for r in requests]


def test_mmlu_matches_lm_eval_5_shot_per_subject(data, tmp_path):
    prompts = tasks.get("mmlu").load(data["mmlu"])
    assert [p.subject for p in prompts] == [s for s in mmlu.SUBJECTS if s in task_fixtures.MMLU_SUBJECTS for _ in range(3)]
    for subject in task_fixtures.MMLU_SUBJECTS:
        requests = lm_eval_requests(tmp_path, f"mmlu/default/mmlu_{subject}.yaml", data["mmlu"] / subject, 5,
                                    f"forgetray_mmlu_{subject}")
        ours = [p for p in prompts if p.subject == subject]
        assert mismatches(ours, requests) == []
        # shared-prefix reuse: one prefix per subject = description + the first 5 dev examples (the 6th is unused)
        assert len({p.prefix for p in ours}) == 1
        prefix = ours[0].prefix
        assert prefix.startswith(f"The following are multiple choice questions (with answers) about "
                                 f"{subject.replace('_', ' ')}.\n\ndev question 0 on {subject}?\nA. ")
        assert prefix.endswith("\nAnswer: " + "ABCD"[(4 + task_fixtures.MMLU_SUBJECTS.index(subject)) % 4] + "\n\n")
        assert prefix.count("\nAnswer: ") == 5 and "dev question 5" not in prefix
        assert all(p.query.startswith("test question") and p.query.endswith("\nAnswer:") for p in ours)


def test_parity_check_fails_on_a_changed_delimiter(data, tmp_path):
    """The comparison can fail: the same task with one delimiter changed no longer matches lm-eval."""
    task = tasks.get("boolq")
    requests = lm_eval_requests(tmp_path, "super_glue/boolq/default.yaml", data["boolq"] / "boolq", 0, "fr_boolq")
    broken = dataclasses.replace(task, target_delimiter="\n")
    assert any("continuations" in m for m in mismatches(broken.load(data["boolq"]), requests))


def test_openbookqa_fact_differs_from_lm_eval_openbookqa_only_by_the_fact_prompt(data, tmp_path):
    """Documented difference: CF's OpenBookQA-fact (OpenCompass) prompts with fact1; lm-eval's openbookqa with the
    bare stem. On the same 'additional' rows both score the same continuations against the same gold."""
    ours = tasks.get("openbookqa_fact").load(data["openbookqa_fact"])
    theirs = lm_eval_requests(tmp_path, "openbookqa/openbookqa.yaml", data["openbookqa_fact"] / "additional", 0,
                              "fr_obqa_additional")
    for p, r in zip(ours, theirs, strict=True):
        assert (p.continuations, p.gold) == (r["continuations"], r["gold"])
        assert p.context == f"We know the fact that {r['doc']['fact1']}.\nQuestion: {r['context']}\n\nAnswer:"


def test_opencompass_tasks_render_their_templates(data):
    """AX-b, AX-g, CSL have no lm-eval task: checked against the OpenCompass templates written out by hand."""
    p = tasks.get("ax_b").load(data["ax_b"])[1]
    assert p.context == ("The sentence1 number 1 of axb test.\nThe sentence2 number 1 of axb test.\n"
                         "Is the sentence below entailed by the sentence above?")
    assert (p.continuations, p.gold) == (("\nYes", "\nNo"), 1)  # label 1 = not_entailment
    g = tasks.get("ax_g").load(data["ax_g"])[0]
    assert g.query.startswith("The premise number 0 of axg test.\nThe hypothesis number 0 of axg test.\n") and g.gold == 0
    c = tasks.get("csl").load(data["csl"])[1]
    assert c.query.endswith("摘要：本文研究了validation问题1。\n关键词：问题，方法1\n请问上述关键词是否匹配摘要且符合要求？\n"
                            "A. 否\nB. 是\n请从”A“，”B“中进行选择。\n答：")
    assert (c.continuations, c.gold, c.prefix) == (("A", "B"), 1, "")


def test_every_task_loads_from_its_fixture_and_has_a_source(data):
    for name in tasks.names():
        task = tasks.get(name)
        assert task.source.startswith(("lm-eval ", "OpenCompass ")), name
        assert (task.lm_eval_task is None) == (name in OPENCOMPASS_ONLY), name
        assert task.primary in task.scores
        prompts = task.load(data[name])
        assert prompts and all(len(p.continuations) >= 2 for p in prompts), name
    assert set(LM_YAML) | set(OPENCOMPASS_ONLY) | {"mmlu"} == set(tasks.names())


def test_specs_env_and_missing_files(data, monkeypatch, tmp_path):
    task, source = tasks.parse_spec(f"arc_easy@{data['arc_easy']}")
    assert (task.name, source) == ("arc_easy", str(data["arc_easy"]))
    assert tasks.load(f"arc_easy@{data['arc_easy']}") == task.load(data["arc_easy"])
    monkeypatch.setenv(tasks.DATA_ENV, str(data["mmlu"].parent))  # a root holding <task>/ folders
    assert tasks.load("siqa") == tasks.get("siqa").load(data["siqa"])
    with pytest.raises(KeyError, match="unknown task 'mmlu_pro'"):
        tasks.get("mmlu_pro")
    with pytest.raises(ValueError, match="nothing after '@'"):
        tasks.parse_spec("mmlu@")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tasks.load(f"boolq@{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="validation"):
        tasks.get("boolq").load(tmp_path / "empty")
    with pytest.raises(ValueError, match="no few-shot split"):
        dataclasses.replace(tasks.get("boolq"), fewshot_split=None).load(data["boolq"], num_fewshot=1)


def test_mmlu_aggregations_by_hand():
    subjects = ["anatomy", "anatomy", "anatomy", "sociology", "philosophy", "philosophy"]
    correct = [True, False, True, True, False, False]
    assert mmlu.per_subject(subjects, correct) == {"anatomy": 2 / 3, "sociology": 1.0, "philosophy": 0.0}
    assert mmlu.per_category(subjects, correct) == {"stem": 2 / 3, "social_sciences": 1.0, "humanities": 0.0}
    assert mmlu.micro(correct) == 3 / 6
    assert mmlu.macro(subjects, correct) == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert len(mmlu.SUBJECTS) == 57 and set(mmlu.SUBJECTS.values()) == set(mmlu.CATEGORIES)
    with pytest.raises(KeyError, match="no category"):
        mmlu.per_category(["astrology"], [True])
    with pytest.raises(ValueError):
        mmlu.per_subject(["anatomy"], [True, False])


def test_mmlu_categories_are_lm_eval_s():
    """SUBJECTS[s] is the category tag of lm-eval's own mmlu_<s>.yaml."""
    import yaml

    for subject, category in mmlu.SUBJECTS.items():
        text = (LM_TASKS / "mmlu" / "default" / f"mmlu_{subject}.yaml").read_text()
        assert yaml.safe_load(text)["tag"] == f"mmlu_{category}_tasks", subject


def test_cf_categories_by_hand():
    acc = {n: 0.0 for n in tasks.suite("cf-categories")}
    acc.update(mmlu=0.6, arc_challenge=0.4, race_middle=0.8, race_high=0.4, csl=0.2, openbookqa_fact=0.6,
               boolq=0.7, hellaswag=0.7)
    out = tasks.cf_categories(acc)
    assert out == pytest.approx({"DK": 0.6, "Understanding": 0.5, "Reasoning": 0.2, "Exams": 0.4, "AVG": 0.425})
    del acc["siqa"]
    with pytest.raises(KeyError, match="siqa"):
        tasks.cf_categories(acc)
    assert set(tasks.suite("cf-suite")) == set(tasks.names()) >= set(tasks.suite("cf-categories"))
    assert {tasks.get(n).category for n in tasks.suite("cf-categories")} == {"DK", "Understanding", "Reasoning", "Exams"}


def test_import_is_light():
    code = ("import sys, forgetray.tasks as t; [t.get(n) for n in t.names()]; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'datasets', 'ray', 'mlflow', 'deepspeed', 'lm_eval'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_race_docs_group_questions_by_article():
    rows = [{"article": "a1", "question": "q1", "options": ["w", "x", "y", "z"], "answer": "B", "example_id": "1"},
            {"article": "a1", "question": "q2", "options": ["w", "x", "y", "z"], "answer": "D", "example_id": "1"},
            {"article": "a2", "question": "q3", "options": ["w", "x", "y", "z"], "answer": "A", "example_id": "2"}]
    docs = tasks.get("race_high").docs(rows)
    assert [d["article"] for d in docs] == ["a1", "a2"]
    assert [q["question"] for q in ast.literal_eval(docs[0]["problems"])] == ["q1", "q2"]
    prompt = tasks.get("race_high").prompts(docs, [], 0, "high")[0]
    assert prompt.query == "Article: a1\n\nQuestion: q1\nAnswer: x\nq2" and prompt.gold == 3
