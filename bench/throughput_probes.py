"""The probe half of bench_throughput.py: `probe_knowledge`, `probe_perplexity` and restoring-pool ranking
(`score_pool` with `passage_nlls`) against bare forward calls on exactly the sequences they run, built with the
probes' own helpers and padded into the same batches before the clock starts.

Imported by bench_throughput.py after it has pinned DeepSpeed to its CPU accelerator.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch
from timing import timed_row  # bench/ is on sys.path when a script here runs

from forgetray import probes
from forgetray.data.passages import load_passages
from forgetray.data.restoring import score_pool
from forgetray.models import load_model, load_tokenizer
from forgetray.spec import TrialConfig
from forgetray.train.deepspeed_config import deepspeed_config
from forgetray.train.evaluate import ProbeSuite
from forgetray.plan import ift_phase
from forgetray.train.engine import build_engine

DEVICE = torch.device("cpu")  # the bench measures the CPU code path


def padded_batches(seqs: list[list[int]], batch_size: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids, attention_mask) batches in order, as the probes build them (probes.pad_right)."""
    return [probes.pad_right(seqs[start:start + batch_size], pad_id) for start in range(0, len(seqs), batch_size)]


def knowledge_sequences(tokenizer, questions, shots, n_shot: int, max_length: int) -> tuple[list, list]:
    """The two lists of sequences probe_knowledge runs: one letter prompt per question, then one context +
    continuation per option (flattened in question order)."""
    letter = probes.letter_prompts(tokenizer, questions, shots, n_shot, max_length)
    continuations = probes.encode_continuations(tokenizer, questions, max_length)
    options, _ = probes.option_sequences(tokenizer, questions, continuations, max_length)
    return letter, options


def passage_batches(tokenizer, texts, batch_size: int, max_length: int) -> tuple[list, int]:
    """The padded batches probe_perplexity (and passage_nlls) runs on `texts`, and the number of tokens it scores."""
    pad_id = probes.padding_id(tokenizer)
    seqs = probes.passage_sequences(tokenizer, texts, max_length)
    tokens = sum(len(s) - 1 for s in seqs if len(s) >= 2)
    return padded_batches([s or [pad_id] for s in seqs], batch_size, pad_id), tokens


def bare_forward(model, batches) -> None:
    """The plain side of the probe comparison: forward calls and nothing else."""
    with torch.no_grad():
        for input_ids, attention_mask in batches:
            model(input_ids=input_ids, attention_mask=attention_mask)


def bench_probes(trial: TrialConfig, resolved: dict, rounds: int) -> tuple[list[dict], str]:
    tokenizer = load_tokenizer(resolved["model"])
    suite = ProbeSuite.load(resolved, trial)  # the questions, shots and passages a trial's evaluate() uses
    bench_name, bench = next(iter(suite.benchmarks.items()))
    questions, shots = bench["questions"], bench["shots"]
    bs, max_len, pad_id = suite.batch_size, suite.max_length, probes.padding_id(tokenizer)

    # A fresh model for the probes (training in bench_training changed its copies), and a DeepSpeed engine around
    # a second copy: forgetray's evaluate() probes the engine, so its forward wrapper is part of the real cost.
    model = load_model(resolved["model"], trial.precision).eval()
    phase = ift_phase(trial)
    engine, _ = build_engine(load_model(resolved["model"], trial.precision), phase,
                             deepspeed_config(phase, trial.zero_stage, trial.precision),
                             total_steps=1)
    engine.eval()

    letter, options = knowledge_sequences(tokenizer, questions, shots, suite.n_shot, max_len)
    knowledge_batches = padded_batches(letter, bs, pad_id) + padded_batches(options, bs, pad_id)
    ppl_batches, ppl_tokens = passage_batches(tokenizer, suite.passages, bs, max_len)

    def knowledge(m):
        return lambda: probes.probe_knowledge(m, tokenizer, questions, batch_size=bs, max_length=max_len,
                                              n_shot=suite.n_shot, shots=shots, device=DEVICE)

    def perplexity(m):
        return lambda: probes.probe_perplexity(m, tokenizer, suite.passages, batch_size=bs, max_length=max_len,
                                               device=DEVICE)

    _, n_tokens = perplexity(model)()
    if n_tokens != ppl_tokens:
        raise RuntimeError(f"probe_perplexity scored {n_tokens} tokens, the bench's copy of its sequences {ppl_tokens}")

    rows = [
        timed_row("probe_knowledge, HF model", "questions/s", len(questions), rounds,
                  forgetray=knowledge(model), plain=lambda: bare_forward(model, knowledge_batches)),
        timed_row("probe_knowledge, DeepSpeed engine", "questions/s", len(questions), rounds,
                  forgetray=knowledge(engine), plain=lambda: bare_forward(model, knowledge_batches)),
        timed_row("probe_perplexity, HF model", "tokens/s", ppl_tokens, rounds,
                  forgetray=perplexity(model), plain=lambda: bare_forward(model, ppl_batches)),
        timed_row("probe_perplexity, DeepSpeed engine", "tokens/s", ppl_tokens, rounds,
                  forgetray=perplexity(engine), plain=lambda: bare_forward(model, ppl_batches)),
    ]
    info = (f"{bench_name}: {len(questions)} questions -> {len(letter)} letter prompts + {len(options)} option "
            f"sequences; {len(suite.passages)} passages -> {ppl_tokens} scored tokens; batch {bs}, max_length "
            f"{max_len}")
    return rows, info


def bench_ranking(trial: TrialConfig, resolved: dict, rounds: int, n_passages: int,
                  tmp: Path) -> tuple[list[dict], str]:
    """Restoring-pool ranking (`data.restoring.score_pool` with `probes.passage_nlls`, streaming the JSONL file and
    writing Parquet, as a trial does) against bare forward calls on the same padded batches."""
    tokenizer = load_tokenizer(resolved["model"])
    model = load_model(resolved["model"], trial.precision).eval()
    bs, max_len = trial.probe_batch_size, trial.probe_max_length
    pool = tmp / "pool-subset.jsonl"
    with open(resolved["restore_pool"]["path"]) as src, open(pool, "w") as dst:
        dst.writelines(islice(src, n_passages))
    texts = load_passages(pool)
    batches, tokens = passage_batches(tokenizer, texts, bs, max_len)

    def rank():
        with torch.no_grad():
            score_pool(lambda ts: probes.passage_nlls(model, tokenizer, ts, batch_size=bs, max_length=max_len,
                                                      device=DEVICE),
                       pool, tmp / "scores.parquet", batch_size=bs,
                       count_tokens=lambda ts: [len(ids) for ids in probes.encode(tokenizer, ts)])

    rows = [timed_row("pool ranking (score_pool)", "tokens/s", tokens, rounds,
                      forgetray=rank, plain=lambda: bare_forward(model, batches))]
    return rows, f"{len(texts)} pool passages -> {tokens} scored tokens; batch {bs}, max_length {max_len}"
