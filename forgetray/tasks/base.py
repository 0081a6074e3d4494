"""The `Task` type: a benchmark by name with its standard protocol (dataset, splits, shots, prompt, scores), and the
loader that turns its rows into `MCPrompt`s exactly as lm-eval 0.4.13 builds its multiple-choice requests.

lm-eval's plain-text context for a doc is (lm_eval/api/task.py, ConfigurableTask.fewshot_context):

    description + sum over shots of (doc_to_text(shot) + target_delimiter + choices[target] + fewshot_delimiter)
                + doc_to_text(doc)

and each continuation is `target_delimiter + choice`. forgetray splits that context into `prefix` (description and
shots: shared by every doc when the shots are fixed, so a scorer may reuse it) and `query` (the doc's own text).

Where rows come from (`Task.load(source)`):
  * `source=None`: the directory `$FORGETRAY_TASK_DATA/<task name>` if that variable is set and the directory exists,
    else the Hugging Face hub (`datasets.load_dataset(dataset_path, config, split=...)`, as lm-eval loads it);
  * `source=<directory>`: local files of the hub's schema, one file per split: `<dir>/<config>/<split>.<ext>` for
    tasks with several configs (MMLU: one per subject) or when that folder exists, else `<dir>/<split>.<ext>`;
    `<ext>` is parquet, jsonl or json (the first found, in that order). Read with `datasets.load_dataset`. A local
    copy of a several-config task may hold a subset of its configs (MMLU subjects): those present are loaded.
`datasets` is imported lazily, inside the loader.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from forgetray.data.questions import MCPrompt

DATA_ENV = "FORGETRAY_TASK_DATA"
EXTENSIONS = ("parquet", "jsonl", "json")  # the formats a local split may be stored in, in order of preference
LM_EVAL_FEWSHOT_SEED = 1234  # lm_eval.defaults.DEFAULT_OTHER_SEED: simple_evaluate's default fewshot_random_seed

Doc = dict[str, Any]


@dataclass(frozen=True)
class Task:
    """A benchmark by name.

    `dataset_path`/`configs`/`eval_split`/`fewshot_split` are lm-eval's `dataset_path`/`dataset_name`/`test_split`
    (or `validation_split` where it has no test split)/the split its few-shot sampler draws from. The prompt hooks
    mirror the yaml keys: `doc_to_text(doc) -> str`, `doc_to_choice(doc) -> list[str]`, `doc_to_target(doc) -> int`,
    `description(config) -> str` (MMLU's is per subject), `process_docs(rows) -> docs` (applied to every split, as
    lm-eval does). `sampler` is lm-eval's few-shot sampler: "first_n" (the split in order) or "default" (seeded
    `random.Random(fewshot_seed).sample`, one draw per doc in order). `scores` are the scores the task reports,
    `primary` the one its accuracy means in CF's categories; `true_labels(doc)` gives TruthfulQA MC2's true set.
    """

    name: str
    source: str  # which definition it follows: "lm-eval <task>" or "OpenCompass <config>", with notes
    dataset_path: str
    configs: tuple[str | None, ...]
    eval_split: str
    doc_to_text: Callable[[Doc], str]
    doc_to_choice: Callable[[Doc], list[str]]
    doc_to_target: Callable[[Doc], int]
    fewshot_split: str | None = None
    num_fewshot: int = 0
    sampler: str = "default"
    fewshot_seed: int = LM_EVAL_FEWSHOT_SEED
    # lm-eval passes the doc to its sampler (which then draws n + 1 and drops the doc) iff the yaml's fewshot_split
    # equals its test_split: also when both are unset (hellaswag, boolq, siqa, ...). None: iff the splits are equal.
    shots_exclude_doc: bool | None = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: Callable[[str | None], str] = field(default=lambda config: "")
    process_docs: Callable[[list[Doc]], list[Doc]] | None = None
    true_labels: Callable[[Doc], list[int]] | None = None
    scores: tuple[str, ...] = ("acc",)
    primary: str = "acc"
    category: str | None = None  # CF's evaluation category (docs/methods.md §7), None if outside CF's suite
    lm_eval_task: str | None = None  # the lm-eval task whose yaml it reproduces (parity tests), None if lm-eval lacks it

    def load(self, source: str | os.PathLike | None = None, num_fewshot: int | None = None) -> list[MCPrompt]:
        """The task's prompts, in dataset order (configs in order, then rows), from `source` (see the module
        docstring). `num_fewshot` overrides the task's standard number of shots."""
        shots = self.num_fewshot if num_fewshot is None else num_fewshot
        where = resolve_source(self.name, source)
        prompts: list[MCPrompt] = []
        for config in self.local_configs(where) if where is not None else self.configs:
            docs = self.docs(read_split(self, config, self.eval_split, where))
            pool = self.docs(read_split(self, config, self.fewshot_split, where)) if shots and self.fewshot_split else []
            if shots and not pool:
                raise ValueError(f"task {self.name!r}: {shots} shots asked but it has no few-shot split")
            prompts += self.prompts(docs, pool, shots, config)
        return prompts

    def local_configs(self, where: Path) -> tuple[str | None, ...]:
        """The configs a local directory holds: all of a single-config task's; for a task of several (MMLU's
        subjects), those with a sub-folder, in the task's order (a local copy may hold a subset of subjects)."""
        if len(self.configs) == 1:
            return self.configs
        present = tuple(c for c in self.configs if (where / str(c)).is_dir())
        if not present:
            raise FileNotFoundError(f"task {self.name!r}: {where} has no folder for any of its configs "
                                    f"({', '.join(map(str, self.configs[:3]))}, ...)")
        return present

    def docs(self, rows: list[Doc]) -> list[Doc]:
        return list(self.process_docs(rows)) if self.process_docs else list(rows)

    def shot_text(self, doc: Doc) -> str:
        """One solved example as lm-eval writes it in the context."""
        choices = self.doc_to_choice(doc)
        return self.doc_to_text(doc) + self.target_delimiter + choices[self.doc_to_target(doc)] + self.fewshot_delimiter

    def prompts(self, docs: Sequence[Doc], pool: Sequence[Doc], shots: int, config: str | None) -> list[MCPrompt]:
        """MCPrompts for `docs` with `shots` examples from `pool`, sampled as lm-eval's sampler does."""
        description = self.description(config)
        rnd = random.Random(self.fewshot_seed)  # one generator per lm-eval task (an MMLU subject), drawn doc by doc
        exclude = self.fewshot_split == self.eval_split if self.shots_exclude_doc is None else self.shots_exclude_doc
        out = []
        for i, doc in enumerate(docs):
            examples = sample_shots(self.sampler, rnd, pool, shots, doc if exclude else None)
            choices = self.doc_to_choice(doc)
            true_set = tuple(self.true_labels(doc)) if self.true_labels else ()
            out.append(MCPrompt(
                id=f"{config}/{i}" if len(self.configs) > 1 else str(i),
                prefix=description + "".join(self.shot_text(shot) for shot in examples),
                query=self.doc_to_text(doc),
                continuations=tuple(self.target_delimiter + c for c in choices),
                gold=self.doc_to_target(doc),
                true_set=true_set,
                subject=(config or "") if len(self.configs) > 1 else "",  # MMLU: the subject
            ))
        return out


