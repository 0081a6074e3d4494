"""bench/bench_gpu.py's --smoke mode (the CPU twin of the GPU training bench) runs and prints every row.

The GPU run itself (bf16, NCCL, a 1B-class Llama) needs a GPU; the smoke mode takes the same code path on DeepSpeed's
CPU accelerator over gloo, with a tiny fp32 model, so a broken bench is caught here before a device run is spent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROWS = [
    "plain PyTorch loop (ZeRO-2 group), ckpt off",
    "forgetray train_epoch, ZeRO-2, ckpt off",
    "plain PyTorch loop (ZeRO-2 group), ckpt on",
    "forgetray train_epoch, ZeRO-2, ckpt on",
    "forgetray SAM rho 0.05, ZeRO-2, ckpt off",
    "plain PyTorch loop (ZeRO-3 group), ckpt off",
    "forgetray train_epoch, ZeRO-3, ckpt off",
    "plain PyTorch loop (ZeRO-3 group), ckpt on",
    "forgetray train_epoch, ZeRO-3, ckpt on",
]


@pytest.mark.slow  # ~45 s on a 2-core machine: imports, two DeepSpeed engines, 9 timed sides
def test_smoke_mode_prints_every_row():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--smoke"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-4000:]
    lines = out.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("row ")):]
    for row in ROWS:
        hits = [line for line in table if line.startswith(row)]
        assert len(hits) == 1, f"row {row!r} missing or repeated in:\n{out}"
        assert "FAILED" not in hits[0], hits[0]
        assert "%" in hits[0]  # the MFU column
    assert len([line for line in table if "ckpt o" in line]) == len(ROWS), out  # no other rows
    # Every engine and the plain model start from the same weights: the same first-batch loss.
    assert any(line.startswith("first-batch loss") and line.endswith("(identical)") for line in lines), out
    # The GPU machine has no Ray, MLflow or datasets: forgetray's part of the bench must not import them.
    assert "forgetray + torch + transformers imports loaded: none of" in out, out
    assert any(line.startswith("SAM cost: one SAM step") for line in lines), out
    assert "FLOPs per token: 6 x N" in out
