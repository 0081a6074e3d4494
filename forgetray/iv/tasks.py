"""Instruction tasks for instruction vectors: a task's examples and template, its clean prompts (zero-shot or n-shot)
and corrupted prompts (demonstration labels shuffled, the instruction removed, or the demonstrations removed), all
seeded.

A prompt's text ends with the output prefix; the target is answer_lead + answer (" Paris"), whose first token is
the one CIE and the first-token KL look at. Tokenisation is the caller's.

Task file (JSONL, UTF-8): one object per line, blank lines skipped. Optionally the first object is a header
{"instruction": str, "name": str, "n_shot": int, "separator": str} (any subset, "instruction" or "name" required to
mark it as the header); every other line is {"input": str, "output": str}. Errors name the file and line.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from forgetray.data.jsonl import iter_jsonl


@dataclass(frozen=True)
class Example:
    input: str
    output: str


@dataclass(frozen=True)
class Template:
    n_shot: int = 5
    input_prefix: str = "Q: "
    output_prefix: str = "A:"
    io_separator: str = "\n"
    separator: str = "\n\n"  # between demonstrations, and after the instruction
    answer_lead: str = " "  # between the output prefix and an answer


@dataclass(frozen=True)
class Task:
    name: str
    examples: tuple[Example, ...]
    instruction: str = ""  # "" for a task without one; removed for the "no_instruction" corruption
    template: Template = Template()

    def __post_init__(self):
        if not self.examples:
            raise ValueError(f"task {self.name!r} has no examples")


@dataclass(frozen=True)
class Prompt:
    text: str
    answer: str  # the target text, answer_lead included

    @property
    def full(self) -> str:
        return self.text + self.answer


# What a corrupted prompt loses: its labels' pairing with the inputs (Todd et al.), the instruction, or the
# demonstrations (the query alone, instruction kept: for tasks whose labels alone tell the task, as the organism's
# attribute tasks, where shuffling leaves the task in the prompt).
CORRUPTIONS = ("shuffle_labels", "no_instruction", "no_demonstrations")


def format_prompt(task: Task, demonstrations: Sequence[Example], query: Example, instruction: bool = True) -> Prompt:
    t = task.template
    parts = [task.instruction] if instruction and task.instruction else []
    parts += [f"{t.input_prefix}{d.input}{t.io_separator}{t.output_prefix}{t.answer_lead}{d.output}"
              for d in demonstrations]
    parts.append(f"{t.input_prefix}{query.input}{t.io_separator}{t.output_prefix}")
    return Prompt(t.separator.join(parts), t.answer_lead + query.output)


def zero_shot_prompts(task: Task, instruction: bool = True) -> list[Prompt]:
    return [format_prompt(task, (), e, instruction) for e in task.examples]


def _draws(task: Task, count: int, n_shot: int, seed: int) -> list[tuple[Example, list[Example]]]:
    """(query, demonstrations) pairs: queries in a seeded order (cycled when count exceeds them), demonstrations
    drawn without replacement from the other examples."""
    if n_shot >= len(task.examples):
        raise ValueError(f"task {task.name!r}: {n_shot} demonstrations need more than {len(task.examples)} examples")
    rng = random.Random(seed)
    order = list(range(len(task.examples)))
    rng.shuffle(order)
    draws = []
    for i in range(count):
        q = order[i % len(order)]
        others = [j for j in range(len(task.examples)) if j != q]
        draws.append((task.examples[q], [task.examples[j] for j in rng.sample(others, n_shot)]))
    return draws


def shuffled_labels(demonstrations: Sequence[Example], rng: random.Random) -> list[Example]:
    """The demonstrations with their outputs permuted so that none keeps its own output where that is possible:
    a random derangement avoiding equal output texts if one is found in 100 tries, else a random cyclic shift (no
    demonstration keeps its own label, though a repeated label text may land on its twin)."""
    n = len(demonstrations)
    if n < 2:
        return list(demonstrations)
    outputs = [d.output for d in demonstrations]
    for _ in range(100):
        perm = rng.sample(range(n), n)
        if all(outputs[perm[i]] != outputs[i] for i in range(n)):
            break
    else:
        order = rng.sample(range(n), n)
        perm = [0] * n
        for k in range(n):
            perm[order[k]] = order[(k + 1) % n]
    return [Example(d.input, outputs[perm[i]]) for i, d in enumerate(demonstrations)]


def n_shot_prompts(task: Task, count: int, seed: int, n_shot: int | None = None,
                   corruption: str | None = None) -> list[Prompt]:
    """`count` n-shot prompts. The same seed and n_shot give the same queries and demonstrations with and without
    a corruption, so clean and corrupted prompts pair up; the answer is always the query's true output."""
    if corruption not in (None,) + CORRUPTIONS:
        raise ValueError(f"corruption must be one of {CORRUPTIONS} or None, got {corruption!r}")
    if corruption == "no_instruction" and not task.instruction:
        raise ValueError(f"task {task.name!r} has no instruction to remove")
    n_shot = task.template.n_shot if n_shot is None else n_shot
    label_rng = random.Random(f"{seed}/labels")  # separate stream: corrupting does not change the draws
    prompts = []
    for query, demos in _draws(task, count, n_shot, seed):
        if corruption == "shuffle_labels":
            demos = shuffled_labels(demos, label_rng)
        elif corruption == "no_demonstrations":
            demos = []
        prompts.append(format_prompt(task, demos, query, instruction=corruption != "no_instruction"))
    return prompts


def load_task(path: str | Path, name: str | None = None, template: Template | None = None) -> Task:
    """A task from a JSONL file (format in the module docstring); the header's n_shot/separator override the
    template's."""
    path = Path(path)
    header: dict = {}
    examples: list[Example] = []
    for lineno, obj in iter_jsonl(path):  # blank lines skipped; invalid JSON: ValueError "<path>:<line>: ..."
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if "input" not in obj and ("instruction" in obj or "name" in obj):
            if examples or header:
                raise ValueError(f"{where}: a header line ({sorted(obj)}) must come before the examples")
            header = _check_header(obj, where)
            continue
        missing = [k for k in ("input", "output") if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)} (keys: {sorted(obj)})")
        if not isinstance(obj["input"], str) or not isinstance(obj["output"], str):
            raise ValueError(f"{where}: input and output must be strings")
        examples.append(Example(obj["input"], obj["output"]))
    if not examples:
        raise ValueError(f"{path}: no examples")
    template = template or Template()
    template = replace(template, **{k: header[k] for k in ("n_shot", "separator") if k in header})
    return Task(name or header.get("name") or path.stem, tuple(examples), header.get("instruction", ""), template)


def _check_header(obj: dict, where: str) -> dict:
    types = {"instruction": str, "name": str, "n_shot": int, "separator": str}
    unknown = sorted(set(obj) - set(types))
    if unknown:
        raise ValueError(f"{where}: unknown header keys {unknown} (allowed: {sorted(types)})")
    for key, value in obj.items():
        if not isinstance(value, types[key]) or isinstance(value, bool):
            raise ValueError(f"{where}: header {key!r} must be {types[key].__name__}")
    if "n_shot" in obj and obj["n_shot"] < 0:
        raise ValueError(f"{where}: header n_shot must be >= 0")
    return obj
