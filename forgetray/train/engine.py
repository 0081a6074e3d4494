"""The DeepSpeed engine and the training loop every phase shares: build the engine with forgetray's optimizer and
schedule, run one epoch of global batches (plain or SAM steps), and the device / ZeRO-3 set-up of a worker.

Global batches are a seeded permutation per epoch, identical for any number of workers: global batch s is
order[s*B:(s+1)*B] and rank r takes its contiguous slice, split into gradient-accumulation micro-batches.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from forgetray.data.instruct import collate, collate_packed
from forgetray.plan import Phase
from forgetray.train.losses import lm_loss
from forgetray.train.sam import sam_step
from forgetray.train.schedule import lr_factor, warmup_steps


# Test hook ("DIR:EPOCH:STEP"): every step of an IFT phase appends "pid epoch step" to DIR/progress; the first
# process to finish optimizer step STEP of epoch EPOCH writes its pid to DIR/held and then waits (up to 300 s) for the
# test to SIGKILL it from outside: a worker killed mid-epoch, at a known point (tests/test_faults.py).
HOLD_ENV = "FORGETRAY_HOLD_AT"

# What the epoch loop calls after every optimizer step, hook(phase, epoch, step): None (nothing is called) unless
# `install_step_hook` found HOLD_ENV set when the worker started; the loop never reads the environment itself.
STEP_HOOK: Callable[[Phase, int, int], None] | None = None


def install_step_hook() -> None:
    """Set STEP_HOOK from HOLD_ENV, read once (the worker function calls this when it starts)."""
    global STEP_HOOK
    spec = os.environ.get(HOLD_ENV)
    STEP_HOOK = functools.partial(_hold_for_kill, spec) if spec else None


class NonFiniteLoss(FloatingPointError):
    """A training step's loss is nan or inf: the phase stops instead of training on (and saving) garbage."""


def build_engine(model, phase: Phase, ds_config: dict, total_steps: int, steps_per_epoch: int = 0):
    """The DeepSpeed engine with the phase's optimizer (torch AdamW) and lr schedule (warm-up + cosine/constant/step;
    "step" decays once per `steps_per_epoch` optimizer steps, default: total_steps / the phase's epochs)."""
    deepspeed = import_deepspeed()
    opt = phase.optimizer
    warmup = warmup_steps(total_steps, opt.warmup_ratio)
    per_epoch = steps_per_epoch or max(1, total_steps // phase.epochs)
    # Only the trainable weights (LoRA: the adapters; the frozen base weights get no optimizer state at all).
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                  weight_decay=opt.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, opt.schedule, per_epoch, opt.lr_decay))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if phase.speed.compile:  # DeepSpeed compiles the module it wraps (torch.compile, inductor) in place
        engine.compile()
    return engine, scheduler


def worker_device() -> torch.device:
    if torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def zero3_scope(ds_config: dict):
    # transformers partitions weights at load time while an HfDeepSpeedConfig with stage 3 is alive. Its config
    # check counts ranks through deepspeed.comm, which must wrap Ray Train's process group first (else world = 1).
    from transformers.integrations import HfDeepSpeedConfig

    import_deepspeed().init_distributed(dist_backend=dist.get_backend())
    return HfDeepSpeedConfig(ds_config)


def import_deepspeed():
    """`deepspeed`, imported without what the training never uses. DeepSpeed compiles its CPU shared-memory
    all-reduce op when a communicator is first made (about 100 s of CPU on this project's 2-core machine, again in
    every new virtual environment path; the probe of which ops compile runs compilers too), and uses it only for
    tensor-parallel inference (`inference_all_reduce`): training all-reduces through torch.distributed either way.
    DeepSpeed keeps the probed table in the module so that edits persist; the op is marked unavailable there. Its
    autotuner (a launcher tool) imports MLflow when DeepSpeed is imported: ~1 s of CPU in every Ray Train worker,
    which logs nothing to MLflow itself (the controller does); the import is skipped where MLflow is not loaded yet.
    ZeRO and bf16 engines import DeepSpeed's Muon optimizer (to recognise it), whose module compiles two functions
    with `torch.compile` as it loads: that loads inductor, ~0.9 CPU-s per worker (measured), for an optimizer
    forgetray never builds (it hands DeepSpeed torch's AdamW). It is loaded here with `torch.compile` as the identity,
    so its functions stay eager and nothing else changes."""
    import importlib
    import sys

    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError: the autotuner records has_mlflow = False
        try:
            importlib.import_module("deepspeed")
        finally:
            del sys.modules["mlflow"]
    import deepspeed
    import deepspeed.ops

    vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    if MUON_MODULE not in sys.modules:
        compile_ = torch.compile
        torch.compile = _eager
        try:
            importlib.import_module(MUON_MODULE)
        except ImportError:  # a DeepSpeed without Muon: nothing to load
            pass
        finally:
            torch.compile = compile_
    return deepspeed


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def _eager(model=None, **_options):
    """`torch.compile` as the identity (its decorator form too): see `import_deepspeed`."""
    return model if model is not None else (lambda fn: fn)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The same global batches for any number of workers: a seeded permutation per epoch."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator)


