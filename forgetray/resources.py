"""Resolve the names in a trial config to concrete sources, and check them, before any compute starts.

A model is an organism size ("organism-small"), a local Hugging Face model directory, or a hub id. A dataset is an
organism IFT set, a local Alpaca-format .json/.jsonl file, or a hub dataset id. Benchmarks and probing sets are
organism names or local .jsonl files. Everything here is cheap (file checks and parsing, no model loading), raises
`SpecError` with a one-line message naming the setting and file/line, and returns plain dicts that cross Ray.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

from forgetray.spec import SpecError, TrialConfig

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith((".json", ".jsonl")) or os.sep in name and Path(name).exists()


@functools.lru_cache(maxsize=None)
def resolve_model(name: str) -> dict:
    """-> {"kind": "organism"|"local"|"hub", "name": name, "path": dir or hub id}."""
    from forgetray import organism

    if organism.is_organism_name(name):
        return {"kind": "organism", "name": name, "path": str(_organism_path(name, "model", "model"))}
    if _looks_like_path(name) or Path(name).expanduser().is_dir():
        path = Path(name).expanduser().resolve()
        if not path.is_dir():
            raise SpecError(f"setting 'model': model directory {name!r} does not exist")
        if not (path / "config.json").is_file():
            raise SpecError(f"setting 'model': {name!r} has no config.json (not a Hugging Face model directory)")
        return {"kind": "local", "name": name, "path": str(path)}
    if not _HUB_ID.match(name):
        raise SpecError(f"setting 'model': {name!r} is neither an organism model, a local directory, nor a hub id")
    if _hub_offline():
        # Offline (tests, air-gapped clusters): the hub id must already be in the local Hugging Face cache.
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", cache_dir=os.environ.get("HF_HUB_CACHE"))
        if not isinstance(cached, str):
            raise SpecError(f"setting 'model': hub model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1")
    return {"kind": "hub", "name": name, "path": name}


def _organism_path(name: str, kind: str, setting: str) -> Path:
    """The built organism's file or folder for `name`; a SpecError naming the setting if unknown or not built."""
    from forgetray import organism

    try:
        return organism.resolve_name(name, kind)
    except ValueError as exc:
        raise SpecError(f"setting {setting!r}: {exc}") from None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


@functools.lru_cache(maxsize=None)
def resolve_dataset(name: str) -> dict:
    """-> {"kind": "organism"|"local"|"hub", "name", "path"}; local files are parsed fully."""
    from forgetray import organism

    if organism.is_organism_name(name):
        return {"kind": "organism", "name": name, "path": str(_organism_path(name, "dataset", "dataset"))}
    if _looks_like_path(name):
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise SpecError(f"setting 'dataset': data file {name!r} does not exist")
        from forgetray.data.instruct import check_instruction_file

        try:
            n = check_instruction_file(path)
        except ValueError as exc:
            raise SpecError(f"setting 'dataset': {exc}") from None
        return {"kind": "local", "name": name, "path": str(path), "records": n}
    if not _HUB_ID.match(name) or "/" not in name:
        raise SpecError(f"setting 'dataset': unknown dataset {name!r} (an organism set, a .json/.jsonl file, or a hub id 'org/name')")
    return {"kind": "hub", "name": name, "path": name}


def is_task_name(name: str) -> bool:
    """A benchmark by name with its standard protocol (`forgetray.tasks`): "mmlu", or "mmlu@/local/dir"."""
    from forgetray import tasks

    return name.partition("@")[0] in tasks.names()


def expand_suites(names: tuple[str, ...]) -> tuple[str, ...]:
    """Benchmarks with every named suite ("cf-suite") replaced by its tasks, in order, without repeats."""
    from forgetray import tasks

    out: list[str] = []
    for name in names:
        for one in (tasks.suite(name) if name in tasks.SUITES else (name,)):
            if one not in out:
                out.append(one)
    return tuple(out)


