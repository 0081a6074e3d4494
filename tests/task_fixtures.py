"""Tiny local copies of every benchmark of forgetray.tasks, in each hub dataset's exact schema (column names and
`datasets` feature types, ClassLabels included), written as one parquet file per split:

    <root>/<task>/<config>/<split>.parquet      (the layout forgetray.tasks' local loader reads; see base.py)

`write_all(root)` writes them all and returns {task: directory}. The rows are invented but shaped to exercise each
task's preprocessing: HellaSwag's WikiHow "[title]"/"[step]" artifacts and a lower-case ctx_b, RACE's cloze
questions and several questions per article, COPA's cause/effect, OpenBookQA's padded answer key, MMLU questions
with surrounding whitespace and a dev split one row longer than the 5 shots.
"""

from __future__ import annotations

from pathlib import Path

import datasets
from datasets import ClassLabel, Features, Sequence, Value

S = Value("string")
I32 = Value("int32")

MMLU_SUBJECTS = ("abstract_algebra", "high_school_us_history", "sociology")  # stem, humanities, social sciences


def _write(directory: Path, split: str, rows: list[dict], features: Features) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(directory / f"{split}.parquet"))


def mmlu(root: Path) -> None:
    features = Features({"question": S, "subject": S, "choices": Sequence(S),
                         "answer": ClassLabel(names=["A", "B", "C", "D"])})
    for s, subject in enumerate(MMLU_SUBJECTS):
        for split, n in (("dev", 6), ("test", 3), ("validation", 2)):
            rows = [{"question": f"  {split} question {i} on {subject}?\n", "subject": subject,
                     "choices": [f"{subject} option {k}{i}" for k in "wxyz"], "answer": (i + s) % 4} for i in range(n)]
            _write(root / subject, split, rows, features)


def arc(root: Path, config: str) -> None:
    features = Features({"id": S, "question": S, "choices": Sequence({"text": S, "label": S}), "answerKey": S})
    for split in ("train", "validation", "test"):
        rows = []
        for i in range(3):
            labels = ["1", "2", "3", "4"] if i == 2 else ["A", "B", "C", "D"][: 3 + (i % 2)]  # ARC has both, and 3-5 choices
            rows.append({"id": f"{config}-{split}-{i}", "question": f"Which {split} thing {i} is {config}?",
                         "choices": {"text": [f"thing {k} of {i}" for k in range(len(labels))], "label": labels},
                         "answerKey": labels[(i + 1) % len(labels)]})
        _write(root / config, split, rows, features)


def hellaswag(root: Path) -> None:
    features = Features({"ind": I32, "activity_label": S, "ctx_a": S, "ctx_b": S, "ctx": S, "endings": Sequence(S),
                         "source_id": S, "split": S, "split_type": S, "label": S})
    for split in ("train", "validation"):
        rows = []
        for i in range(3):
            ctx_a = f"[header] How to fold a shirt {i} [title] Lay it flat." if i == 1 else f"A man stands  by a car {i}."
            ctx_b = "then" if i else "he opens the door"
            rows.append({"ind": i, "activity_label": "Home and Garden" if i == 1 else "Washing car", "ctx_a": ctx_a,
                         "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}",
                         "endings": [f" [step] ending {k} of {i} [substeps] more." for k in range(4)],
                         "source_id": f"src~{i}", "split": split, "split_type": "indomain", "label": str(i % 4)})
        _write(root, split, rows, features)


def super_glue(root: Path, config: str) -> None:
    label = {"boolq": ["False", "True"], "copa": ["choice1", "choice2"]}.get(config, ["entailment", "not_entailment"])
    columns = {"boolq": ("question", "passage"), "rte": ("premise", "hypothesis"), "axb": ("sentence1", "sentence2"),
               "axg": ("premise", "hypothesis"), "copa": ("premise", "choice1", "choice2", "question")}[config]
    features = Features({**{c: S for c in columns}, "idx": I32, "label": ClassLabel(names=label)})
    splits = ("test",) if config in ("axb", "axg") else ("train", "validation")
    for split in splits:
        rows = []
        for i in range(3):
            row = {c: f"The {c} number {i} of {config} {split}." for c in columns}
            if config == "copa":
                row.update(question=("cause", "effect")[i % 2], choice1=f"She Opened {i} windows.",
                           choice2=f"It rained {i}.")
            if config == "boolq":
                row["question"] = f"is {config} question {i} true"
            rows.append({**row, "idx": i, "label": i % 2})
        _write(root / config, split, rows, features)