def steps_per_epoch(n_examples: int, phase: Phase) -> int:
    """Optimizer steps in one epoch: the incomplete last global batch is dropped, or completed (`drop_last`)."""
    batch = phase.batching.batch_size
    return n_examples // batch if phase.drop_last else -(-n_examples // batch)


def train_epoch(engine, data: list, phase: Phase, epoch: int, seed: int, rank: int, world: int, pad_id: int, device,
                after_step: Callable[[int], bool | None] | None = None, guide=None) -> dict:
    """One epoch of `phase` over `data`. Without `drop_last` the incomplete last global batch is completed with
    examples from the start of the order (restoration: every token is trained on at least once). With SAM
    (`phase.methods.sam_rho` > 0) every `sam_every`-th optimizer step is a SAM step (`forgetray.train.sam`).
    `after_step(k)` runs on every rank after optimizer step k (1-based) of the epoch; if it returns True the epoch
    ends there (every rank must decide alike: a restoration pass back within its target). With a `guide`
    (`forgetray.train.iv_guided.Guide`) every step is IV-guided: the loss is its total, and the epoch's mean terms
    come back under "iv"."""
    batching, methods = phase.batching, phase.methods
    order = epoch_order(len(data), seed, epoch)
    steps = steps_per_epoch(len(data), phase)
    if steps * batching.batch_size > len(order):
        order = torch.cat([order, order[: steps * batching.batch_size - len(order)]])
    per_rank = batching.micro_batch * batching.grad_accum
    losses, tokens, terms = [], 0, []

    def loss_of(model, batch: dict) -> torch.Tensor:  # the model's own loss, or chunked (no full logits)
        return lm_loss(model, batch, phase.speed.chunked_loss)

    engine.train()
    for step in range(steps):
        start = step * batching.batch_size + rank * per_rank
        mine = order[start:start + per_rank]
        micro_batches = []
        for micro in range(batching.grad_accum):
            idx = mine[micro * batching.micro_batch:(micro + 1) * batching.micro_batch].tolist()
            examples = [data[i] for i in idx]
            batch = collate_packed(examples) if phase.speed.packing else collate(examples, pad_id)
            micro_batches.append({k: v.to(device) for k, v in batch.items()})
            tokens += sum(len(ex["input_ids"]) for ex in examples)
        global_step = (epoch - 1) * steps + step + 1
        before = len(losses)
        if guide is not None:  # spec: never with SAM
            from forgetray.train.iv_guided import iv_step

            step_losses, step_terms = iv_step(engine, micro_batches, guide, global_step - 1)
            losses += step_losses
            terms += step_terms
        elif methods.sam_rho > 0 and global_step % methods.sam_every == 0:
            losses += sam_step(engine, micro_batches, methods.sam_rho, methods.sam_adaptive, world, loss_of)
        else:
            for batch in micro_batches:
                loss = loss_of(engine, batch)
                engine.backward(loss)
                engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
                losses.append(loss.detach().float())
        step_loss = float(torch.stack(losses[before:]).mean())  # one host sync per optimizer step
        if not math.isfinite(step_loss):
            raise NonFiniteLoss(f"non-finite loss ({step_loss}) in phase {phase.name!r}, epoch {epoch}, step "
                                f"{step + 1}/{steps} (global step {global_step}, rank {rank}): lower the lr, check "
                                "the data or use bf16/fp32")
        if STEP_HOOK is not None:
            STEP_HOOK(phase, epoch, step + 1)
        if after_step is not None and after_step(step + 1):
            steps = step + 1
            break
    stats = torch.tensor([float(torch.stack(losses).mean()), float(tokens)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(stats)
        stats[0] /= world
    out = {"loss": float(stats[0]), "tokens": float(stats[1]), "steps": steps}
    if guide is not None:
        from forgetray.train.iv_guided import epoch_terms

        out["iv"] = epoch_terms(terms, world, guide.settings.mse > 0)
    return out


def _hold_for_kill(spec: str, phase: Phase, epoch: int, step: int) -> None:
    """The HOLD_ENV test hook (see there): IFT phases only."""
    if phase.kind != "ift":
        return
    folder, at_epoch, at_step = spec.rsplit(":", 2)
    folder = Path(folder)
    with open(folder / "progress", "a") as f:
        f.write(f"{os.getpid()} {epoch} {step}\n")
    if (epoch, step) != (int(at_epoch), int(at_step)):
        return
    tmp = folder / f".held-{os.getpid()}"
    tmp.write_text(json.dumps({"pid": os.getpid(), "epoch": epoch, "step": step}))
    try:
        os.link(tmp, folder / "held")  # atomic: only the first process to get here is held
    except FileExistsError:
        return
    finally:
        tmp.unlink()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(0.2)
