"""Pre-training of the organism's base models: plain PyTorch, a `transformers.LlamaForCausalLM`, on the CPU.

Deterministic: the same documents, spec and settings give bit-identical weights (fixed seed for the initialisation,
a fixed data order from a seeded RNG, a fixed number of CPU threads, deterministic algorithms only). The sizes can
train concurrently, each in its own process: with one thread per process that keeps both cores of a small machine
busy, and it degrades gracefully when other work shares the machine (several threads per process do not).
"""

from __future__ import annotations

import json
import math
import os
import queue as queue_module
import random
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from forgetray.data.jsonl import read_jsonl
from forgetray.organism.config import ModelSpec, OrganismConfig


@dataclass(frozen=True)
class PretrainSettings:
    """Settings shared by all sizes."""

    seed: int
    seq_len: int  # training rows: the shuffled documents, concatenated and cut into rows of this many tokens
    batch_size: int
    warmup_ratio: float  # linear warm-up over this share of the steps
    decay_ratio: float  # then the peak learning rate until this share of the steps is left, then a cosine decay
    weight_decay: float
    max_position_embeddings: int
    num_threads: int


def settings_of(config: OrganismConfig) -> PretrainSettings:
    return PretrainSettings(
        seed=config.seed, seq_len=config.seq_len, batch_size=config.batch_size, warmup_ratio=config.warmup_ratio,
        decay_ratio=config.decay_ratio, weight_decay=config.weight_decay,
        max_position_embeddings=config.max_position_embeddings, num_threads=config.num_threads,
    )


@dataclass(frozen=True)
class PretrainResult:
    model: LlamaForCausalLM
    steps: int
    seconds: float
    final_loss: float  # mean training loss over the last 5% of steps


