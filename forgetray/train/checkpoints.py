"""What a worker writes to storage: checkpoints reported to Ray Train, results computed once per sweep and shared
across trials, and the model directory a phase hands to the next one. Every write is complete or absent: files go
to a temporary directory that is renamed into place (or handed to Ray Train) at the end.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch.distributed as dist

from forgetray import flatness
from forgetray import storage as store
from forgetray.metrics import registry
from forgetray.train import lora
from forgetray.train.retention import DEEPSPEED_DIR, STATE_FILE, checkpoint_location


def report_checkpoint(engine, tokenizer, metrics: dict, frames: dict, ctx, name: str,
                      model_state: dict | None = None, surface: tuple | None = None, save_state: bool = True) -> None:
    """Report `metrics` with a checkpoint: full DeepSpeed state (every rank writes its shards; unless `save_state`
    is False) so a restarted run resumes exactly, a plain Hugging Face model in the training dtype (what probes,
    restoration and users load; `model_state` if given, e.g. the Wise-FT mix), per-question probes (and the
    flatness surface with its contour plot, the paper's Figure 1, when given). A LoRA phase's checkpoint also holds
    its adapter (`adapter/`, peft's format), its `model/` is the merged model, and its DeepSpeed state leaves out
    the frozen weights (the start's: resuming loads them from there). `ctx` (`train.context.RankContext`) reports
    it: into its member's folder of the Ray Train run."""
    import ray.train

    rank = ctx.rank
    with tempfile.TemporaryDirectory(prefix="forgetray-ckpt-") as tmp:
        out = Path(tmp)
        module = engine.module
        adapted = lora.is_lora(module)
        if save_state:
            engine.save_checkpoint(str(out / DEEPSPEED_DIR), tag="state", exclude_frozen_parameters=adapted)
        state = model_state
        if engine.zero_optimization_stage() == 3:
            state = engine._zero3_consolidated_16bit_state_dict()
        if rank == 0:
            if adapted:
                lora.save_adapter(module, out / lora.ADAPTER_DIR)
                state = lora.merged_state_dict(module) if state is None else state
                module = module.get_base_model()  # saves `state` under the plain model's names and config
            module.save_pretrained(out / "model", state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(out / "model")
            (out / "probes").mkdir()
            for bench, frame in frames.items():
                frame.to_parquet(out / "probes" / f"{bench}.parquet")
            if surface is not None:
                grid, h = surface
                np.save(out / "probes" / "flatness_surface.npy", grid)
                radius = h * (grid.shape[0] // 2)
                flatness.contour_png(grid, radius, out / "probes" / "flatness.png", title=f"{name} (h={h:g})")
            (out / STATE_FILE).write_text(json.dumps({"epoch": metrics["epoch"], "member": ctx.member,
                                                      "metrics": metrics}, indent=1, sort_keys=True))
        ctx.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), name=name)


def read_state(checkpoint_dir) -> dict:
    """A checkpoint folder's `state.json`: {"epoch", "metrics" (its report)}."""
    return json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())


def checkpoint_epoch(checkpoint, kind: str | None = None) -> int:
    """The epoch a reported checkpoint (a `ray.train.Checkpoint`) was taken at. With `kind` ("epoch": an IFT
    checkpoint SFT_e, "restored": R_e), 0 if the checkpoint is of another kind: a Ray Train run that restores after
    its IFT phase (restore_group=0) resumes from either."""
    state = checkpoint_state(checkpoint)
    if kind is not None and state["metrics"].get("kind") != kind:
        return 0
    return int(state["epoch"])


def checkpoint_state(checkpoint) -> dict:
    """A reported checkpoint's (a `ray.train.Checkpoint`'s) `state.json`, read alone through its filesystem: on
    object storage one small read, not the whole checkpoint downloaded."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as f:
        return json.loads(f.read())


def report_resumed(ctx, checkpoint, metrics: dict) -> None:
    """Report the checkpoint a restarted run resumes from once more (`metrics`: its saved report), without a
    checkpoint (every rank, as Ray Train wants). Ray Train records a reported checkpoint (the next resume point)
    before its callbacks log the report to MLflow, so a run killed in between would otherwise never log that
    epoch's metrics and probes; the MLflow callback skips the steps the run already has and logs the probes from
    `registry.RESUMED_FROM`."""
    ctx.report({**metrics, registry.RESUMED_FROM: str(checkpoint_location(checkpoint))})


def computed_once(cache_dir: str, rank: int, compute: Callable[[Path], None]) -> dict:
    """Run `compute(tmp_dir)` on every rank unless another trial already published `cache_dir`; returns the
    published `summary.json` on rank 0 ({} elsewhere).

    Rank 0 holds a file lock while deciding, so concurrent trials compute a shared result once; the decision is
    broadcast because (under ZeRO-3) every rank must take part in the forward passes. `compute` writes into a fresh
    directory that rank 0 renames into place at the end, so a crash never leaves a half-written cache.
    """
    from filelock import FileLock

    if store.is_remote(cache_dir):
        return _computed_once_remote(cache_dir, rank, compute)
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


def _computed_once_remote(location: str, rank: int, compute: Callable[[Path], None]) -> dict:
    """`computed_once` on object storage: rank 0 runs the create-if-absent protocol (`forgetray.claims`) instead of
    the lock; the winner's ranks compute into a temporary folder that rank 0 uploads whole and publishes, every
    other trial waits for the publication and reads it (downloaded into the node's cache)."""
    from forgetray import claims

    got = store.acquire(location) if rank == 0 else None
    state = [isinstance(got, claims.Claim)]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(state, src=0)
    if state[0]:
        tmp = Path(tempfile.mkdtemp(prefix="forgetray-shared-"))
        try:
            compute(tmp)
            if dist.get_world_size() > 1:
                dist.barrier()
            if rank == 0:
                store.put_dir(tmp, store.SCHEME + got.data)
                claims.publish(store.S3Objects(), got)
        except BaseException:
            if rank == 0:
                claims.release(store.S3Objects(), got)
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return json.loads((store.fetch(location) / "summary.json").read_text()) if rank == 0 else {}


def save_model_dir(model, tokenizer, out: Path, rank: int, world: int) -> None:
    """Save a full model + tokenizer as a Hugging Face directory at `out` (rank 0), complete or absent."""
    if rank == 0:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)  # a crash never leaves a half-written model
    if world > 1:
        dist.barrier()