@functools.lru_cache(maxsize=None)
def resolve_benchmark(name: str) -> dict:
    """-> {"name", "kind", "path", "default_score", "scores", "questions"}; the organism's primary score is option
    likelihood, a task's its protocol's (`Task.primary`)."""
    from forgetray import organism
    from forgetray.data import hub
    from forgetray.data.questions import load_mc_jsonl

    if is_task_name(name):
        return _resolve_task(name)
    if hub.is_hub_name(name):
        try:
            hub.parse(name, "test")
        except ValueError as exc:
            raise SpecError(f"setting 'benchmarks': {exc}") from None
        # Hub benchmarks are loaded by the workers (on the cluster); MMLU/ARC are scored by letter, as in PS.
        return {"name": name, "kind": "hub", "path": name, "default_score": "letter", "scores": QUESTION_SCORES,
                "questions": None}
    if organism.is_organism_name(name):
        path = _organism_path(name, "benchmark", "benchmarks")
        # Tiny models know facts but cannot answer by letter (docs/design.md): option likelihood is the knowledge score.
        default = "acc"
    else:
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise SpecError(f"setting 'benchmarks': benchmark file {name!r} does not exist")
        default = "letter"  # the PS paper's protocol for MMLU-style files
    try:
        questions = load_mc_jsonl(path)
    except ValueError as exc:
        raise SpecError(f"setting 'benchmarks': {exc}") from None
    if not questions:
        raise SpecError(f"setting 'benchmarks': {path} has no questions")
    return {"name": name, "kind": "file", "path": str(path), "default_score": default, "scores": QUESTION_SCORES,
            "questions": len(questions)}


QUESTION_SCORES = ("letter", "acc", "acc_norm")  # what probe_knowledge gives a question file or hub benchmark


def _resolve_task(name: str) -> dict:
    """A task: its local data directory is checked here (its rows are read by the workers, as hub data is)."""
    from forgetray import tasks
    from forgetray.tasks.base import resolve_source

    task, source = tasks.parse_spec(name)
    try:
        local = resolve_source(task.name, source)
    except FileNotFoundError as exc:
        raise SpecError(f"setting 'benchmarks': {exc}") from None
    return {"name": name, "kind": "task", "task": task.name, "path": str(local) if local else task.dataset_path,
            "local": local is not None, "default_score": task.primary, "scores": tuple(task.scores),
            "questions": None}


@functools.lru_cache(maxsize=None)
def resolve_passages(name: str, setting: str = "probe_set") -> dict:
    """A plain-text passage set (probing set or restoring pool). The pool is only checked line by line while it is
    streamed (it may be far larger than RAM); here its first line is parsed."""
    from forgetray import organism
    from forgetray.data import hub
    from forgetray.data.passages import load_passages

    if hub.is_hub_name(name):
        try:
            hub.parse(name, "train")
        except ValueError as exc:
            raise SpecError(f"setting {setting!r}: {exc}") from None
        return {"name": name, "kind": "hub", "path": name, "passages": None}
    if organism.is_organism_name(name):
        path = _organism_path(name, setting, setting)  # the setting names the kind: "probe_set" or "restore_pool"
    else:
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise SpecError(f"setting {setting!r}: passage file {name!r} does not exist")
    try:
        n = len(load_passages(path, limit=None if setting == "probe_set" else 1))
    except ValueError as exc:
        raise SpecError(f"setting {setting!r}: {exc}") from None
    return {"name": name, "kind": "file", "path": str(path), "passages": n if setting == "probe_set" else None}


def benchmark_key(name: str) -> str:
    """The short name a benchmark's metrics are logged under: the task or organism name, or a file's stem."""
    from forgetray import organism
    from forgetray.data import hub

    if is_task_name(name):
        return name.partition("@")[0]
    if hub.is_hub_name(name):
        return hub.short_name(name)
    return name if organism.is_organism_name(name) else Path(name).name.split(".")[0]


