"""The per-worker training function (Ray Train runs one copy per DeepSpeed rank).

Instruction fine-tuning, top to bottom: load model and data; evaluate the base model (once per model and probe
suite, cached and shared across trials); wrap in the DeepSpeed engine; then for each epoch train, probe, and
report a checkpoint (full DeepSpeed state for resuming + a plain Hugging Face model + per-question probe results).
If Ray Train restarts the workers after a failure, `ray.train.get_checkpoint()` returns the last checkpoint and the
loop continues after its epoch.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from forgetray.data.instruct import collate, tokenize_dataset
from forgetray.models import load_model, load_tokenizer
from forgetray.spec import TrialConfig
from forgetray.train.deepspeed_config import deepspeed_config, optimizer_settings
from forgetray.train.evaluate import ProbeSuite, evaluate
from forgetray.train.schedule import lr_factor, warmup_steps

# Test hook: if this names a file that does not exist yet, the worker creates it and fails once after the given
# epoch's checkpoint ("path:epoch"). Lets tests exercise restart-from-checkpoint without mocking Ray.
FAIL_ONCE_ENV = "FORGETRAY_FAIL_ONCE"


def ift_worker(config: dict) -> None:
    import ray.train

    trial = TrialConfig.from_dict(config["trial"])
    resolved = config["resolved"]
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    device = _device()
    torch.manual_seed(trial.seed)

    tokenizer = load_tokenizer(resolved["model"])
    ds_config = deepspeed_config(trial)
    hf_ds_scope = _zero3_scope(ds_config) if trial.zero_stage == 3 else None  # noqa: F841 (kept alive on purpose)
    model = load_model(resolved["model"], trial.precision)
    # Plain lists of token ids: the epoch loop indexes them thousands of times.
    data = tokenize_dataset(resolved["dataset"], tokenizer, trial.max_length).to_list()
    steps_per_epoch = len(data) // trial.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"dataset {trial.dataset!r}: only {len(data)} examples keep response tokens within "
                         f"max_length={trial.max_length}, fewer than batch_size={trial.batch_size}")
    suite = ProbeSuite.load(resolved, trial)

    engine, scheduler = build_engine(model, trial, ds_config, total_steps=steps_per_epoch * trial.epochs)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        # The engine before its first step is the base model (and under ZeRO-3 only the engine can run it).
        base = _base_evaluation(engine, tokenizer, suite, device, config["base_eval_dir"], rank)
        ray.train.report({"epoch": 0, "state": "base", **{f"base/{k}": v for k, v in base.items()}})

    start_epoch = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(str(Path(ckpt_dir) / "deepspeed"), tag="state")
            start_epoch = json.loads((Path(ckpt_dir) / "state.json").read_text())["epoch"]

    for epoch in range(start_epoch + 1, trial.epochs + 1):
        t0 = time.perf_counter()
        train_stats = train_epoch(engine, data, trial, epoch, rank, world, tokenizer.pad_token_id, device)
        seconds = time.perf_counter() - t0
        probe_metrics, frames = evaluate(engine, tokenizer, suite, device)
        metrics = {
            "epoch": epoch,
            "state": "sft",
            "train/loss": train_stats["loss"],
            "train/tokens": train_stats["tokens"],
            "train/tokens_per_s": train_stats["tokens"] / seconds,
            "train/epoch_seconds": seconds,
            "train/lr": scheduler.get_last_lr()[0],
            **{f"sft/{k}": v for k, v in probe_metrics.items()},
        }
        with tempfile.TemporaryDirectory(prefix="forgetray-ckpt-") as tmp:
            _save_checkpoint(engine, tokenizer, Path(tmp), epoch, metrics, frames, rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch_{epoch:03d}")
        if rank == 0:
            _maybe_fail_once(epoch)


def build_engine(model, trial: TrialConfig, ds_config: dict, total_steps: int):
    """The DeepSpeed engine with forgetray's client optimizer (AdamW) and lr schedule (warm-up + cosine)."""
    import deepspeed

    warmup = warmup_steps(total_steps, trial.warmup_ratio)
    opt = optimizer_settings(trial)
    optimizer = torch.optim.AdamW(model.parameters(), lr=trial.lr, betas=tuple(opt["betas"]), eps=opt["eps"],
                                  weight_decay=trial.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, trial.lr_schedule))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, scheduler