def siqa(root: Path) -> None:
    features = Features({"context": S, "question": S, "answerA": S, "answerB": S, "answerC": S, "label": S})
    for split in ("train", "validation"):
        rows = [{"context": f"Tracy went to the {split} shop {i}.", "question": "What will Tracy want to do next?",
                 "answerA": f"buy {i}", "answerB": f"leave {i}", "answerC": f"sleep {i}", "label": str(i % 3 + 1)}
                for i in range(3)]
        _write(root, split, rows, features)


def openbookqa(root: Path, config: str) -> None:
    columns = {"id": S, "question_stem": S, "choices": Sequence({"text": S, "label": S}), "answerKey": S}
    if config == "additional":
        columns.update({"fact1": S, "humanScore": Value("float32"), "clarity": Value("float32"),
                        "turkIdAnonymized": S})
    for split in ("train", "validation", "test"):
        rows = []
        for i in range(3):
            row = {"id": f"{i}-{split}", "question_stem": f"The sun is {split} source {i} of",
                   "choices": {"text": [f"source {k} {i}" for k in range(4)], "label": list("ABCD")},
                   "answerKey": " " + "ABCD"[i] if i == 1 else "ABCD"[i]}  # a padded key: lm-eval lstrips it
            if config == "additional":
                row.update(fact1=f"the sun is the source of energy {i}", humanScore=1.0, clarity=2.0,
                           turkIdAnonymized="abc")
            rows.append(row)
        _write(root / config, split, rows, Features(columns))


def race(root: Path, level: str) -> None:
    """ehovy/race: one row per question; two articles, the first with three questions (one a cloze)."""
    features = Features({"example_id": S, "article": S, "answer": S, "question": S, "options": Sequence(S)})
    for split in ("train", "validation", "test"):
        rows = []
        for a, n in ((0, 3), (1, 2)):
            for q in range(n):
                question = f"The writer thinks the {level} story {a} is  _  ." if q == 1 else f"What is {a}-{q}?"
                rows.append({"example_id": f"{level}{a}.txt", "article": f"A {level} {split} article {a}.\nIt goes on.",
                             "answer": "ABCD"[(a + q) % 4], "question": question,
                             "options": [f"option {k} of {a}-{q}" for k in range(4)]})
        _write(root / level, split, rows, features)


def truthfulqa(root: Path) -> None:
    targets = {"choices": Sequence(S), "labels": Sequence(I32)}
    features = Features({"question": S, "mc1_targets": targets, "mc2_targets": targets})
    rows = [{"question": f"What happens if you do thing {i}?",
             "mc1_targets": {"choices": [f"Nothing {i}.", f"Bad luck {i}.", "You die."], "labels": [1, 0, 0]},
             "mc2_targets": {"choices": [f"Nothing {i}.", f"It is fine {i}.", f"Bad luck {i}."],
                             "labels": [1, 1, 0] if i else [1, 0, 0]}} for i in range(3)]
    _write(root / "multiple_choice", "validation", rows, features)


def csl(root: Path) -> None:
    """clue/clue csl (FewCLUE's json has the same columns, its label a string "0"/"1")."""
    features = Features({"idx": I32, "corpus_id": I32, "abst": S, "keyword": Sequence(S),
                         "label": ClassLabel(names=["0", "1"])})
    for split in ("train", "validation", "test"):
        rows = [{"idx": i, "corpus_id": i, "abst": f"本文研究了{split}问题{i}。", "keyword": ["问题", f"方法{i}"],
                 "label": i % 2} for i in range(3)]
        _write(root / "csl", split, rows, features)


WRITERS = {
    "mmlu": mmlu, "arc_challenge": lambda r: arc(r, "ARC-Challenge"), "arc_easy": lambda r: arc(r, "ARC-Easy"),
    "hellaswag": hellaswag, "boolq": lambda r: super_glue(r, "boolq"), "rte": lambda r: super_glue(r, "rte"),
    "ax_b": lambda r: super_glue(r, "axb"), "ax_g": lambda r: super_glue(r, "axg"),
    "copa": lambda r: super_glue(r, "copa"), "siqa": siqa, "race_middle": lambda r: race(r, "middle"),
    "race_high": lambda r: race(r, "high"), "openbookqa": lambda r: openbookqa(r, "main"),
    "openbookqa_fact": lambda r: openbookqa(r, "additional"), "truthfulqa_mc1": truthfulqa,
    "truthfulqa_mc2": truthfulqa, "csl": csl,
}


def write_all(root: Path) -> dict[str, Path]:
    """Every task's fixture under root/<task>; -> {task name: its directory}."""
    out = {}
    for name, writer in WRITERS.items():
        writer(root / name)
        out[name] = root / name
    return out
