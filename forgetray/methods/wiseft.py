"""Wise-FT weight interpolation (docs/methods.md §6): theta_a = (1 - a) * theta_0 + a * theta_1 for every weight tensor,
theta_0 = the model before the fine-tuning phase (CF: the Alpaca model), theta_1 = the model after it; a defaults to 0.5.

Numerics: each floating tensor is interpolated in float32 (float64 when either input is float64) and cast back to
theta_1's dtype, so bf16/fp16 checkpoints do not lose precision in the arithmetic itself. a = 0 and a = 1 are
special-cased so that they return theta_0 / theta_1 bit for bit (the formula in floating point would not always).
Non-floating tensors (integer buffers, e.g. position ids or counters) are not interpolated: theta_1's are kept, also
at a = 0, so the output's non-weight state always comes from the model after the phase.

`interpolate_model_dirs` applies the same rule to two Hugging Face model directories stored as safetensors, one
shard at a time, and writes a directory that loads with `from_pretrained` like theta_1's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_METADATA = {"format": "pt"}


def _check_alpha(alpha: float) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return value


def _check_keys(keys0: Iterable[str], keys1: Iterable[str]) -> None:
    """ValueError naming the first (in sorted order) key present in one model and not in the other."""
    keys0, keys1 = set(keys0), set(keys1)
    if keys0 == keys1:
        return
    missing = sorted(keys1 - keys0)  # in theta1, not in theta0
    extra = sorted(keys0 - keys1)  # in theta0, not in theta1
    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) of theta1 missing from theta0, first {missing[0]!r}")
    if extra:
        parts.append(f"{len(extra)} key(s) of theta0 not in theta1, first {extra[0]!r}")
    raise ValueError("theta0 and theta1 have different keys (different architectures, or tied weights saved in "
                     "one model only): " + "; ".join(parts))


def _check_shape(key: str, shape0: Iterable[int], shape1: Iterable[int]) -> None:
    shape0, shape1 = tuple(shape0), tuple(shape1)
    if shape0 != shape1:
        raise ValueError(f"shape mismatch for {key!r}: theta0 {list(shape0)} vs theta1 {list(shape1)}")


def _compute_dtype(t0: Tensor, t1: Tensor) -> torch.dtype:
    if t0.dtype == torch.float64 or t1.dtype == torch.float64:
        return torch.float64
    return torch.float32


def interpolate_state_dicts(theta0: Mapping[str, Tensor], theta1: Mapping[str, Tensor],
                            alpha: float) -> dict[str, Tensor]:
    """(1 - alpha) * theta0 + alpha * theta1 for every floating tensor, in theta1's key order and dtype.

    Raises ValueError when the key sets differ (naming the first missing/extra key), when a key's shapes differ, or
    when alpha is outside [0, 1]. At alpha == 1 theta1's tensors are returned as they are (the same tensor objects,
    not copies); at alpha == 0 theta0's floating tensors (cast to theta1's dtype if theirs differs; the same objects
    otherwise) with theta1's non-floating ones. Otherwise new tensors on theta1's device.
    """
    alpha = _check_alpha(alpha)
    _check_keys(theta0.keys(), theta1.keys())
    for key, t1 in theta1.items():
        _check_shape(key, theta0[key].shape, t1.shape)

    out: dict[str, Tensor] = {}
    for key, t1 in theta1.items():
        t0 = theta0[key]
        if not t1.is_floating_point() or alpha == 1.0:
            out[key] = t1
        elif alpha == 0.0:
            out[key] = t0.to(device=t1.device, dtype=t1.dtype)
        else:
            dtype = _compute_dtype(t0, t1)
            mixed = t0.to(device=t1.device, dtype=dtype) * (1.0 - alpha) + t1.to(dtype=dtype) * alpha
            out[key] = mixed.to(dtype=t1.dtype)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face model directories


def _weight_map(model_dir: Path) -> dict[str, str]:
    """key -> safetensors file name (relative to model_dir), from the shard index or the single weights file."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {str(k): str(v) for k, v in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {key: SINGLE_FILE for key in f.keys()}
    raise FileNotFoundError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are "
                            "supported)")


def _shapes(model_dir: Path, weight_map: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, read from the safetensors headers (no tensor data is loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        by_file.setdefault(name, []).append(key)
    for name, keys in by_file.items():
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in keys:
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _load_tensors(model_dir: Path, weight_map: Mapping[str, str], keys: Iterable[str]) -> dict[str, Tensor]:
    """Only the named tensors of a model, read file by file (a shard is never loaded whole for a few of its keys)."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for key in keys:
        by_file.setdefault(weight_map[key], []).append(key)
    tensors: dict[str, Tensor] = {}
    for name, file_keys in by_file.items():
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in file_keys:
                tensors[key] = f.get_tensor(key)
    return tensors


def interpolate_model_dirs(dir0: str | os.PathLike, dir1: str | os.PathLike, alpha: float,
                           out_dir: str | os.PathLike) -> Path:
    """Wise-FT of two Hugging Face model directories (safetensors, single-file or sharded) into `out_dir`.

    The output has dir1's layout: each of dir1's weight files is rewritten under the same name with the interpolated
    tensors (metadata {"format": "pt"}); every other entry of dir1 (config.json, generation_config.json, tokenizer
    files, the shard index, ...) is copied unchanged. dir0 may be sharded differently: its tensors are looked up through
    its own index (or its single file).

    Memory: one of dir1's shards (read with `safetensors.torch.load_file`) and the matching tensors of dir0 (read
    tensor by tensor with `safe_open`, so no more than one shard's worth) at a time, plus their interpolation.

    Before any tensor is read, the key sets and shapes of the two models are compared from the safetensors headers
    (ValueError as in `interpolate_state_dicts`). The output is written into a temporary directory next to `out_dir`
    and renamed at the end, so a failure leaves no `out_dir` (and no temporary directory) behind. `out_dir` must not
    exist, or be an empty directory. Returns `out_dir`.
    """
    from safetensors.torch import load_file, save_file

    alpha = _check_alpha(alpha)
    dir0, dir1, out_dir = Path(dir0), Path(dir1), Path(out_dir)
    for d in (dir0, dir1):
        if not d.is_dir():
            raise FileNotFoundError(f"model directory not found: {d}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"output directory already exists and is not empty: {out_dir}")

    map0, map1 = _weight_map(dir0), _weight_map(dir1)
    _check_keys(map0.keys(), map1.keys())
    shapes0, shapes1 = _shapes(dir0, map0), _shapes(dir1, map1)
    for key in sorted(map1):
        _check_shape(key, shapes0[key], shapes1[key])

    shard_names = sorted(set(map1.values()))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.wiseft-", dir=out_dir.parent))
    try:
        for name in shard_names:
            theta1 = load_file(str(dir1 / name))
            theta0 = _load_tensors(dir0, map0, theta1.keys())
            mixed = interpolate_state_dicts(theta0, theta1, alpha)
            del theta0, theta1
            save_file({k: v.contiguous() for k, v in mixed.items()}, str(tmp / name), metadata=SAFETENSORS_METADATA)
            del mixed
        shard_set = set(shard_names)
        for entry in sorted(dir1.iterdir()):
            if entry.name in shard_set:
                continue
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name)
            else:
                shutil.copy2(entry, tmp / entry.name)
        os.replace(tmp, out_dir)  # atomic on one file system; replaces an empty out_dir
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