def sample_shots(sampler: str, rnd: random.Random, pool: Sequence[Doc], n: int, eval_doc: Doc | None) -> list[Doc]:
    """lm-eval 0.4.13's samplers (lm_eval/api/samplers.py), draw for draw: `first_n` takes the pool's first n (minus
    the doc itself); `default` samples n (n + 1 when the pool is the eval split, then drops the doc itself)."""
    if n == 0:
        return []
    if sampler == "first_n":
        return [d for d in pool if d != eval_doc][:n] if eval_doc is not None else list(pool[:n])
    if sampler != "default":
        raise ValueError(f"unknown few-shot sampler {sampler!r}")
    if eval_doc is None:
        return rnd.sample(list(pool), n)
    drawn = [d for d in rnd.sample(list(pool), n + 1) if d != eval_doc][:n]
    if len(drawn) < n:  # lm-eval's fallback when duplicates of the doc were drawn
        drawn = rnd.sample([d for d in pool if d != eval_doc], n)
    return drawn


def resolve_source(task_name: str, source: str | os.PathLike | None) -> Path | None:
    """A local directory for the task's rows, or None for the hub (see the module docstring)."""
    if source is not None:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"task {task_name!r}: local data directory {str(source)!r} does not exist")
        return path
    root = os.environ.get(DATA_ENV)
    if root and (Path(root).expanduser() / task_name).is_dir():
        return Path(root).expanduser() / task_name
    return None


def split_file(directory: Path, config: str | None, split: str) -> Path:
    """The local file holding one split (module docstring's layout); FileNotFoundError naming what was looked for."""
    folders = ([directory / config] if config else []) + [directory]
    for folder in folders:
        for ext in EXTENSIONS:
            if (folder / f"{split}.{ext}").is_file():
                return folder / f"{split}.{ext}"
    tried = ", ".join(str(f / f"{split}.{{{','.join(EXTENSIONS)}}}") for f in folders)
    raise FileNotFoundError(f"no local file for split {split!r}: tried {tried}")


def read_split(task: Task, config: str | None, split: str | None, where: Path | None) -> list[Doc]:
    """The rows of one split as plain dicts (ClassLabel columns as ints, as `datasets` yields them)."""
    if split is None:
        return []
    import datasets  # lazily: importing forgetray.tasks must stay cheap

    if where is None:
        data = datasets.load_dataset(task.dataset_path, config, split=split)
    else:
        path = split_file(where, config, split)
        builder = "parquet" if path.suffix == ".parquet" else "json"
        data = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
    return [dict(row) for row in data]


def first_index(items: Iterable[str], value: str) -> int:
    """`list.index` with a message naming the value and the list (a malformed row should say what it holds)."""
    items = list(items)
    if value not in items:
        raise ValueError(f"{value!r} is not one of {items!r}")
    return items.index(value)
