"""Benchmarks and passage sets hosted on the Hugging Face hub, named `hf:REPO[:CONFIG][@SPLIT]`.

    hf:cais/mmlu:all@test                      MMLU (question, choices, answer index)
    hf:allenai/ai2_arc:ARC-Challenge@test      ARC (question, choices {text, label}, answerKey letter)
    hf:HuggingFaceFW/fineweb:CC-MAIN-2023-40   plain text ("text"), streamed

Multiple-choice records are normalised to `data.questions.MCQuestion`; passages are streamed (`streaming=True`), so a pool
far larger than the disk is ranked without downloading it whole. Loading happens in the workers (on the cluster);
validation only parses the name.
"""

from __future__ import annotations

import re
from typing import Iterator

from forgetray.data.questions import LETTERS, MCQuestion

PREFIX = "hf:"
_NAME = re.compile(r"^hf:(?P<repo>[\w.-]+/[\w.-]+)(?::(?P<config>[\w.-]+))?(?:@(?P<split>[\w.-]+))?$")


def is_hub_name(name: str) -> bool:
    return name.startswith(PREFIX)


def parse(name: str, default_split: str) -> dict:
    """-> {"repo", "config", "split"}; ValueError naming the expected form."""
    match = _NAME.match(name)
    if not match:
        raise ValueError(f"{name!r} is not of the form hf:ORG/NAME[:CONFIG][@SPLIT]")
    return {"repo": match["repo"], "config": match["config"], "split": match["split"] or default_split}


def short_name(name: str) -> str:
    """What metrics are logged under: the repo's name, plus its config unless that is a catch-all."""
    spec = parse(name, "test")
    base = spec["repo"].split("/")[-1]
    return base if spec["config"] in (None, "all", "default") else f"{base}-{spec['config']}"


def _load(spec: dict, streaming: bool):
    import datasets

    return datasets.load_dataset(spec["repo"], spec["config"], split=spec["split"], streaming=streaming)


def mc_question(record: dict, index: int) -> MCQuestion:
    """An MMLU- or ARC-shaped record as an MCQuestion."""
    choices = record["choices"]
    labels = None
    if isinstance(choices, dict):  # ARC: {"text": [...], "label": ["A", ...] or ["1", ...]}
        labels, choices = list(choices["label"]), list(choices["text"])
    answer = record.get("answer", record.get("answerKey"))
    if isinstance(answer, str):
        answer = labels.index(answer) if labels and answer in labels else LETTERS.index(answer.strip().upper())
    return MCQuestion(id=str(record.get("id", index)), question=record["question"], choices=tuple(choices),
                      answer=int(answer), subject=str(record.get("subject", "")))


def load_questions(name: str) -> list[MCQuestion]:
    return [mc_question(record, i) for i, record in enumerate(_load(parse(name, "test"), streaming=False))]


def iter_texts(name: str) -> Iterator[str]:
    for record in _load(parse(name, "train"), streaming=True):
        yield record["text"]
