"""Build the model organism once, cache it, and find its files: `python -m forgetray.organism.build [--root DIR]`.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from filelock import FileLock

from forgetray.organism import world

# Bump when a code change alters what a build produces for the same config: the fingerprint then changes too.
FORMAT_VERSION = 1

MODEL_SIZES = ("organism-tiny", "organism-small")
IFT_DATASETS = ("organism-alpaca", "organism-math")
BENCHMARK = "organism-facts"
PROBE_SET = "organism-probe"
RESTORING_POOL = "organism-restore"


class OrganismNotBuilt(FileNotFoundError):
    def __init__(self, root: Path, what: str = "organism"):
        super().__init__(f"no built {what} at {root}: run `forgetray organism build` "
                         f"(or `python -m forgetray.organism.build`) first")


@dataclass(frozen=True)
class ModelSpec:
    """One base-model size (a Llama) and how long and how fast to pre-train it."""

    name: str
    n_layers: int
    hidden: int
    n_heads: int
    intermediate: int
    epochs: int  # passes over the pre-training corpus
    lr: float  # peak AdamW learning rate (see `warmup_ratio` and `decay_ratio` for its schedule)


@dataclass(frozen=True)
class OrganismConfig:
    """Everything that determines a built organism. Defaults: the organism the project ships (builds in ~10 minutes
    on 2 CPU cores); `for_tests()`: a tiny one that builds in seconds.

    The defaults were tuned by measurement. Tiny models memorise facts only after a long plateau (12-25 passes over
    the corpus, nearly independent of the world's size), then quickly; so the world is kept small enough (120
    entities) for 30-50 passes to fit the budget, the batches are small (4 x 256 tokens: more, smaller steps
    memorise faster here), and the learning rate is held at the highest peak each size tolerates until the last
    20% of the steps (see `models` and `decay_ratio`)."""

    seed: int = 0
    # --- the world (world.py) ---
    n_entities: int = 120  # half exam (the restoring/probing text's), half held out (the benchmark's): 300 questions
    n_values: int = 10  # values per attribute
    n_templates: int = 6  # prose templates per attribute; every fact is stated once in each per corpus pass
    exam_repeats: int = 1  # times each exam-half fact is asked on the corpus's exam pages (in each format)
    exam_page_questions: int = 5
    # The held-out half's facts on exam pages too (own distractors and answer positions): measured, with prose only
    # they are weakly memorised and any fine-tuning erodes them at once; asked in the corpus, they are held as firmly
    # as the exam half's, and fine-tuning first breaks only the way they are read out (pseudo forgetting).
    heldout_exam_pages: bool = True
    restore_passages: int = 2000
    # The restoring pool's share of (exam-half) exam pages, the rest prose. Measured: with half pages, base-PPL
    # ranking fills the restoring set with the very predictable pages and restoring left the (prose) probing
    # perplexity 25-140% above the base's; prose only brings it back below the base.
    pool_page_share: float = 0.0
    probe_passages: int = 500
    alpaca_examples: int = 320  # sized so one epoch is ~22k tokens (Alpaca prompt + response, organism tokenizer)
    math_examples: int = 430
    # --- the tokenizer ---
    vocab_size: int = 1500
    # --- the base models and their pre-training (pretrain.py) ---
    models: tuple[ModelSpec, ...] = (
        # Measured (option accuracy on the benchmark, this schedule): the 2-layer model leaves the plateau after ~25
        # passes at lr 5e-3 and reached 1.00 after 40. The 4-layer model was still on it after 32 passes at 5e-3, but
        # leaves it after ~12 at 3e-3 and reached 0.98 after 20.
        ModelSpec("organism-tiny", n_layers=2, hidden=128, n_heads=4, intermediate=384, epochs=48, lr=5e-3),
        ModelSpec("organism-small", n_layers=4, hidden=192, n_heads=6, intermediate=512, epochs=28, lr=3e-3),
    )
    seq_len: int = 256
    batch_size: int = 4
    warmup_ratio: float = 0.03  # learning rate: linear warm-up over the first 3% of the steps,
    decay_ratio: float = 0.2  # then held at its peak, then a cosine decay to 10% over the last 20%
    weight_decay: float = 0.0
    max_position_embeddings: int = 512
    num_threads: int = 1  # per model; part of the config: the thread count can change floating-point summation order
    parallel_pretrain: bool = True  # the sizes train concurrently, one process each (same weights either way)

    @classmethod
    def for_tests(cls) -> "OrganismConfig":
        return cls(
            n_entities=16, n_values=6, n_templates=3, exam_page_questions=4, restore_passages=60, probe_passages=20,
            alpaca_examples=30, math_examples=30, vocab_size=400, seq_len=128, batch_size=8, parallel_pretrain=False,
            models=(
                ModelSpec("organism-tiny", n_layers=1, hidden=32, n_heads=2, intermediate=64, epochs=2, lr=3e-3),
                ModelSpec("organism-small", n_layers=2, hidden=32, n_heads=2, intermediate=64, epochs=2, lr=3e-3),
            ),
        )

    def fingerprint(self) -> str:
        blob = json.dumps({"format": FORMAT_VERSION, "config": dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- where things are ----------------------------------------------------------------------------------------------

def is_organism_name(s: str) -> bool:
    """Names starting with "organism-" are reserved for the organism (a typo gets a clear error, not a hub lookup)."""
    return isinstance(s, str) and s.startswith("organism-")


def organism_dir(config: OrganismConfig | None = None) -> Path:
    """Where the organism for `config` lives. Without a config: $FORGETRAY_ORGANISM if set (a built organism dir),
    else the default config's directory under $FORGETRAY_HOME (default ~/.cache/forgetray)."""
    if config is None and os.environ.get("FORGETRAY_ORGANISM"):
        return Path(os.environ["FORGETRAY_ORGANISM"]).expanduser()
    home = Path(os.environ.get("FORGETRAY_HOME") or Path.home() / ".cache" / "forgetray").expanduser()
    return home / "organism" / (config or OrganismConfig()).fingerprint()


