"""Build the model organism once and cache it: `python -m forgetray.organism.build [--root DIR]`.

A built organism is a directory of standard files (Hugging Face model and tokenizer directories, JSONL datasets) plus
`manifest.json`; everything downstream reads only those files, as it would a real model and real data. The directory
is named by a fingerprint of the `OrganismConfig`, so a changed config builds a new organism instead of silently
reusing an old one. A build writes into a temporary directory next to its target and renames it into place at the
end: an interrupted build never leaves a half-written organism behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from filelock import FileLock

from forgetray.data.jsonl import read_jsonl, write_jsonl
from forgetray.organism import corpus, tasks, world
from forgetray.organism.config import (
    BENCHMARK,
    DATA_FILES,
    DEMONSTRATION_PAGES,
    FORMAT_VERSION,
    IFT_DATASETS,
    PRETRAIN_CORPUS,
    PROBE_SET,
    RESTORING_POOL,
    OrganismConfig,
)
from forgetray.organism.paths import organism_dir, read_manifest


# --- the data files ------------------------------------------------------------------------------------------------

def write_data(config: OrganismConfig, data_dir: Path) -> dict[str, int]:
    """Generate the world of `config` and write every data file into `data_dir`; returns name -> record count."""
    the_world = world.make_world(config.seed, config.n_entities, config.n_values, config.n_templates)
    texts = corpus.prose_documents(the_world, config.seed) + corpus.exam_pages(
        the_world, the_world.exam_entities, config.seed, "exam", config.exam_repeats, config.exam_page_questions)
    if config.heldout_exam_pages:
        texts += corpus.exam_pages(the_world, the_world.heldout_entities, config.seed, "heldout-exam",
                                   config.exam_repeats, config.exam_page_questions)
    probe, pool = corpus.plain_passages(the_world, config.seed, config.probe_passages, config.restore_passages,
                                        config.pool_page_share)
    demonstrations = corpus.demonstration_pages(the_world, config.seed, config.demonstration_repeats,
                                                config.demonstration_page_size)
    records = {
        PRETRAIN_CORPUS: [{"text": t} for t in texts],
        DEMONSTRATION_PAGES: [{"text": t} for t in demonstrations],
        BENCHMARK: corpus.benchmark(the_world, config.seed),
        "organism-alpaca": tasks.alpaca_examples(the_world, config.seed, config.alpaca_examples),
        "organism-math": tasks.math_examples(config.seed, config.math_examples),
        RESTORING_POOL: pool,
        PROBE_SET: probe,
    }
    return {name: write_jsonl(data_dir / DATA_FILES[name], recs) for name, recs in records.items()}


# --- building ------------------------------------------------------------------------------------------------------

def build(config: OrganismConfig | None = None, root: Path | None = None,
          progress: Callable[[str], None] = print, pretrain: bool = False) -> Path:
    """Build the organism for `config` into `root` (default: `organism_dir(config)`) unless it is already there.
    Without a config, an organism already at `root` is taken as it is (e.g. the one $FORGETRAY_ORGANISM names).
    The base models are the shipped weights where the project ships them for `config` (shipped.py), else (or with
    `pretrain`) pre-trained here. Safe to call from several processes at once: one builds, the others wait."""
    explicit_config = config is not None
    config = config or OrganismConfig()
    root = Path(root).expanduser() if root is not None else organism_dir(config if explicit_config else None)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        if (root / "manifest.json").is_file():
            found = read_manifest(root)["fingerprint"]
            if found == config.fingerprint() or not explicit_config:
                return root
            raise FileExistsError(f"{root} holds another organism (fingerprint {found}, wanted "
                                  f"{config.fingerprint()}): remove it or build elsewhere")
        if root.exists() and any(root.iterdir()):
            raise FileExistsError(f"{root} exists, is not empty and has no manifest.json: remove it or build elsewhere")
        # Under the lock, any other temporary build directory is the leftover of a killed build.
        for leftover in root.parent.glob(f".{root.name}.building-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = root.parent / f".{root.name}.building-{os.getpid()}"
        try:
            _build_into(tmp, config, progress, pretrain)
            if root.exists():
                root.rmdir()
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    progress(f"[organism] ready: {root}")
    return root


def _build_into(out: Path, config: OrganismConfig, progress: Callable[[str], None], pretrain: bool) -> None:
    # Heavy imports (torch, transformers) only when actually building.
    from transformers import AutoModelForCausalLM

    from forgetray.organism import shipped
    from forgetray.organism.pretrain import PretrainJob, deterministic_torch, quiet_progress_bars, run_jobs, settings_of
    from forgetray.organism.tokenizer import train_tokenizer

    started = time.perf_counter()
    progress(f"[organism] building {config.fingerprint()} into {out} ...")

    counts = write_data(config, out / "data")
    progress("[organism] data: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    data = {name: read_jsonl(out / "data" / file) for name, file in DATA_FILES.items()}
    corpus_texts = [r["text"] for r in data[PRETRAIN_CORPUS]]

    # A real base tokenizer has seen instruction-style text too: train on the corpus and the IFT sets' prompts.
    ift_texts = ["".join(tasks.alpaca_text(r)) for name in IFT_DATASETS for r in data[name]]
    tokenizer = train_tokenizer(corpus_texts + ift_texts, config.vocab_size, config.max_position_embeddings)
    tokenizer.save_pretrained(out / "tokenizer")
    progress(f"[organism] tokenizer: byte-level BPE, {len(tokenizer)} tokens")

    def n_tokens(texts: Sequence[str]) -> int:
        return sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)

    ift_tokens = {}
    for name in IFT_DATASETS:
        pairs = [tasks.alpaca_text(r) for r in data[name]]
        # One epoch as the fine-tuning code sees it: [BOS] prompt response [EOS].
        ift_tokens[name] = {
            "examples": len(pairs),
            "tokens_per_epoch": n_tokens([p for p, _ in pairs]) + n_tokens([r for _, r in pairs]) + 2 * len(pairs),
            "response_tokens_per_epoch": n_tokens([r for _, r in pairs]) + len(pairs),
        }
        progress(f"[organism] {name}: {ift_tokens[name]['examples']} examples, "
                 f"{ift_tokens[name]['tokens_per_epoch']} tokens an epoch")

    jobs = [
        PretrainJob(spec, settings_of(config), out / "tokenizer",
                    tuple(out / "data" / DATA_FILES[name] for name in spec.corpus), out / "models" / spec.name)
        for spec in config.models
    ]
    folder = None if pretrain else shipped.shipped_dir(config)
    if folder is not None:
        mismatched = shipped.input_mismatches(shipped.read_shipped(folder), _file_list(out))
        if mismatched:  # never install weights trained on other data or another tokenizer
            progress(f"[organism] not using the shipped weights: this build's {', '.join(mismatched[:3])} differ "
                     f"from those they were trained on; pre-training here instead")
            folder = None
    if folder is not None:
        made = shipped.read_shipped(folder)
        progress(f"[organism] installing the shipped base weights (made on {made['made_on']['cpu']}, "
                 f"{made['made_on']['kernels']}; `--pretrain` trains them here instead)")
        shipped.install(folder, out / "models", [job.spec.name for job in jobs])
        with quiet_progress_bars():
            for job in jobs:
                tokenizer.save_pretrained(job.model_dir)
        models = {name: {k: info[k] for k in ("n_params", "pretrain_steps", "pretrain_seconds", "final_train_loss")}
                  for name, info in made["models"].items()}
        weights = {"source": "shipped", "made_on": made["made_on"]}
    else:
        mode = "concurrently, one process each" if config.parallel_pretrain else "one after the other"
        progress(f"[organism] pre-training {', '.join(s.name for s in config.models)} ({mode}) ...")
        models = run_jobs(jobs, progress, config.parallel_pretrain)
        weights = {"source": "pretrained", "made_on": shipped.cpu_signature()}

    # Score what was saved, loaded the way every user loads it.
    the_world = world.make_world(config.seed, config.n_entities, config.n_values, config.n_templates)
    exam_check = corpus.mc_questions(the_world, the_world.exam_entities, config.seed, "manifest-check")
    for job in jobs:
        with quiet_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(job.model_dir).eval()
        with deterministic_torch(config.num_threads):
            accuracy = option_likelihood_accuracy(model, tokenizer, data[BENCHMARK])
            exam_accuracy = option_likelihood_accuracy(model, tokenizer, exam_check)
        stats = models[job.spec.name]
        stats["base_option_accuracy"] = accuracy  # on organism-facts: the held-out half
        stats["exam_half_option_accuracy"] = exam_accuracy  # the same kind of questions about the exam half
        progress(f"[organism] {job.spec.name}: {stats['n_params']:,} parameters, final loss "
                 f"{stats['final_train_loss']:.3f}, option-likelihood accuracy {accuracy:.3f} on {BENCHMARK} "
                 f"(exam half {exam_accuracy:.3f})")

    manifest = {
        "fingerprint": config.fingerprint(),
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(config),
        "models": models,
        "weights": weights,  # shipped with forgetray, or pre-trained on this machine
        "datasets": {name: {"file": f"data/{file}", "records": counts[name], **ift_tokens.get(name, {})}
                     for name, file in DATA_FILES.items()},
        "tokenizer": {"vocab_size": len(tokenizer)},
        "files": _file_list(out),
        "build_seconds": round(time.perf_counter() - started, 1),
        # Other work on the machine slows a build; the 1/5/15-minute load averages at the end tell how much.
        "machine": {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]},
        "build_date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    progress(f"[organism] built in {manifest['build_seconds']:.0f}s")


def _file_list(root: Path) -> dict[str, dict]:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        files[path.relative_to(root).as_posix()] = {"bytes": path.stat().st_size, "sha256": digest}
    return files


def _versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "python": sys.version.split()[0]}


# --- the knowledge check for the manifest --------------------------------------------------------------------------

def option_likelihood_accuracy(model, tokenizer, questions: Sequence[dict]) -> float:
    """Option-likelihood accuracy (lm-eval's `acc`) of organism question records, scored by the same probe that
    scores every trial's benchmarks (`probes.probe_knowledge`), so the manifest and the trials measure alike."""
    from forgetray import probes
    from forgetray.data.questions import MCQuestion

    mc = [MCQuestion(id=str(q.get("id", i)), question=q["question"], choices=q["choices"], answer=q["answer"],
                     subject=q.get("subject", "")) for i, q in enumerate(questions)]
    return probes.summarize_knowledge(probes.probe_knowledge(model, tokenizer, mc, probes.ProbeOptions(batch_size=64)))["acc"]


# --- command line --------------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forgetray.organism.build", description=__doc__.split("\n")[0])
    parser.add_argument("--root", help="build into this directory instead of the cache")
    parser.add_argument("--for-tests", action="store_true", help="the tiny configuration the tests use")
    args = parser.parse_args(argv)
    # Go through the package's copy of this module: under `python -m` this file is also `__main__`, and the worker
    # processes that pre-train the models must unpickle the package's classes, not __main__'s.
    from forgetray import organism

    config = organism.OrganismConfig.for_tests() if args.for_tests else organism.OrganismConfig()
    root = organism.build(config, Path(args.root) if args.root else None)
    manifest = organism.read_manifest(root)
    for name, info in manifest["models"].items():
        print(f"{name}: {info['n_params']:,} params, "
              f"base option-likelihood accuracy {info['base_option_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