def llama_config(spec: ModelSpec, settings: PretrainSettings, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_heads,
        max_position_embeddings=settings.max_position_embeddings,
        tie_word_embeddings=True,  # the embedding matrix is a large share of a tiny model: tie it, as small Llamas do
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def pack_rows(docs: Sequence[list[int]], seq_len: int) -> list[list[int]]:
    """Concatenate the documents, in the given order, and cut the stream into rows of `seq_len` tokens (the last row
    may be shorter), as LLM pre-training does. A document cut in two loses little: every sentence names its entity.
    (Whole-document packing would leave ~10% of every row as padding here: the documents are similar in length.)"""
    stream = [token for doc in docs for token in doc]
    return [stream[start: start + seq_len] for start in range(0, len(stream), seq_len)]


def to_tensors(rows: Sequence[list[int]], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), padded at the end of each row, labels -100 on padding. No attention mask is needed:
    padding is at the end of a row and attention is causal."""
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    return input_ids, labels


def epoch_batches(
    docs: Sequence[list[int]], settings: PretrainSettings, epochs: int, pad_id: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All training batches up front (cheap), so the schedule knows the step count. Each epoch shuffles the
    documents with its own seeded RNG, then packs them."""
    batches = []
    for epoch in range(epochs):
        order = list(range(len(docs)))
        random.Random(f"{settings.seed}/epoch{epoch}").shuffle(order)
        rows = pack_rows([docs[i] for i in order], settings.seq_len)
        input_ids, labels = to_tensors(rows, settings.seq_len, pad_id)
        for start in range(0, len(rows), settings.batch_size):
            batches.append((input_ids[start: start + settings.batch_size], labels[start: start + settings.batch_size]))
    return batches


@contextmanager
def deterministic_torch(num_threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic kernels for the duration; the caller's settings are restored after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def pretrain(
    spec: ModelSpec,
    settings: PretrainSettings,
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    progress: Callable[[str], None] = print,
    log_every_s: float = 10.0,
    max_steps: int | None = None,
) -> PretrainResult:
    """Train a fresh Llama of size `spec` on `texts`, each as [BOS] text [EOS]. `max_steps` stops early, on the full
    run's schedule: the weights after it are those the full run has at that step (the shipped weights' quick check)."""
    docs = [[tokenizer.bos_token_id, *tokenizer.encode(t, add_special_tokens=False), tokenizer.eos_token_id]
            for t in texts]
    batches = epoch_batches(docs, settings, spec.epochs, tokenizer.pad_token_id)
    with deterministic_torch(settings.num_threads):
        torch.manual_seed(settings.seed)
        model = LlamaForCausalLM(llama_config(spec, settings, tokenizer))
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), eps=1e-8,
                                      weight_decay=settings.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_stable_decay(len(batches), settings.warmup_ratio, settings.decay_ratio))
        losses: list[float] = []
        start = last_log = time.perf_counter()
        logged_step = 0
        for step, (input_ids, labels) in enumerate(batches, 1):
            if max_steps is not None and step > max_steps:
                break
            loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            now = time.perf_counter()
            if now - last_log >= log_every_s or step == len(batches):
                recent = losses[logged_step:]
                eta = (now - start) / step * (len(batches) - step)
                progress(f"[organism] {spec.name}: step {step}/{len(batches)} "
                         f"(epoch {math.ceil(step * spec.epochs / len(batches))}/{spec.epochs})  "
                         f"loss {sum(recent) / len(recent):.3f}  elapsed {now - start:.0f}s  eta {eta:.0f}s")
                last_log, logged_step = now, step
        seconds = time.perf_counter() - start
    model.eval()
    tail = losses[-max(1, len(losses) // 20):]
    return PretrainResult(model, len(losses), seconds, sum(tail) / len(tail))


def warmup_stable_decay(total_steps: int, warmup_ratio: float, decay_ratio: float) -> Callable[[int], float]:
    """Learning-rate multiplier per step: linear warm-up, the peak held, a cosine decay to 10% over the last
    `decay_ratio` of the steps. Memorising facts needs many steps at a high rate: with a cosine decay over the whole
    run the 4-layer model reached 0.85 option accuracy in 36 passes, with this schedule 0.98 after 20."""
    warmup = max(1, round(total_steps * warmup_ratio))
    decay_start = max(warmup, round(total_steps * (1 - decay_ratio)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, total_steps - decay_start)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def read_corpus(paths: Sequence[Path]) -> list[str]:
    """The documents of the corpus files, in file order (each epoch shuffles them together)."""
    return [record["text"] for path in paths for record in read_jsonl(path)]


# --- running the sizes, in this process or one process each -------------------------------------------------------

@dataclass(frozen=True)
class PretrainJob:
    """One size to pre-train: everything a worker needs, as files and plain settings."""

    spec: ModelSpec
    settings: PretrainSettings
    tokenizer_dir: Path
    corpus_paths: tuple[Path, ...]  # JSONL files, one {"text": ...} per document (the spec's `corpus`)
    model_dir: Path  # receives the model and a copy of the tokenizer (save_pretrained)

    def to_json(self) -> str:
        return json.dumps({"spec": asdict(self.spec), "settings": asdict(self.settings),
                           "tokenizer_dir": str(self.tokenizer_dir),
                           "corpus_paths": [str(p) for p in self.corpus_paths],
                           "model_dir": str(self.model_dir)})

    @classmethod
    def from_json(cls, text: str) -> "PretrainJob":
        data = json.loads(text)
        return cls(ModelSpec(**data["spec"]), PretrainSettings(**data["settings"]), Path(data["tokenizer_dir"]),
                   tuple(Path(p) for p in data["corpus_paths"]), Path(data["model_dir"]))


def run_job(job: PretrainJob, progress: Callable[[str], None]) -> dict:
    """Pre-train one size and save it; returns its statistics as a plain dict."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(job.tokenizer_dir)
    texts = read_corpus(job.corpus_paths)
    result = pretrain(job.spec, job.settings, tokenizer, texts, progress)
    with quiet_progress_bars():
        result.model.save_pretrained(job.model_dir)
        tokenizer.save_pretrained(job.model_dir)
    return {
        "n_params": sum(p.numel() for p in result.model.parameters()),
        "pretrain_steps": result.steps,
        "pretrain_seconds": round(result.seconds, 1),
        "final_train_loss": round(result.final_loss, 4),
    }


def run_jobs(jobs: Sequence[PretrainJob], progress: Callable[[str], None], parallel: bool) -> dict[str, dict]:
    """Run every job, one after the other in this process, or all at once, each in a worker process
    (`python -m forgetray.organism.pretrain JOB_JSON`); name -> statistics. The weights do not depend on which:
    each job fixes its own seed and thread count. Plain subprocesses rather than multiprocessing: nothing of the
    caller's script is re-imported in the workers."""
    if not parallel or len(jobs) < 2:
        return {job.spec.name: run_job(job, progress) for job in jobs}
    lines: queue_module.Queue = queue_module.Queue()
    workers = {}
    try:
        for job in jobs:
            stderr = tempfile.TemporaryFile(mode="w+")
            process = subprocess.Popen(
                [sys.executable, "-m", "forgetray.organism.pretrain", job.to_json()],
                stdout=subprocess.PIPE, stderr=stderr, text=True, env=_worker_env(),
            )
            workers[job.spec.name] = (process, stderr)
            threading.Thread(target=_pump, args=(job.spec.name, process.stdout, lines), daemon=True).start()
        results: dict[str, dict] = {}
        open_streams = len(workers)
        while open_streams:
            name, line = lines.get()
            if line is None:
                open_streams -= 1
            elif line.startswith("{"):
                message = json.loads(line)
                if "log" in message:
                    progress(message["log"])
                else:
                    results[name] = message["done"]
        for name, (process, stderr) in workers.items():
            if process.wait() != 0 or name not in results:
                stderr.seek(0)
                raise RuntimeError(f"pre-training {name} failed (exit code {process.returncode}):\n"
                                   f"{stderr.read()[-4000:]}")
        return results
    finally:
        for process, stderr in workers.values():
            if process.poll() is None:
                process.kill()
                process.wait()
            stderr.close()


def _pump(name: str, stream, lines: queue_module.Queue) -> None:
    for line in stream:
        lines.put((name, line.strip()))
    lines.put((name, None))


def _worker_env() -> dict[str, str]:
    # The worker must import this very package, installed or not.
    package_parent = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return env


def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point: run one job given as JSON; print JSON lines {"log": ...} and finally {"done": stats}."""
    (job_json,) = sys.argv[1:] if argv is None else argv

    def say(message: dict) -> None:
        print(json.dumps(message), flush=True)

    stats = run_job(PretrainJob.from_json(job_json), lambda line: say({"log": line}))
    say({"done": stats})
    return 0


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """No transformers progress bars (saving/loading weights) between the build's log lines."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