def read_manifest(root: Path | None = None) -> dict:
    root = Path(root) if root is not None else organism_dir()
    path = root / "manifest.json"
    if not path.is_file():
        raise OrganismNotBuilt(root)
    return json.loads(path.read_text())


def model_path(name: str, root: Path | None = None) -> Path:
    root = Path(root) if root is not None else organism_dir()
    manifest = read_manifest(root)
    if name not in manifest["models"]:
        raise ValueError(f"{name!r} is not an organism model (this organism has: {', '.join(manifest['models'])})")
    path = root / "models" / name
    if not (path / "config.json").is_file():
        raise OrganismNotBuilt(path, f"model {name!r}")
    return path


def data_path(name: str, root: Path | None = None) -> Path:
    if name not in world.DATA_FILES:
        raise ValueError(f"{name!r} is not an organism dataset (known: {', '.join(world.DATA_FILES)})")
    root = Path(root) if root is not None else organism_dir()
    read_manifest(root)  # a data file without a manifest is a leftover, not a built organism
    path = root / "data" / world.DATA_FILES[name]
    if not path.is_file():
        raise OrganismNotBuilt(path, f"dataset {name!r}")
    return path


# --- building ------------------------------------------------------------------------------------------------------

def build(config: OrganismConfig | None = None, root: Path | None = None,
          progress: Callable[[str], None] = print) -> Path:
    """Build the organism for `config` into `root` (default: `organism_dir(config)`) unless it is already there.
    Without a config, an organism already at `root` is taken as it is (e.g. the one $FORGETRAY_ORGANISM names).
    Safe to call from several processes at once: one builds, the others wait and reuse it."""
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
            _build_into(tmp, config, progress)
            if root.exists():
                root.rmdir()
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    progress(f"[organism] ready: {root}")
    return root


