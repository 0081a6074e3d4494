"""The per-worker training functions (Ray Train runs one copy per DeepSpeed rank).

`ift_worker` is instruction fine-tuning, top to bottom: load model and data; with the untouched base model, evaluate
it and select the restoring set (each once per sweep, cached and shared across trials); then for each epoch train,
probe, and report a checkpoint (full DeepSpeed state for resuming + a plain Hugging Face model + per-question probe
results). If Ray Train restarts the workers after a failure, `ray.train.get_checkpoint()` returns the last checkpoint
and the loop continues after its epoch. Restoration (`forgetray.train.restore`) reuses the same pieces.

Every report carries `kind` ("base" | "step" | "epoch"), `epoch` and `global_step` (optimizer steps so far); the
MLflow logger (tracking.py) logs `steps/*` metrics at the global step and the others at the epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

import numpy as np

from forgetray import flatness, probes
from forgetray.data import rehearsal
from forgetray.data.instruct import collate, tokenize_dataset
from forgetray.data.passages import load_passage_set
from forgetray.data.restoring import build_restoring_set, score_pool, text_key
from forgetray.methods import wiseft
from forgetray.models import load_model, load_tokenizer
from forgetray.spec import TrialConfig
from forgetray.train.deepspeed_config import deepspeed_config, optimizer_settings
from forgetray.train.evaluate import ProbeSuite, evaluate
from forgetray.train.sam import sam_step
from forgetray.train.schedule import lr_factor, warmup_steps

# Test hook: if this names a file that does not exist yet, the worker creates it and fails once after the given
# epoch's checkpoint ("path:epoch"). Lets tests exercise restart-from-checkpoint without mocking Ray.
FAIL_ONCE_ENV = "FORGETRAY_FAIL_ONCE"
FORMAT_KEYS = ("p_fmt", "entropy_vocab", "entropy_options", "knowledge")  # what Figure 4 follows along the steps


def ift_worker(config: dict) -> None:
    import ray.train

    trial = TrialConfig.from_dict(config["trial"])
    resolved = config["resolved"]
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    device = worker_device()
    torch.manual_seed(trial.seed)

    tokenizer = load_tokenizer(resolved["model"])
    ds_config = deepspeed_config(trial)
    hf_ds_scope = zero3_scope(ds_config) if trial.zero_stage == 3 else None  # noqa: F841 (kept alive on purpose)
    model = load_model(resolved["model"], trial.precision)
    # Plain lists of token ids: the epoch loop indexes them thousands of times. One dataset per stage.
    stage_data = [_tokenized(source, tokenizer, trial) for source in [*resolved["prior_datasets"], resolved["dataset"]]]
    stages = trial.stages()
    checkpoint = ray.train.get_checkpoint()

    # Continual stages: the prior stages' result is where the trial's own stage starts (and its Wise-FT theta_0).
    # Saved once in the trial folder, so a restarted run does not train them again.
    start_dir = Path(config["trial_dir"]) / "stage_start"
    if trial.prior_stages:
        if not (start_dir / "config.json").is_file():
            for k, stage in enumerate(stages[:-1]):
                model = _train_prior_stage(model, trial, k, stage, stage_data, ds_config, tokenizer, rank, world,
                                           device)
            _save_stage_start(model, tokenizer, start_dir, rank, world)
        model = load_model({"name": "stage start", "path": str(start_dir)}, trial.precision)
    theta0 = _stage_start_weights(model) if trial.wiseft_alpha < 1 else None

    data = _stage_examples(trial, len(stages) - 1, stage_data)
    steps_per_epoch = len(data) // trial.batch_size
    suite = ProbeSuite.load(resolved, trial)
    em_examples = stage_data[-1][: trial.em_examples] if trial.em_examples else stage_data[-1]
    flatness_batch = _flatness_batch(suite, tokenizer, trial, device) if trial.flatness_grid else None

    engine, scheduler = build_engine(model, trial, ds_config, total_steps=steps_per_epoch * trial.epochs)

    if checkpoint is None:
        # The engine before its first step is the stage's starting model (under ZeRO-3 only the engine can run it).
        base = computed_once(config["base_eval_dir"], rank,
                             lambda out: _evaluate_base(engine, tokenizer, suite, em_examples, device, out, rank))
        if resolved.get("restore_pool"):
            computed_once(config["restoring_dir"], rank,
                          lambda out: _select_restoring_set(engine, tokenizer, stage_data[-1], resolved, trial,
                                                            device, out, rank, world))
        ray.train.report({"kind": "base", "epoch": 0, "global_step": 0, **{f"base/{k}": v for k, v in base.items()},
                          **_format_metrics("steps", base)})

    start_epoch = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(str(Path(ckpt_dir) / "deepspeed"), tag="state")
            start_epoch = json.loads((Path(ckpt_dir) / "state.json").read_text())["epoch"]

    early = _early_steps(steps_per_epoch, trial.early_checkpoints)

    def probe_early(step: int) -> None:  # fine-grained probes inside epoch 1 (format alignment happens early)
        if step in early:
            found, _ = evaluate(engine, tokenizer, suite, device, knowledge_only=True)
            ray.train.report({"kind": "step", "epoch": 1, "global_step": step, **_format_metrics("steps", found)})

    for epoch in range(start_epoch + 1, trial.epochs + 1):
        t0 = time.perf_counter()
        stats = train_epoch(engine, data, trial, epoch, rank, world, tokenizer.pad_token_id, device,
                            after_step=probe_early if epoch == 1 and early else None)
        seconds = time.perf_counter() - t0
        # The checkpoint SFT_e that is probed (and restored) is the Wise-FT mix when alpha < 1; training goes on
        # from the trained weights, which the DeepSpeed state keeps.
        surface = None
        with wiseft_weights(engine.module, theta0, trial.wiseft_alpha) as model_state:
            found, frames = evaluate(engine, tokenizer, suite, device, ift_examples=em_examples)
            if flatness_batch is not None and rank == 0:
                surface, flat = _flatness(engine.module, flatness_batch, trial)
                found.update(flat)
        metrics = {
            "kind": "epoch",
            "epoch": epoch,
            "global_step": epoch * steps_per_epoch,
            "train/loss": stats["loss"],
            "train/tokens": stats["tokens"],
            "train/examples": len(data),  # with rehearsal: the stage's own plus the replayed ones
            "train/tokens_per_s": stats["tokens"] / seconds,
            "train/epoch_seconds": seconds,
            "train/lr": scheduler.get_last_lr()[0],
            **{f"sft/{k}": v for k, v in found.items()},
            **_format_metrics("steps", found),
        }
        report_checkpoint(engine, tokenizer, metrics, frames, rank, f"epoch_{epoch:03d}", model_state=model_state,
                          surface=surface)
        if rank == 0:
            _maybe_fail_once(epoch)


def _tokenized(source: dict, tokenizer, trial: TrialConfig) -> list[dict]:
    data = tokenize_dataset(source, tokenizer, trial.max_length).to_list()
    if len(data) < trial.batch_size:
        raise ValueError(f"dataset {source['name']!r}: only {len(data)} examples keep response tokens within "
                         f"max_length={trial.max_length}, fewer than batch_size={trial.batch_size}")
    return data


def _stage_examples(trial: TrialConfig, k: int, stage_data: list[list[dict]]) -> list[dict]:
    """Stage k's training set: its own examples plus, with rehearsal, a replayed sample of stage k-1's."""
    ratio = trial.stages()[k]["rehearsal_ratio"]
    if ratio == 0:
        return stage_data[k]
    return rehearsal.mix(stage_data[k], stage_data[k - 1], ratio, seed=trial.seed)


def _stage_trial(trial: TrialConfig, stage: dict) -> TrialConfig:
    """The trial's settings with a prior stage's dataset, epochs, lr and methods (what build_engine and
    train_epoch read)."""
    return dataclasses.replace(trial, **stage)


def _train_prior_stage(model, trial: TrialConfig, k: int, stage: dict, stage_data, ds_config, tokenizer, rank, world,
                       device):
    """Fine-tune on prior stage k (its own optimizer and schedule) and return the model it leaves (Wise-FT-mixed
    with its start if the stage sets wiseft_alpha < 1)."""
    import ray.train

    stage_trial = _stage_trial(trial, stage)
    data = _stage_examples(trial, k, stage_data)
    steps = len(data) // stage_trial.batch_size
    theta0 = _stage_start_weights(model) if stage_trial.wiseft_alpha < 1 else None
    engine, _ = build_engine(model, stage_trial, ds_config, total_steps=steps * stage_trial.epochs)
    for epoch in range(1, stage_trial.epochs + 1):
        stats = train_epoch(engine, data, stage_trial, epoch, rank, world, tokenizer.pad_token_id, device)
        ray.train.report({"kind": "prior", "epoch": 0, f"prior/stage_{k + 1}/epoch_{epoch:03d}/train_loss":
                          stats["loss"]})
    module = engine.module
    if theta0 is not None:
        module.load_state_dict(wiseft.interpolate_state_dicts(theta0, _stage_start_weights(module),
                                                              stage_trial.wiseft_alpha))
    engine.destroy()
    return module


def _save_stage_start(model, tokenizer, out: Path, rank: int, world: int) -> None:
    if rank == 0:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".stage_start-"))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)  # complete or absent: a crash never leaves a half-written start model
    if world > 1:
        dist.barrier()


def _stage_start_weights(model) -> dict:
    """theta_0 for Wise-FT: a CPU copy of the weights the stage starts from."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@contextlib.contextmanager