def _device() -> torch.device:
    if torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _zero3_scope(ds_config: dict):
    # transformers partitions weights at load time while an HfDeepSpeedConfig with stage 3 is alive.
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def _base_evaluation(model, tokenizer, suite, device, cache_dir: str, rank: int) -> dict:
    """Probe the untouched base model, or read the result another trial of this sweep already cached.

    Rank 0 holds a file lock while deciding, so concurrent trials on the same model compute it once; the decision
    is broadcast because (under ZeRO-3) every rank must take part in the forward passes.
    """
    from filelock import FileLock

    cache = Path(cache_dir)
    cache.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(cache) + ".lock") if rank == 0 else None
    if lock:
        lock.acquire()
    try:
        need = [not (cache / "metrics.json").is_file()] if rank == 0 else [None]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(need, src=0)
        if need[0]:
            metrics, frames = evaluate(model, tokenizer, suite, device)
            if rank == 0:
                tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".base-"))
                for name, frame in frames.items():
                    frame.to_parquet(tmp / f"{name}.parquet")
                (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
                tmp.rename(cache)  # atomic: a crash never leaves a half-written cache
        metrics = json.loads((cache / "metrics.json").read_text()) if rank == 0 else {}
    finally:
        if lock:
            lock.release()
    return metrics


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The same global batches for any number of workers: a seeded permutation per epoch."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator)


def train_epoch(engine, data, trial: TrialConfig, epoch: int, rank: int, world: int, pad_id: int, device) -> dict:
    """One epoch: global batch s = order[s*B:(s+1)*B]; rank r takes its contiguous slice of it, split into
    gradient-accumulation micro-batches. The incomplete last global batch is dropped."""
    order = _epoch_order(len(data), trial.seed, epoch)
    per_rank = trial.micro_batch * trial.grad_accum
    losses, tokens = [], 0
    engine.train()
    for step in range(len(data) // trial.batch_size):
        mine = order[step * trial.batch_size + rank * per_rank: step * trial.batch_size + (rank + 1) * per_rank]
        for micro in range(trial.grad_accum):
            idx = mine[micro * trial.micro_batch:(micro + 1) * trial.micro_batch].tolist()
            batch = {k: v.to(device) for k, v in collate([data[i] for i in idx], pad_id).items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            losses.append(loss.detach().float())
            tokens += int(batch["attention_mask"].sum())
    stats = torch.tensor([float(torch.stack(losses).mean()), float(tokens)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(stats)
        stats[0] /= world
    return {"loss": float(stats[0]), "tokens": float(stats[1])}


def _save_checkpoint(engine, tokenizer, out: Path, epoch: int, metrics: dict, frames: dict, rank: int) -> None:
    # Full DeepSpeed state (every rank writes its shards) so a restarted trial resumes exactly...
    engine.save_checkpoint(str(out / "deepspeed"), tag="state")
    # ...and a plain Hugging Face model, what probes, restoration and users load.
    state = engine._zero3_consolidated_16bit_state_dict() if engine.zero_optimization_stage() == 3 else None
    if rank == 0:
        module = engine.module
        module.save_pretrained(out / "model", state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out / "model")
        (out / "probes").mkdir()
        for name, frame in frames.items():
            frame.to_parquet(out / "probes" / f"{name}.parquet")
        (out / "state.json").write_text(json.dumps({"epoch": epoch, "metrics": metrics}, indent=1, sort_keys=True))


def _maybe_fail_once(epoch: int) -> None:
    spec = os.environ.get(FAIL_ONCE_ENV)
    if not spec:
        return
    marker, _, at_epoch = spec.rpartition(":")
    if int(at_epoch) == epoch and not Path(marker).exists():
        Path(marker).write_text(f"failed once after epoch {epoch}\n")
        raise RuntimeError(f"{FAIL_ONCE_ENV}: injected failure after epoch {epoch}")