def resolve_trial(trial: TrialConfig) -> dict[str, Any]:
    """Everything a trial's workers need to find their inputs, as a plain dict (recorded in MLflow params)."""
    benchmarks = {}
    for name in expand_suites(trial.benchmarks):
        key = benchmark_key(name)
        if key in benchmarks:
            raise SpecError(f"setting 'benchmarks': two benchmarks would both be logged as {key!r}; rename one file")
        bench = dict(resolve_benchmark(name))
        bench["score"] = trial.primary_score_for(name, bench["default_score"])
        if bench["score"] not in bench["scores"]:
            raise SpecError(f"setting 'primary_score': {name!r} offers {', '.join(bench['scores'])}, "
                            f"not {bench['score']!r}")
        benchmarks[key] = bench
    first = next(iter(benchmarks.values()))
    if trial.restore_pool and first["score"] == "mc2":
        raise SpecError("setting 'primary_score': the stage rule pairs per-question correctness on the first benchmark; "
                        "mc2 is a probability per question, so put another benchmark (or score) first")
    model = resolve_model(trial.model)
    prior = []
    for i, phase in enumerate(trial.prior_phases):
        try:
            prior.append(resolve_dataset(dict(phase)["dataset"]))
        except SpecError as e:
            raise SpecError(f"setting 'prior_phases'[{i}]: {e}") from None
    return {
        "model": model,
        # The probes' BOS rule: the organism was trained with BOS; other models follow their tokenizer, as lm-eval.
        "bos": trial.bos if trial.bos != "model" else ("always" if model["kind"] == "organism" else "auto"),
        "prior_datasets": prior,  # one per prior phase, in order
        "dataset": resolve_dataset(trial.dataset),
        "benchmarks": benchmarks,
        "probe_set": resolve_passages(trial.probe_set, "probe_set"),
        "restore_pool": resolve_passages(trial.restore_pool, "restore_pool") if trial.restore_pool else None,
        **({"iv_task": resolve_iv_task(trial.iv_task, trial, model)} if trial.iv_task else {}),
        **({"iv_probe_task": resolve_iv_task(trial.iv_probe_task, trial, model, "iv_probe")}
           if trial.iv_probe_task else {}),
        **({"iv_probe_other_task": resolve_iv_task(trial.iv_probe_other_task, trial, model, "iv_probe",
                                                   "iv_probe_other_task")}
           if trial.iv_probe_other_task else {}),
    }


# Architectures whose decoder layers are model.model.layers[i].self_attn.o_proj (what forgetray.iv hooks).
IV_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")


def resolve_iv_task(name: str, trial: TrialConfig, model: dict, prefix: str = "iv", setting: str = "") -> dict:
    """-> {"kind": "builtin"|"local", "name", "path"}: the IV-guided task (prefix "iv": iv_task, iv_layer, iv_heads)
    or the dynamics probe's ("iv_probe"; its control task too, `setting` "iv_probe_other_task"), loaded once here to
    check it; and, where the model's config.json is on disk, its architecture, <prefix>_layer and <prefix>_heads
    against its layers and heads (a hub model not in the cache is checked when the workers load it)."""
    from forgetray.iv import builtin, load_task

    setting = setting or f"{prefix}_task"
    layer, n_heads = getattr(trial, f"{prefix}_layer"), getattr(trial, f"{prefix}_heads")
    if builtin.is_builtin(name):
        from forgetray import organism

        try:
            task = builtin.builtin_task(name)
        except (ValueError, FileNotFoundError) as exc:
            raise SpecError(f"setting '{setting}': {exc}") from None
        resolved = {"kind": "builtin", "name": name, "path": str(organism.organism_dir())}
    else:
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise SpecError(f"setting '{setting}': {name!r} is neither a built-in task ({', '.join(builtin.TASKS)}) "
                            "nor a task .jsonl file")
        try:
            task = load_task(path)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SpecError(f"setting '{setting}': {exc}") from None
        resolved = {"kind": "local", "name": name, "path": str(path)}
    if task.template.n_shot >= len(task.examples):
        raise SpecError(f"setting '{setting}': {task.template.n_shot}-shot prompts need more than "
                        f"{len(task.examples)} examples")
    config = Path(model["path"]) / "config.json"
    if model["kind"] != "hub" and config.is_file():
        found = json.loads(config.read_text())
        kind = found.get("model_type", "?")
        if kind not in IV_MODEL_TYPES:
            raise SpecError(f"setting '{setting}': model type {kind!r} is not supported by instruction vectors "
                            f"(Llama-like decoders only: {', '.join(IV_MODEL_TYPES)})")
        layers, heads = found.get("num_hidden_layers", 0), found.get("num_attention_heads", 0)
        if layer >= layers:
            raise SpecError(f"setting '{prefix}_layer' must be < the model's {layers} layers, got {layer}")
        if n_heads > layers * heads:
            raise SpecError(f"setting '{prefix}_heads' must be <= the model's {layers} x {heads} heads, got "
                            f"{n_heads}")
    return resolved


def resolve_sweep(sweep) -> list[dict[str, Any]]:
    """Resolve (and so check) every trial of a sweep: every model, dataset, benchmark and passage set it names. No
    compute; the first problem raises SpecError."""
    return [resolve_trial(trial) for trial in sweep.trials]


def clear_cache() -> None:
    """Forget resolutions (tests build and delete organisms; a long-lived process may see files change)."""
    for fn in (resolve_model, resolve_dataset, resolve_benchmark, resolve_passages):
        fn.cache_clear()


def describe(resolved: dict) -> str:
    return json.dumps(resolved, sort_keys=True)
