"""Task names, suites, `name@path` specs, and CF's evaluation categories (docs/methods.md §7) over per-task accuracies.

Task objects are built on demand (`get`), so importing this module does no work.
"""

from __future__ import annotations

from typing import Callable, Mapping

from forgetray.data.questions import MCPrompt
from forgetray.tasks import lmeval, mmlu, opencompass
from forgetray.tasks.base import Task

TASKS: dict[str, Callable[[], Task]] = {
    "mmlu": mmlu.mmlu,
    "arc_challenge": lmeval.arc_challenge,
    "arc_easy": lmeval.arc_easy,
    "hellaswag": lmeval.hellaswag,
    "boolq": lmeval.boolq,
    "rte": lmeval.rte,
    "ax_b": opencompass.ax_b,
    "ax_g": opencompass.ax_g,
    "copa": lmeval.copa,
    "siqa": lmeval.siqa,
    "race_middle": lmeval.race_middle,
    "race_high": lmeval.race_high,
    "openbookqa": lmeval.openbookqa,
    "openbookqa_fact": opencompass.openbookqa_fact,
    "truthfulqa_mc1": lmeval.truthfulqa_mc1,
    "truthfulqa_mc2": lmeval.truthfulqa_mc2,
    "csl": opencompass.csl,
}

# CF's categories (docs/methods.md §7, OpenCompass naming): each is the mean of its tasks' accuracies; AVG the mean of the four.
CF_CATEGORIES: dict[str, tuple[str, ...]] = {
    "DK": ("mmlu",),
    "Understanding": ("race_middle", "race_high", "openbookqa_fact", "csl"),
    "Reasoning": ("boolq", "ax_b", "ax_g", "rte", "copa", "hellaswag", "siqa"),
    "Exams": ("arc_challenge",),
}

SUITES: dict[str, tuple[str, ...]] = {
    "cf-suite": tuple(TASKS),  # every benchmark of issue 9: CF's thirteen plus ARC-Easy, OpenBookQA (lm-eval), TruthfulQA
    "cf-categories": tuple(name for names in CF_CATEGORIES.values() for name in names),  # exactly what cf_categories needs
}


def names() -> tuple[str, ...]:
    return tuple(TASKS)


def get(name: str) -> Task:
    """The task called `name`; KeyError listing the known names."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]()


def suite(name: str) -> tuple[str, ...]:
    """The task names of a suite ("cf-suite", "cf-categories")."""
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    return SUITES[name]


def parse_spec(spec: str) -> tuple[Task, str | None]:
    """"mmlu" -> (mmlu, None: hub or $FORGETRAY_TASK_DATA); "mmlu@/data/mmlu" -> (mmlu, "/data/mmlu")."""
    name, sep, path = spec.partition("@")
    if sep and not path:
        raise ValueError(f"task spec {spec!r}: nothing after '@' (expected NAME@DIRECTORY)")
    return get(name), (path or None)


def load(spec: str, num_fewshot: int | None = None) -> list[MCPrompt]:
    """The prompts of a task spec (`parse_spec`), e.g. load("mmlu@/data/mmlu")."""
    task, source = parse_spec(spec)
    return task.load(source, num_fewshot=num_fewshot)


def cf_categories(accuracy: Mapping[str, float]) -> dict[str, float]:
    """CF's DK / Understanding / Reasoning / Exams (means of their tasks' accuracies) and AVG (the mean of the four),
    from per-task accuracies keyed by task name (each task's `primary` score). KeyError naming any missing task."""
    missing = [name for names in CF_CATEGORIES.values() for name in names if name not in accuracy]
    if missing:
        raise KeyError(f"cf_categories needs accuracies for {missing}")
    out = {cat: sum(accuracy[n] for n in names) / len(names) for cat, names in CF_CATEGORIES.items()}
    out["AVG"] = sum(out[cat] for cat in CF_CATEGORIES) / len(CF_CATEGORIES)
    return out
