"""Prompt formats of the knowledge probe (docs/methods.md §3): the MMLU-style letter prompt (optionally k-shot) and the
lm-eval-style option-likelihood context and continuations. Text only: tokenization is in `tokens`."""

from __future__ import annotations

from typing import Sequence

from forgetray.data.questions import LETTERS, MCQuestion


def format_letter_question(question: MCQuestion) -> str:
    """MMLU style: "Question: {q}\\nA. {c0}\\nB. {c1}\\n...\\nAnswer:" (the answer letter comes next)."""
    lines = [f"Question: {question.question}"]
    lines += [f"{LETTERS[k]}. {choice}" for k, choice in enumerate(question.choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def format_letter_prompt(question: MCQuestion, shots: Sequence[MCQuestion] = ()) -> str:
    """The solved examples, each ending "Answer: X\\n\\n", then the question; the first answer position follows."""
    solved = "".join(f"{format_letter_question(shot)} {LETTERS[shot.answer]}\n\n" for shot in shots)
    return solved + format_letter_question(question)


def select_shots(question: MCQuestion, shots: Sequence[MCQuestion], n_shot: int) -> list[MCQuestion]:
    """The first `n_shot` shots, those of the question's subject first (MMLU takes its shots from the same subject).

    Deterministic: list order within each group. With one subject (or none) this is simply `shots[:n_shot]`.
    """
    if n_shot > len(shots):
        raise ValueError(f"n_shot={n_shot} but only {len(shots)} shots were given")
    same = [s for s in shots if s.subject == question.subject]
    other = [s for s in shots if s.subject != question.subject]
    return (same + other)[:n_shot]


def format_option_context(question: MCQuestion) -> str:
    """Option-likelihood context (lm-eval ARC style): "Question: {q}\\nAnswer:"."""
    return f"Question: {question.question}\nAnswer:"


def format_option_continuations(question: MCQuestion) -> list[str]:
    """Option-likelihood continuations: " {choice}" for each choice."""
    return [f" {choice}" for choice in question.choices]
