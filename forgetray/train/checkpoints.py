"""What a worker writes to storage: checkpoints reported to Ray Train, results computed once per sweep and shared
across trials, and the model directory a phase hands to the next one. Every write is complete or absent: files go
to a temporary directory that is renamed into place (or handed to Ray Train) at the end.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch.distributed as dist

from forgetray import flatness


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


def checkpoint_epoch(checkpoint) -> int:
    """The epoch a reported checkpoint (a `ray.train.Checkpoint`) was taken at."""
    with checkpoint.as_directory() as ckpt_dir:
        return int(json.loads((Path(ckpt_dir) / "state.json").read_text())["epoch"])


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


def save_model_dir(model, tokenizer, out: Path, rank: int, world: int) -> None:
    """Save a full model + tokenizer as a Hugging Face directory at `out` (rank 0), complete or absent."""
    if rank == 0:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)  # a crash never leaves a half-written model
    if world > 1:
        dist.barrier()
