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

Layout: this file is the command line and the report; throughput_training.py and throughput_probes.py hold the two
comparisons, timing.py the interleaved timing and the table, machine.py the header's machine line and the gloo group.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from machine import cpu_name, init_single_process_group, usable_cores  # bench/ is on sys.path when a script here runs

# The bench measures the CPU code path. Pin DeepSpeed's accelerator before anything imports deepspeed, so that on a
# machine with a GPU the engine does not move its model to CUDA while the plain side stays on the CPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from throughput_probes import bench_probes, bench_ranking  # noqa: E402
from throughput_training import bench_training  # noqa: E402
from timing import print_table  # noqa: E402

from forgetray.resources import resolve_trial  # noqa: E402
from forgetray.spec import SpecError, TrialConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# --fixture sizes: tests/fixtures.py's defaults (24 examples, 16 passages) give one optimizer step per epoch, too
# little to time; these give tens of steps and probe calls long enough to measure (the passage file caps at 24
# because its passages are windows of a 33-word list).
FIXTURE_ALPACA, FIXTURE_QUESTIONS, FIXTURE_PASSAGES = 512, 96, 24


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
