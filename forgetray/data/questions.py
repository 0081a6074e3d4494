"""Multiple-choice questions: the `MCQuestion` type (a question, its choices and answer: what a benchmark file
holds), the `MCPrompt` type (a question as a model is asked it: context and scored continuations, lm-eval's
multiple-choice request), and the MMLU-style JSONL reader for local benchmark files (hub benchmarks are converted in
`data.hub`).

A record is `{"id"?, "question", "choices", "answer", "subject"?}`; `answer` is an index or a letter of `LETTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetray.data.jsonl import iter_jsonl

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question; `answer` is the index of the correct choice."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))  # lists from JSON would make the question unhashable
        if not 2 <= len(self.choices) <= len(LETTERS):
            raise ValueError(f"needs 2 to {len(LETTERS)} choices, got {len(self.choices)}")
        if not all(isinstance(c, str) and c for c in self.choices):
            raise ValueError("every choice must be a non-empty string")  # acc_norm divides by the choice's length
        if isinstance(self.answer, bool) or not isinstance(self.answer, int):
            raise ValueError(f"answer must be an int index, got {self.answer!r}")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer {self.answer} out of range for {len(self.choices)} choices")


@dataclass(frozen=True)
class MCPrompt:
    """A multiple-choice question as a model is asked it (lm-eval's `multiple_choice` request): the model sees
    `prefix + query` and each continuation is scored as what follows it.

    `prefix` is text shared by a group of prompts (a task description and its few-shot examples: every question of an
    MMLU subject shares its 5 dev examples), so a scorer may compute it once and reuse it; "" if none. Continuations
    carry their target delimiter (" Paris", " A"). `gold` is the index of the correct continuation; `true_set` lists
    every true one where a task has several (TruthfulQA MC2), else it is empty.
    """

    id: str
    prefix: str
    query: str
    continuations: tuple[str, ...]
    gold: int
    true_set: tuple[int, ...] = ()
    subject: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "continuations", tuple(self.continuations))
        object.__setattr__(self, "true_set", tuple(self.true_set))
        if len(self.continuations) < 1 or not all(isinstance(c, str) and c for c in self.continuations):
            raise ValueError(f"prompt {self.id!r}: needs at least one non-empty continuation")
        if not 0 <= self.gold < len(self.continuations):
            raise ValueError(f"prompt {self.id!r}: gold {self.gold} out of range for {len(self.continuations)}")
        if any(not 0 <= k < len(self.continuations) for k in self.true_set):
            raise ValueError(f"prompt {self.id!r}: true_set {self.true_set} out of range")

    @property
    def context(self) -> str:
        return self.prefix + self.query


def load_mc_jsonl(path: str | Path) -> list[MCQuestion]:
    """Read MMLU-style questions, one JSON object a line (see the module docstring).

    `id` defaults to the line number. Blank lines are skipped. A malformed line raises
    ValueError("{path}:{lineno}: what is wrong").
    """
    questions: list[MCQuestion] = []
    first_line_of_id: dict[str, int] = {}
    for lineno, record in iter_jsonl(path):
        try:
            question = parse_mc_record(record, default_id=str(lineno))
        except ValueError as err:
            raise ValueError(f"{path}:{lineno}: {err}") from None
        if question.id in first_line_of_id:
            # Per-question results are paired across models by id, so ids must be unique.
            raise ValueError(f"{path}:{lineno}: duplicate id {question.id!r} (first on line "
                             f"{first_line_of_id[question.id]})")
        first_line_of_id[question.id] = lineno
        questions.append(question)
    return questions


def parse_mc_record(record: Any, default_id: str) -> MCQuestion:
    """One parsed JSON record as an MCQuestion; ValueError saying what is wrong (the caller adds where)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for field in ("question", "choices", "answer"):
        if field not in record:
            raise ValueError(f"missing field {field!r}")
    if not isinstance(record["question"], str):
        raise ValueError("'question' must be a string")
    choices = record["choices"]
    if not isinstance(choices, list):
        raise ValueError("'choices' must be a list of strings")
    answer = record["answer"]
    if isinstance(answer, str):
        if len(answer) != 1 or answer not in LETTERS[: len(choices)]:
            raise ValueError(f"answer {answer!r} is not one of the letters {LETTERS[:len(choices)]!r}")
        answer = LETTERS.index(answer)
    record_id = record.get("id", default_id)
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        raise ValueError(f"'id' must be a string or an int, got {record_id!r}")
    subject = record.get("subject", "")
    if not isinstance(subject, str):
        raise ValueError("'subject' must be a string")
    return MCQuestion(id=str(record_id), question=record["question"], choices=tuple(choices), answer=answer,
                      subject=subject)