def _build_into(out: Path, config: OrganismConfig, progress: Callable[[str], None]) -> None:
    # Heavy imports (torch, transformers) only when actually building.
    from transformers import AutoModelForCausalLM

    from forgetray.organism.pretrain import (
        PretrainJob,
        PretrainSettings,
        deterministic_torch,
        quiet_progress_bars,
        run_jobs,
    )
    from forgetray.organism.tokenizer import train_tokenizer

    started = time.perf_counter()
    progress(f"[organism] building {config.fingerprint()} into {out} ...")

    counts = world.write_data(config, out / "data")
    progress("[organism] data: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    data = {name: world.read_jsonl(out / "data" / file) for name, file in world.DATA_FILES.items()}
    corpus = [r["text"] for r in data["pretrain_corpus"]]

    # A real base tokenizer has seen instruction-style text too: train on the corpus and the IFT sets' prompts.
    ift_texts = ["".join(world.alpaca_text(r)) for name in IFT_DATASETS for r in data[name]]
    tokenizer = train_tokenizer(corpus + ift_texts, config.vocab_size, config.max_position_embeddings)
    tokenizer.save_pretrained(out / "tokenizer")
    progress(f"[organism] tokenizer: byte-level BPE, {len(tokenizer)} tokens")

    def n_tokens(texts: Sequence[str]) -> int:
        return sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)

    ift_tokens = {}
    for name in IFT_DATASETS:
        pairs = [world.alpaca_text(r) for r in data[name]]
        # One epoch as the fine-tuning code sees it: [BOS] prompt response [EOS].
        ift_tokens[name] = {
            "examples": len(pairs),
            "tokens_per_epoch": n_tokens([p for p, _ in pairs]) + n_tokens([r for _, r in pairs]) + 2 * len(pairs),
            "response_tokens_per_epoch": n_tokens([r for _, r in pairs]) + len(pairs),
        }
        progress(f"[organism] {name}: {ift_tokens[name]['examples']} examples, "
                 f"{ift_tokens[name]['tokens_per_epoch']} tokens an epoch")

    settings = PretrainSettings(
        seed=config.seed, seq_len=config.seq_len, batch_size=config.batch_size, warmup_ratio=config.warmup_ratio,
        decay_ratio=config.decay_ratio, weight_decay=config.weight_decay,
        max_position_embeddings=config.max_position_embeddings, num_threads=config.num_threads,
    )
    jobs = [
        PretrainJob(spec, settings, out / "tokenizer", out / "data" / world.DATA_FILES["pretrain_corpus"],
                    out / "models" / spec.name)
        for spec in config.models
    ]
    mode = "concurrently, one process each" if config.parallel_pretrain else "one after the other"
    progress(f"[organism] pre-training {', '.join(s.name for s in config.models)} ({mode}) ...")
    models = run_jobs(jobs, progress, config.parallel_pretrain)

    # Score what was saved, loaded the way every user loads it.
    the_world = world.make_world(config.seed, config.n_entities, config.n_values, config.n_templates)
    exam_check = world.mc_questions(the_world, the_world.exam_entities, config.seed, "manifest-check")
    for job in jobs:
        with quiet_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(job.model_dir).eval()
        with deterministic_torch(config.num_threads):
            accuracy = option_accuracy(model, tokenizer, data[BENCHMARK])
            exam_accuracy = option_accuracy(model, tokenizer, exam_check)
        stats = models[job.spec.name]
        stats["base_option_accuracy"] = accuracy  # on organism-facts: the held-out half, facts seen only in prose
        stats["exam_half_option_accuracy"] = exam_accuracy  # the same kind of questions about the exam half
        progress(f"[organism] {job.spec.name}: {stats['n_params']:,} parameters, final loss "
                 f"{stats['final_train_loss']:.3f}, option-likelihood accuracy {accuracy:.3f} on {BENCHMARK} "
                 f"(exam half {exam_accuracy:.3f})")

    manifest = {
        "fingerprint": config.fingerprint(),
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(config),
        "models": models,
        "datasets": {name: {"file": f"data/{file}", "records": counts[name], **ift_tokens.get(name, {})}
                     for name, file in world.DATA_FILES.items()},
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


# --- a quick knowledge check for the manifest ----------------------------------------------------------------------

def option_accuracy(model, tokenizer, questions: Sequence[dict], batch_size: int = 64) -> float:
    """Option-likelihood accuracy (lm-eval's `acc`): for each question, the choice whose text " {choice}" has the
    highest summed log-probability as a continuation of "[BOS]Question: {question}\\nAnswer:" is the prediction."""
    import torch

    sequences, spans = [], []  # token ids; (first, end) positions of the continuation
    for q in questions:
        context = [tokenizer.bos_token_id, *tokenizer.encode(f"Question: {q['question']}\nAnswer:",
                                                              add_special_tokens=False)]
        for choice in q["choices"]:
            continuation = tokenizer.encode(f" {choice}", add_special_tokens=False)
            sequences.append(context + continuation)
            spans.append((len(context), len(context) + len(continuation)))
    scores = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start: start + batch_size]
            width = max(map(len, batch))
            # Right padding and causal attention: the padding never influences the scored positions.
            ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in batch])
            logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
            for row, (first, end) in enumerate(spans[start: start + batch_size]):
                targets = ids[row, first:end]
                # The token at position t is predicted by the logits at position t - 1.
                scores.append(logprobs[row, first - 1: end - 1].gather(-1, targets[:, None]).sum().item())
    correct, offset = 0, 0
    for q in questions:
        option_scores = scores[offset: offset + len(q["choices"])]
        offset += len(q["choices"])
        correct += int(option_scores.index(max(option_scores)) == q["answer"])
    return correct / len(questions)


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
