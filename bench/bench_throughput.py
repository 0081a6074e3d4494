""".venv/bin/python bench/bench_throughput.py [--fixture] [--model organism-small] [--rounds 3] [--threads 1]

How fast forgetray trains and probes, next to the plain PyTorch code that does the same arithmetic.

Two comparisons, measured side by side in one run on the same model and the same data:

1. Training: forgetray's `train_epoch` on the DeepSpeed engine from `build_engine` (ZeRO stage 0, one process over
   gloo) versus a plain loop written below (`plain_epoch`: collate, forward, loss.backward(), AdamW step, zero_grad)
   that walks the same examples in the same batches. Throughput is non-pad tokens per second.
2. Probes: `probe_knowledge` (questions/s) and `probe_perplexity` (scored tokens/s) versus bare forward calls,
   `model(input_ids, attention_mask)`, on the very same padded batches, built before the clock starts. The probes
   are timed both on the Hugging Face model and on the DeepSpeed engine, which is what forgetray's `evaluate` gets.

The plain side is the ideal: ratio = forgetray / plain, so 1.0 means no overhead and 0.8 means 20% slower. The
machine may be shared and noisy, so the two sides alternate within every round (the order flips each round, which
cancels slow drift), each side reports the median over rounds, the per-round ratios show the spread, and the ratio
is also given by CPU time, which other processes on the machine disturb far less than the wall clock.

Model and data: the model organism (`forgetray organism build` first), or `--fixture` for the tiny random Llama and
files of tests/fixtures.py, built in a temporary directory (numbers then say little about real runs; it is for
checking that the bench works, and it exaggerates fixed per-step costs because the model does almost no arithmetic).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name, usable_cores  # bench/ is on sys.path when a script here runs

# The bench measures the CPU code path. Pin DeepSpeed's accelerator before anything imports deepspeed, so that on a
# machine with a GPU the engine does not move its model to CUDA while the plain side stays on the CPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from forgetray import probes  # noqa: E402
from forgetray.data.instruct import collate, tokenize_dataset  # noqa: E402
from forgetray.data.passages import load_passages  # noqa: E402
from forgetray.models import load_model, load_tokenizer  # noqa: E402
from forgetray.resources import resolve_trial  # noqa: E402
from forgetray.spec import SpecError, TrialConfig  # noqa: E402
from forgetray.train.deepspeed_config import deepspeed_config  # noqa: E402
from forgetray.train.evaluate import ProbeSuite  # noqa: E402
from forgetray.train.loop import build_engine, epoch_order, train_epoch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cpu")

# --fixture sizes: tests/fixtures.py's defaults (24 examples, 16 passages) give one optimizer step per epoch, too
# little to time; these give tens of steps and probe calls long enough to measure (the passage file caps at 24
# because its passages are windows of a 33-word list).
FIXTURE_ALPACA, FIXTURE_QUESTIONS, FIXTURE_PASSAGES = 512, 96, 24
# A probe call shorter than this is repeated (the same number of times on every side) so timer resolution and
# scheduler hiccups do not dominate.
MIN_PROBE_SECONDS = 1.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    _quiet_progress_bars()

    with tempfile.TemporaryDirectory(prefix="forgetray-bench-") as tmp:
        try:
            trial = make_trial(args, Path(tmp))
            resolved = resolve_trial(trial)  # the same name -> files resolution a sweep does
        except SpecError as exc:
            hint = "" if args.fixture else "\n(use --fixture to run the bench on the tiny test model instead)"
            print(f"error: {exc}{hint}", file=sys.stderr)
            return 2
        init_single_process_group()
        try:
            train_rows, train_info = bench_training(trial, resolved, args.rounds)
            probe_rows, probe_info = bench_probes(trial, resolved, args.rounds)
            rank_rows, rank_info = bench_ranking(trial, resolved, args.rounds, args.pool_passages, Path(tmp))
        finally:
            dist.destroy_process_group()

    print()
    print(f"forgetray throughput bench: {describe_source(args, trial)}")
    print(f"machine: {machine_line()}")
    print(f"training: {train_info}")
    print(f"probes: {probe_info}")
    print(f"pool ranking: {rank_info}")
    print()
    print_table(train_rows + probe_rows + rank_rows, args.rounds)
    return 0


def parse_args(argv):
    defaults = TrialConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--fixture", action="store_true",
                        help="use tests/fixtures.py's tiny random Llama and files (built in a temp dir)")
    parser.add_argument("--model", default=None,
                        help=f"organism model to bench (organism-tiny, organism-small; default {defaults.model})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="training batch = micro-batch (one process, no accumulation)")
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="training sequence cap")
    parser.add_argument("--probe-batch-size", type=int, default=defaults.probe_batch_size)
    parser.add_argument("--probe-max-length", type=int, default=defaults.probe_max_length)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; each runs every side once")
    parser.add_argument("--pool-passages", type=int, default=1000,
                        help="restoring-pool passages ranked in the pool-ranking comparison")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads; 1 (default) keeps the numbers about the loop, not threading")
    args = parser.parse_args(argv)
    if args.fixture and args.model:
        parser.error("--model names an organism model; --fixture brings its own")
    args.model = args.model or defaults.model
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be >= 1")
    return args


def make_trial(args, tmp: Path) -> TrialConfig:
    """The trial whose training loop and probes are benched: the organism's names, or the fixture's files."""
    sizes = dict(batch_size=args.batch_size, max_length=args.max_length, probe_batch_size=args.probe_batch_size,
                 probe_max_length=args.probe_max_length, zero_stage=0, workers=1, precision="fp32")
    if not args.fixture:
        return TrialConfig(model=args.model, restore_pool="organism-restore", **sizes)

    sys.path.insert(0, str(REPO))  # tests/ is not an installed package
    from tests import fixtures

    fixtures.make_model_dir(tmp / "model")
    fixtures.make_alpaca_file(tmp / "alpaca.jsonl", n=FIXTURE_ALPACA)
    fixtures.make_benchmark_file(tmp / "bench.jsonl", n=FIXTURE_QUESTIONS)
    fixtures.make_passages_file(tmp / "passages.jsonl", n=FIXTURE_PASSAGES)
    fixtures.make_pool_file(tmp / "pool.jsonl", n=args.pool_passages)
    return TrialConfig(model=str(tmp / "model"), dataset=str(tmp / "alpaca.jsonl"),
                       benchmarks=(str(tmp / "bench.jsonl"),), probe_set=str(tmp / "passages.jsonl"),
                       restore_pool=str(tmp / "pool.jsonl"), **sizes)


def init_single_process_group() -> None:
    """A gloo group of one, set up the way a launcher would (DeepSpeed's engine expects torch.distributed)."""
    with socket.socket() as s:  # a free port, so two benches (or a test run) on one machine do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo")


# --- training ------------------------------------------------------------------------------------------------------


def plain_epoch(model, optimizer, data, trial: TrialConfig, epoch: int, pad_id: int) -> dict:
    """The ideal loop: the same global batches as `train_epoch` (same seeded order, same collate), nothing else.

    No gradient clipping, no lr schedule, no engine. `train_epoch`'s batch order comes from `epoch_order`, so both
    sides call it: the batches are the same by construction, and the token counts are checked to match.
    """
    order = epoch_order(len(data), trial.seed, epoch)
    losses, tokens = [], 0
    model.train()
    for step in range(len(data) // trial.batch_size):
        idx = order[step * trial.batch_size:(step + 1) * trial.batch_size].tolist()
        batch = collate([data[i] for i in idx], pad_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        tokens += int(batch["attention_mask"].sum())
    return {"loss": float(torch.stack(losses).mean()), "tokens": float(tokens)}


def bench_training(trial: TrialConfig, resolved: dict, rounds: int) -> tuple[list[dict], str]:
    tokenizer = load_tokenizer(resolved["model"])
    pad_id = tokenizer.pad_token_id
    data = tokenize_dataset(resolved["dataset"], tokenizer, trial.max_length).to_list()
    steps = len(data) // trial.batch_size
    if steps == 0:
        raise SystemExit(f"only {len(data)} examples, fewer than --batch-size {trial.batch_size}")

    # Two copies of the same initial weights: one for each side (optimizer state must not be shared).
    ds_model = load_model(resolved["model"], trial.precision)
    plain_model = load_model(resolved["model"], trial.precision)
    # Schedule length as if the whole bench were one run: warm-up step + every timed epoch.
    engine, _ = build_engine(ds_model, trial, deepspeed_config(trial), total_steps=1 + rounds * steps)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=trial.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=trial.weight_decay)

    # Warm-up: one optimizer step each on the same first batch. The first step pays one-time costs (AdamW state
    # allocation, DeepSpeed's first-step bookkeeping, allocator growth). From identical weights and an identical
    # batch, the two losses must be equal: a check that both sides really run the same model on the same data.
    warm = data[:trial.batch_size]
    ds_loss = train_epoch(engine, warm, trial, 0, 0, 1, pad_id, DEVICE)["loss"]
    plain_loss = plain_epoch(plain_model, plain_opt, warm, trial, 0, pad_id)["loss"]

    def forgetray_side(epoch):
        return train_epoch(engine, data, trial, epoch, 0, 1, pad_id, DEVICE)

    def plain_side(epoch):
        return plain_epoch(plain_model, plain_opt, data, trial, epoch, pad_id)

    times = {"forgetray": [], "plain": []}
    tokens = {}
    for r in range(rounds):
        epoch = r + 1  # both sides see epoch r+1's batch order
        sides = [("forgetray", forgetray_side), ("plain", plain_side)]
        for name, run in (sides if r % 2 == 0 else sides[::-1]):
            with Stopwatch() as clock:
                stats = run(epoch)
            tokens[name] = stats["tokens"]
            times[name].append(clock)
        if tokens["forgetray"] != tokens["plain"]:
            raise RuntimeError(f"round {r}: the sides trained on different tokens ({tokens}); comparison invalid")

    same = "identical" if ds_loss == plain_loss else "DIFFERENT: sides do not run the same computation"
    info = (f"{len(data)} examples, {steps} steps/epoch of {trial.batch_size}, {int(tokens['plain'])} non-pad "
            f"tokens/epoch; warm-up step loss forgetray {ds_loss:.6f} vs plain {plain_loss:.6f} ({same})")
    rows = [{"what": "train epoch (train_epoch vs plain loop)", "unit": "tokens/s", "items": tokens["plain"], **times}]
    return rows, info


# --- probes --------------------------------------------------------------------------------------------------------


def padded_batches(seqs: list[list[int]], batch_size: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids, attention_mask) batches in order, as the probes build them (probes.pad_right)."""
    out = []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start:start + batch_size]
        width = max(len(s) for s in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, :len(seq)] = 1
        out.append((input_ids, attention_mask))
    return out


def knowledge_sequences(tokenizer, questions, shots, n_shot: int, max_length: int) -> tuple[list, list]:
    """The two lists of sequences probe_knowledge runs, built with the probe's own helpers: one letter prompt per
    question, then one context + continuation per option (flattened in question order)."""
    bos = probes.bos_prefix(tokenizer)
    texts = [probes.format_letter_prompt(q, probes.select_shots(q, shots, n_shot)) for q in questions]
    letter = [probes.truncate_left(bos, ids, max_length) for ids in probes.encode(tokenizer, texts)]
    contexts = probes.encode(tokenizer, [probes.format_option_context(q) for q in questions])
    options = []
    for question, context in zip(questions, contexts):
        for cont in probes.encode(tokenizer, probes.format_option_continuations(question)):
            options.append(probes.truncate_left(bos, context + cont, max_length))
    return letter, options


def perplexity_sequences(tokenizer, passages, max_length: int) -> list[list[int]]:
    """The sequences probe_perplexity runs: [BOS] + passage tokens, cut to max_length."""
    bos = probes.bos_prefix(tokenizer)
    return [(bos + ids)[:max_length] for ids in probes.encode(tokenizer, passages)]


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
    engine, _ = build_engine(load_model(resolved["model"], trial.precision), trial, deepspeed_config(trial),
                             total_steps=1)
    engine.eval()

    letter, options = knowledge_sequences(tokenizer, questions, shots, suite.n_shot, max_len)
    knowledge_batches = padded_batches(letter, bs, pad_id) + padded_batches(options, bs, pad_id)
    ppl_seqs = perplexity_sequences(tokenizer, suite.passages, max_len)
    ppl_batches = padded_batches([s or [pad_id] for s in ppl_seqs], bs, pad_id)
    ppl_tokens = sum(len(s) - 1 for s in ppl_seqs if len(s) >= 2)

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


def bench_ranking(trial: TrialConfig, resolved: dict, rounds: int, n_passages: int, tmp: Path) -> tuple[list[dict], str]:
    """Restoring-pool ranking (`data.restoring.score_pool` with `probes.passage_nlls`, streaming the JSONL file and
    writing Parquet, as a trial does) against bare forward calls on the same padded batches."""
    from itertools import islice

    from forgetray.data.restoring import score_pool

    tokenizer = load_tokenizer(resolved["model"])
    model = load_model(resolved["model"], trial.precision).eval()
    bs, max_len, pad_id = trial.probe_batch_size, trial.probe_max_length, probes.padding_id(tokenizer)
    pool = tmp / "pool-subset.jsonl"
    with open(resolved["restore_pool"]["path"]) as src, open(pool, "w") as dst:
        dst.writelines(islice(src, n_passages))
    texts = load_passages(pool)
    seqs = perplexity_sequences(tokenizer, texts, max_len)
    batches = padded_batches([s or [pad_id] for s in seqs], bs, pad_id)
    tokens = sum(len(s) - 1 for s in seqs if len(s) >= 2)

    def rank():
        with torch.no_grad():
            score_pool(lambda ts: probes.passage_nlls(model, tokenizer, ts, batch_size=bs, max_length=max_len,
                                                      device=DEVICE),
                       pool, tmp / "scores.parquet", batch_size=bs,
                       count_tokens=lambda ts: [len(ids) for ids in probes.encode(tokenizer, ts)])

    rows = [timed_row("pool ranking (score_pool)", "tokens/s", tokens, rounds,
                      forgetray=rank, plain=lambda: bare_forward(model, batches))]
    return rows, f"{len(texts)} pool passages -> {tokens} scored tokens; batch {bs}, max_length {max_len}"


def timed_row(what: str, unit: str, items: int, rounds: int, *, forgetray, plain) -> dict:
    """Time two callables that each process `items` items, interleaved over rounds after one untimed warm-up call
    each.

    A call shorter than MIN_PROBE_SECONDS is repeated; both sides repeat the same number of times so they are
    timed over the same amount of work.
    """
    warm = {}
    for name, fn in (("forgetray", forgetray), ("plain", plain)):
        t0 = time.perf_counter()
        fn()
        warm[name] = time.perf_counter() - t0
    repeats = max(1, math.ceil(MIN_PROBE_SECONDS / max(min(warm.values()), 1e-9)))
    sides = [("forgetray", forgetray), ("plain", plain)]
    times = {"forgetray": [], "plain": []}
    for r in range(rounds):
        for name, fn in (sides if r % 2 == 0 else sides[::-1]):
            with Stopwatch() as clock:
                for _ in range(repeats):
                    fn()
            times[name].append(clock)
    return {"what": what, "unit": unit, "items": items * repeats, **times}


class Stopwatch:
    """Wall-clock and CPU seconds of a block. With one thread, this process's CPU time is the work it did: other
    processes on a shared machine stretch the wall clock (they take the core away) but barely the CPU time."""

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


# --- report --------------------------------------------------------------------------------------------------------


def print_table(rows: list[dict], rounds: int) -> None:
    """Per row: each side's median rate (items per wall-clock second) over the rounds and their ratio; the spread of
    the per-round ratios (each round's two sides ran back to back, so drift cancels within a round); and the same
    ratio by CPU time, the one to trust when the machine was busy with other work."""
    header = ("measurement", "unit", "forgetray", "plain", "ratio", f"per-round ({rounds})", "ratio by CPU time")
    lines = []
    for row in rows:
        rate = {side: [row["items"] / c.wall for c in row[side]] for side in ("forgetray", "plain")}
        cpu_rate = {side: [row["items"] / c.cpu for c in row[side]] for side in ("forgetray", "plain")}
        fr, pl = statistics.median(rate["forgetray"]), statistics.median(rate["plain"])
        per_round = [f / p for f, p in zip(rate["forgetray"], rate["plain"])]
        cpu_ratio = statistics.median(cpu_rate["forgetray"]) / statistics.median(cpu_rate["plain"])
        lines.append((row["what"], row["unit"], f"{fr:,.1f}", f"{pl:,.1f}", f"{fr / pl:.3f}",
                      f"{min(per_round):.3f} .. {max(per_round):.3f}", f"{cpu_ratio:.3f}"))
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]
    aligns = "<<>>>>>"
    for line in [header] + lines:
        print("  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(line, aligns, widths)))
    print("ratio = forgetray / plain (1.0 = no overhead), from the medians over interleaved rounds")


def describe_source(args, trial: TrialConfig) -> str:
    what = "--fixture (tests/fixtures.py tiny random Llama)" if args.fixture else f"{trial.model} / {trial.dataset}"
    return (f"{what}, batch {trial.batch_size}, max_length {trial.max_length}, {args.rounds} rounds, "
            f"ZeRO {trial.zero_stage}, {trial.precision}, 1 process (gloo)")


def machine_line() -> str:
    import deepspeed

    cpu, cores = cpu_name(), usable_cores()
    load = "n/a"
    if hasattr(os, "getloadavg"):
        load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    return (f"{cpu}, {cores} cores, torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
            f"threads {torch.get_num_threads()}, load avg {load}")


def _quiet_progress_bars() -> None:
    import datasets
    import transformers

    # Tokenizing, weight-loading and saving progress bars would drown the table.
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