def wiseft_weights(module, theta0: dict | None, alpha: float):
    """Inside the block the module holds (1-alpha)*theta0 + alpha*theta_trained (yields that state dict, for the
    checkpoint's Hugging Face model); afterwards exactly the trained weights again. No-op without theta0."""
    if theta0 is None:
        yield None
        return
    trained = {k: v.detach().clone() for k, v in module.state_dict().items()}
    mixed = wiseft.interpolate_state_dicts({k: v.to(trained[k].device) for k, v in theta0.items()}, trained, alpha)
    module.load_state_dict(mixed)
    try:
        yield mixed
    finally:
        module.load_state_dict(trained)


def _flatness_batch(suite: ProbeSuite, tokenizer, trial: TrialConfig, device) -> dict:
    """The fixed held-out batch of the loss surface: the first `flatness_batch` probing passages, [BOS] + tokens,
    loss on every token (the same batch for every model of a sweep)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    examples = []
    for ids in probes.encode(tokenizer, suite.passages[: trial.flatness_batch]):
        ids = (bos + ids)[: trial.probe_max_length]
        examples.append({"input_ids": ids, "labels": ids})
    return {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}


def _flatness(module, batch: dict, trial: TrialConfig) -> tuple:
    """The loss surface around the checkpoint and its SC / AG / MAG / flatness degree (METHODS.md §7). Rank 0 only:
    ZeRO 0-2 keep the full weights on every rank."""
    surface, h = flatness.loss_surface(module, lambda m: m(**batch).loss, steps=trial.flatness_grid, seed=trial.seed)
    return (surface, h), {f"flatness/{k}": v for k, v in flatness.surface_metrics(surface, h).items()}


# --- pieces shared with restoration ---

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


def worker_device() -> torch.device:
    if torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def zero3_scope(ds_config: dict):
    # transformers partitions weights at load time while an HfDeepSpeedConfig with stage 3 is alive. Its config
    # check counts ranks through deepspeed.comm, which must wrap Ray Train's process group first (else world = 1).
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed(dist_backend=dist.get_backend())
    return HfDeepSpeedConfig(ds_config)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The same global batches for any number of workers: a seeded permutation per epoch."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator)


def train_epoch(engine, data: list, trial: TrialConfig, epoch: int, rank: int, world: int, pad_id: int, device,
                after_step: Callable[[int], None] | None = None, drop_last: bool = True) -> dict:
    """One epoch: global batch s = order[s*B:(s+1)*B]; rank r takes its contiguous slice of it, split into
    gradient-accumulation micro-batches. With drop_last the incomplete last global batch is dropped (IFT); without,
    it is completed with examples from the start of the order (restoration: every token is trained on at least
    once). With `sam_rho` > 0 every `sam_every`-th optimizer step is a SAM step (`forgetray.train.sam`).
    `after_step(k)` runs on every rank after optimizer step k (1-based) of the epoch."""
    order = epoch_order(len(data), trial.seed, epoch)
    steps = len(data) // trial.batch_size if drop_last else -(-len(data) // trial.batch_size)
    if not drop_last and steps * trial.batch_size > len(order):
        order = torch.cat([order, order[: steps * trial.batch_size - len(order)]])
    per_rank = trial.micro_batch * trial.grad_accum
    losses, tokens = [], 0
    engine.train()
    for step in range(steps):
        mine = order[step * trial.batch_size + rank * per_rank: step * trial.batch_size + (rank + 1) * per_rank]
        micro_batches = []
        for micro in range(trial.grad_accum):
            idx = mine[micro * trial.micro_batch:(micro + 1) * trial.micro_batch].tolist()
            micro_batches.append({k: v.to(device) for k, v in collate([data[i] for i in idx], pad_id).items()})
            tokens += int(micro_batches[-1]["attention_mask"].sum())
        global_step = (epoch - 1) * steps + step + 1
        if trial.sam_rho > 0 and global_step % trial.sam_every == 0:
            losses += sam_step(engine, micro_batches, trial.sam_rho, trial.sam_adaptive, world)
        else:
            for batch in micro_batches:
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
                losses.append(loss.detach().float())
        if after_step is not None:
            after_step(step + 1)
    stats = torch.tensor([float(torch.stack(losses).mean()), float(tokens)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(stats)
        stats[0] /= world
    return {"loss": float(stats[0]), "tokens": float(stats[1]), "steps": steps}


def report_checkpoint(engine, tokenizer, metrics: dict, frames: dict, rank: int, name: str,
                      model_state: dict | None = None, surface: tuple | None = None) -> None:
    """Report `metrics` with a checkpoint: full DeepSpeed state (every rank writes its shards) so a restarted run
    resumes exactly, a plain Hugging Face model (what probes, restoration and users load; `model_state` if given,
    e.g. the Wise-FT mix), per-question probes (and the flatness surface with its contour plot, the paper's
    Figure 1, when given)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="forgetray-ckpt-") as tmp:
        out = Path(tmp)
        engine.save_checkpoint(str(out / "deepspeed"), tag="state")
        state = model_state
        if engine.zero_optimization_stage() == 3:
            state = engine._zero3_consolidated_16bit_state_dict()
        if rank == 0:
            engine.module.save_pretrained(out / "model", state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(out / "model")
            (out / "probes").mkdir()
            for bench, frame in frames.items():
                frame.to_parquet(out / "probes" / f"{bench}.parquet")
            if surface is not None:
                grid, h = surface
                np.save(out / "probes" / "flatness_surface.npy", grid)
                radius = h * (grid.shape[0] // 2)
                flatness.contour_png(grid, radius, out / "probes" / "flatness.png", title=f"{name} (h={h:g})")
            (out / "state.json").write_text(json.dumps({"epoch": metrics["epoch"], "metrics": metrics}, indent=1,
                                                       sort_keys=True))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


def computed_once(cache_dir: str, rank: int, compute: Callable[[Path], None]) -> dict:
    """Run `compute(tmp_dir)` on every rank unless another trial already published `cache_dir`; returns the
    published `summary.json` on rank 0 ({} elsewhere).

    Rank 0 holds a file lock while deciding, so concurrent trials compute a shared result once; the decision is
    broadcast because (under ZeRO-3) every rank must take part in the forward passes. `compute` writes into a fresh
    directory that rank 0 renames into place at the end, so a crash never leaves a half-written cache.
    """
    from filelock import FileLock

    cache = Path(cache_dir)
    cache.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(cache) + ".lock") if rank == 0 else None
    if lock:
        lock.acquire()
    try:
        state = [not (cache / "summary.json").is_file(),
                 tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}-")] if rank == 0 else [None, None]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(state, src=0)
        need, tmp = state[0], Path(state[1])
        if need:
            compute(tmp)
            if dist.get_world_size() > 1:
                dist.barrier()
            if rank == 0:
                tmp.rename(cache)
        elif rank == 0:
            tmp.rmdir()
        return json.loads((cache / "summary.json").read_text()) if rank == 0 else {}
    finally:
        if lock:
            lock.release()


# --- IFT-specific steps ---

def _evaluate_base(engine, tokenizer, suite, em_examples, device, out: Path, rank: int) -> None:
    metrics, frames = evaluate(engine, tokenizer, suite, device, ift_examples=em_examples)
    if rank == 0:
        for bench, frame in frames.items():
            frame.to_parquet(out / f"{bench}.parquet")
        (out / "summary.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))


def _select_restoring_set(engine, tokenizer, data, resolved, trial, device, out: Path, rank: int, world: int) -> None:
    """Rank the restoring pool by base-model perplexity (each rank scores its share of the stream) and keep the
    lowest-perplexity passages worth one IFT epoch of tokens (METHODS.md §2)."""
    probe_texts = load_passage_set(resolved["probe_set"])
    exclude = frozenset(text_key(t) for t in probe_texts)
    engine.eval()
    with torch.no_grad():
        def score(texts):
            return probes.passage_nlls(engine, tokenizer, texts, batch_size=trial.probe_batch_size,
                                       max_length=trial.probe_max_length, device=device)

        batches = score_pool(score, resolved["restore_pool"]["path"], out / f"scores-{rank}.parquet",
                             batch_size=trial.probe_batch_size, shard=(rank, world), exclude=exclude,
                             count_tokens=lambda texts: [len(ids) for ids in probes.encode(tokenizer, texts)])
        if world > 1:  # ZeRO-3: every rank must make the same number of forward calls
            most = torch.tensor([batches])
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            for _ in range(int(most) - batches):
                score([probe_texts[0]] * trial.probe_batch_size)
    engine.train()
    if world > 1:
        dist.barrier()  # every rank's scores are written
    if rank == 0:
        budget = sum(len(example["input_ids"]) for example in data)
        summary = build_restoring_set(resolved["restore_pool"]["path"], sorted(out.glob("scores-*.parquet")),
                                      budget, tokenizer, out / "dataset")
        (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))


def _early_steps(steps_per_epoch: int, count: int) -> set[int]:
    """`count` evenly spaced optimizer steps strictly inside epoch 1."""
    return {round(i * steps_per_epoch / (count + 1)) for i in range(1, count + 1)} - {0, steps_per_epoch}


def _format_metrics(prefix: str, found: dict) -> dict:
    """The probes Figure 4 follows along the steps, e.g. steps/<bench>/p_fmt."""
    return {f"{prefix}/{k}": v for k, v in found.items() if k.split("/")[-1] in FORMAT_KEYS and "/" in k
            and not k.startswith(("probe/", "ift/"))}


def _maybe_fail_once(epoch: int) -> None:
    spec = os.environ.get(FAIL_ONCE_ENV)
    if not spec:
        return
    marker, _, at_epoch = spec.rpartition(":")
    if int(at_epoch) == epoch and not Path(marker).exists():
        Path(marker).write_text(f"failed once after epoch {epoch}\n")
        raise RuntimeError(f"{FAIL_ONCE_ENV}: injected failure after epoch {epoch}")
