"""MMLU as lm-eval 0.4.13's `mmlu` group (lm_eval/tasks/mmlu/default/): 57 subject tasks over cais/mmlu, test split,
5 shots from each subject's dev split taken in order (`fewshot_config: sampler: first_n`), and its aggregations.

lm-eval's group yaml runs 0-shot unless `--num_fewshot 5` is given; forgetray's standard is 5-shot (MMLU's standard,
PS and CF), the shots exactly as lm-eval builds them with `num_fewshot=5`. Every prompt of a subject carries the same
`prefix` (the subject's description + its 5 solved dev examples), so a scorer can compute it once per subject.

Aggregations (pure; hand-checked in tests/test_tasks.py): per-subject accuracy; per-category accuracy over the
questions of the category's subjects (lm-eval's `weight_by_size: True`, which is micro accuracy within the category);
micro accuracy (all questions equally: lm-eval's reported `mmlu` acc); macro accuracy (all subjects equally).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping

from forgetray.data.questions import LETTERS
from forgetray.tasks.base import Task

# lm_eval/tasks/mmlu/_generate_configs.py:SUBJECTS (lm-eval's category of each subject; not Hendrycks' grouping).
SUBJECTS: dict[str, str] = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences", "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem", "high_school_microeconomics": "social_sciences", "high_school_physics": "stem",
    "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities", "human_aging": "other",
    "human_sexuality": "social_sciences", "international_law": "humanities", "jurisprudence": "humanities",
    "logical_fallacies": "humanities", "machine_learning": "stem", "management": "other", "marketing": "other",
    "medical_genetics": "other", "miscellaneous": "other", "moral_disputes": "humanities",
    "moral_scenarios": "humanities", "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences", "us_foreign_policy": "social_sciences",
    "virology": "other", "world_religions": "humanities",
}
CATEGORIES = ("stem", "humanities", "social_sciences", "other")


def description(subject: str | None) -> str:
    # _generate_configs.py: the per-subject yaml's "description".
    return f"The following are multiple choice questions (with answers) about {' '.join(str(subject).split('_'))}.\n\n"


def doc_to_text(doc: dict) -> str:
    # _default_template_yaml: "{{question.strip()}}\nA. {{choices[0]}}\nB. ...\nD. {{choices[3]}}\nAnswer:"
    return doc["question"].strip() + "".join(f"\n{LETTERS[i]}. {doc['choices'][i]}" for i in range(4)) + "\nAnswer:"


def mmlu(subjects: Iterable[str] | None = None) -> Task:
    """MMLU as lm-eval's `mmlu` (the 57 `mmlu_<subject>` tasks): cais/mmlu, one config per subject, test split,
    5-shot from the subject's dev split in order; continuations " A".." D" (so lm-eval's acc *is* letter scoring on
    the " X" token; PS's letter score merges " A"/"A" at the first answer position). CF category: DK."""
    return Task(
        name="mmlu", source="lm-eval mmlu (lm_eval/tasks/mmlu/default/_default_template_yaml, mmlu_<subject>.yaml)",
        lm_eval_task="mmlu", dataset_path="cais/mmlu",
        configs=tuple(subjects) if subjects is not None else tuple(SUBJECTS),
        eval_split="test", fewshot_split="dev", num_fewshot=5, sampler="first_n", description=description,
        doc_to_text=doc_to_text, doc_to_choice=lambda d: ["A", "B", "C", "D"], doc_to_target=lambda d: int(d["answer"]),
        scores=("acc", "letter"), primary="acc", category="DK",
    )


# --- aggregations ------------------------------------------------------------------------------------------------


def _check(subjects: list[str], correct: list[bool]) -> None:
    if len(subjects) != len(correct):
        raise ValueError(f"{len(subjects)} subjects for {len(correct)} results")
    if not subjects:
        raise ValueError("no results to aggregate")


def per_subject(subjects: Iterable[str], correct: Iterable[bool]) -> dict[str, float]:
    """Accuracy of each subject, from one (subject, correct?) pair per question."""
    subjects, correct = list(subjects), [bool(c) for c in correct]
    _check(subjects, correct)
    hits, counts = defaultdict(int), defaultdict(int)
    for subject, ok in zip(subjects, correct):
        counts[subject] += 1
        hits[subject] += ok
    return {s: hits[s] / counts[s] for s in counts}


def per_category(subjects: Iterable[str], correct: Iterable[bool],
                 categories: Mapping[str, str] = SUBJECTS) -> dict[str, float]:
    """Accuracy of each category over its questions (lm-eval's size-weighted group mean); only categories present.
    A subject missing from `categories` is an error (it would silently vanish from every category)."""
    subjects, correct = list(subjects), [bool(c) for c in correct]
    _check(subjects, correct)
    unknown = sorted(set(subjects) - set(categories))
    if unknown:
        raise KeyError(f"subjects with no category: {unknown}")
    return per_subject([categories[s] for s in subjects], correct)


def micro(correct: Iterable[bool]) -> float:
    """Accuracy over all questions (lm-eval's `mmlu` acc)."""
    correct = [bool(c) for c in correct]
    if not correct:
        raise ValueError("no results to aggregate")
    return sum(correct) / len(correct)


def macro(subjects: Iterable[str], correct: Iterable[bool]) -> float:
    """Mean of the per-subject accuracies (every subject weighs the same)."""
    accs = per_subject(subjects, correct)
    return sum(accs.values()) / len(accs)
