"""Restoration (METHODS.md §2): continue training an IFT checkpoint SFT_e on plain text close to the pre-training
distribution, one epoch over the restoring set, causal-LM loss on every token, sequences packed to a fixed length.
The result R_e gets the same probes as SFT_e. Along the way the probing perplexity is measured at evenly spaced
steps (the paper's Figure 3a).

Same code path as IFT (`train_epoch`, `build_engine`, `evaluate`, `report_checkpoint`); only the data, the loss mask
(none) and the optimizer settings (`restore_lr`, `restore_batch_size`) differ.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from forgetray import probes
from forgetray.data.instruct import tokenize_dataset
from forgetray.metrics import perplexity
from forgetray.models import load_model, load_tokenizer
from forgetray.spec import TrialConfig
from forgetray.train.deepspeed_config import deepspeed_config
from forgetray.train.evaluate import ProbeSuite, evaluate
from forgetray.train.loop import build_engine, report_checkpoint, train_epoch, worker_device, zero3_scope


def restoring_trial(trial: TrialConfig) -> TrialConfig:
    """The trial's settings as restoration uses them: its own lr and batch, one epoch, no accumulation, no SAM
    (restoration is the measurement, not the method under study)."""
    return dataclasses.replace(trial, lr=trial.restore_lr, batch_size=trial.restore_batch_size, micro_batch_size=0,
                               epochs=1, sam_rho=0.0)


def pack(passages: list[list[int]], eos_id: int, seq_len: int) -> list[dict]:
    """Concatenate passages (each followed by EOS) and cut the stream into sequences of `seq_len` tokens; the last
    one may be shorter. Labels are the inputs: the loss is on every token."""
    stream: list[int] = []
    for ids in passages:
        stream.extend(ids)
        stream.append(eos_id)
    return [{"input_ids": stream[i:i + seq_len], "labels": stream[i:i + seq_len]}
            for i in range(0, len(stream), seq_len)]


def restore_worker(config: dict) -> None:
    """Restore the checkpoints `config["epochs"]` (SFT model dirs in `config["sft_model_dirs"]`) one after another,
    skipping those a restarted run already finished (its last reported checkpoint)."""
    import datasets
    import ray.train

    trial = restoring_trial(TrialConfig.from_dict(config["trial"]))
    resolved = config["resolved"]
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    device = worker_device()
    restoring = datasets.load_from_disk(str(Path(config["restoring_dir"]) / "dataset"))
    suite = ProbeSuite.load(resolved, trial)
    finished = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            finished = json.loads((Path(ckpt_dir) / "state.json").read_text())["epoch"]
    for epoch, sft_dir in zip(config["epochs"], config["sft_model_dirs"]):
        if epoch > finished:
            _restore_one(trial, resolved, epoch, sft_dir, restoring, suite, rank, world, device)


def _restore_one(trial, resolved, epoch, sft_dir, restoring, suite, rank, world, device) -> None:
    import ray.train

    torch.manual_seed(trial.seed)
    source = {"name": f"sft-epoch-{epoch}", "path": sft_dir}
    tokenizer = load_tokenizer(source)
    ds_config = deepspeed_config(trial)
    hf_ds_scope = zero3_scope(ds_config) if trial.zero_stage == 3 else None  # noqa: F841 (kept alive on purpose)
    model = load_model(source, trial.precision)
    chunks = pack(restoring["input_ids"], tokenizer.eos_token_id, trial.restore_seq_len)
    steps = -(-len(chunks) // trial.batch_size)
    ift = tokenize_dataset(resolved["dataset"], tokenizer, trial.max_length).to_list()
    em_examples = ift[: trial.em_examples] if trial.em_examples else ift

    engine, _ = build_engine(model, trial, ds_config, total_steps=steps)
    points = {round(i * steps / trial.restore_trajectory_points) for i in range(trial.restore_trajectory_points + 1)}
    trajectory_name = f"restore/epoch_{epoch:03d}/probe_ppl"

    def measure(step: int) -> None:  # probing perplexity along the restoration (Figure 3a)
        if step not in points:
            return
        engine.eval()
        with torch.no_grad():
            nll, n = probes.probe_perplexity(engine, tokenizer, suite.passages, batch_size=suite.batch_size,
                                             max_length=suite.max_length, device=device, shard=(rank, world))
        engine.train()
        sums = torch.tensor([nll, float(n)], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums)
        ray.train.report({"kind": "restore_step", "epoch": epoch, "restore_step": step,
                          trajectory_name: perplexity(float(sums[0]), int(sums[1]))})

    measure(0)
    stats = train_epoch(engine, chunks, trial, epoch=1, rank=rank, world=world, pad_id=tokenizer.pad_token_id,
                        device=device, after_step=measure, drop_last=False)
    found, frames = evaluate(engine, tokenizer, suite, device, ift_examples=em_examples)
    metrics = {"kind": "restored", "epoch": epoch, "restored/train/loss": stats["loss"],
               "restored/train/tokens": stats["tokens"], "restored/train/steps": stats["steps"],
               **{f"restored/{k}": v for k, v in found.items()}}
    report_checkpoint(engine, tokenizer, metrics, frames, rank, restored_checkpoint_name(epoch))
    engine.destroy()  # free the optimizer state before the next checkpoint of the group


def restored_checkpoint_name(epoch: int) -> str:
    return f"restored_epoch_{epoch:03d}"
