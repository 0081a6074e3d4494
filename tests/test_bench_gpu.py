"""bench/bench_gpu.py's --smoke mode (the CPU twin of the GPU training bench) runs and prints every row, with numbers
that add up: the model's size and FLOPs per token against a count by hand, each row's MFU, s/step and ratio against its
tokens/s, the first-batch losses (equal, and a random model's), SAM's cost against the table.

The GPU run itself (bf16, NCCL, a 1B-class Llama) needs a GPU; the smoke mode takes the same code path on DeepSpeed's
CPU accelerator over gloo, with a tiny fp32 model, so a broken bench is caught here before a device run is spent.
"""

from __future__ import annotations

import math
import os
import re
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


PEAK = 1e10  # --peak-flops for the smoke run: a CPU's tokens/s then show as a readable MFU (at 989e12 it is 0.0%)
# The smoke model (bench_gpu.SMOKE) by hand: vocab 512, hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 KV
# heads (KV width 32), no biases, untied head; sequences of 32 tokens, micro-batch 2, no accumulation.
V, H, I, L, KV, SEQ, TOKENS_PER_STEP = 512, 64, 128, 2, 32, 32, 2 * 32
LAYER = H * H + 2 * H * KV + H * H + 3 * H * I + 2 * H  # q, k, v, o; gate, up, down; two RMSNorms = 36,992
N_PARAMS = V * H + L * LAYER + H + H * V  # embedding, layers, final norm, LM head = 139,584
N_MATMUL = N_PARAMS - V * H  # all but the input embedding = 106,816
FLOPS_PER_TOKEN = 6 * N_MATMUL + 6 * L * SEQ * H  # 640,896 + 24,576 = 665,472


def _number(text: str) -> float:
    return float(text.replace(",", "").rstrip("%"))


@pytest.mark.slow  # ~45 s on a 2-core machine: imports, two DeepSpeed engines, 9 timed sides
def test_smoke_mode_prints_every_row():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--smoke", "--peak-flops",
                             str(PEAK)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-4000:]
    lines = out.splitlines()
    # the model's size and FLOPs per token, against the hand counts above
    model = next(line for line in lines if line.startswith("model: random Llama"))
    found = re.search(r"; ([\d,]+) parameters, ([\d,]+) in matmuls", model)
    assert found and (_number(found[1]), _number(found[2])) == (N_PARAMS, N_MATMUL), model
    flops = next(line for line in lines if line.startswith("FLOPs per token"))
    found = re.search(r"6 x N = ([\d.e+-]+) GFLOP \+ causal attention 6 x L x s x h = ([\d.e+-]+) GFLOP = "
                      r"([\d.e+-]+) GFLOP", flops)
    assert found, flops
    assert [float(x) * 1e9 for x in found.groups()] == pytest.approx(
        [6 * N_MATMUL, 6 * L * SEQ * H, FLOPS_PER_TOKEN], rel=1e-3), flops
    assert f"= {TOKENS_PER_STEP} tokens per optimizer step" in next(l for l in lines if l.startswith("batch: "))

    # the table: every row once, and each row's numbers consistent with its tokens/s
    start = next(i for i, line in enumerate(lines) if line.startswith("row "))
    table = lines[start + 1:]
    rows = {}
    for row in ROWS:
        hits = [line for line in table if line.startswith(row)]
        assert len(hits) == 1, f"row {row!r} missing or repeated in:\n{out}"
        assert "FAILED" not in hits[0], hits[0]
        cells = re.split(r"\s{2,}", hits[0][len(row):].strip())
        rows[row] = {"tok_s": _number(cells[0]), "mfu": _number(cells[1]), "step_s": _number(cells[2]),
                     "ratio": cells[4], "per_round": cells[5], "vs": cells[6] if len(cells) > 6 else "-"}
    assert len([line for line in table if "ckpt o" in line]) == len(ROWS), out  # no other rows
    for row, r in rows.items():
        passes = 2 if "SAM" in row else 1  # SAM: two forward+backward passes per trained token
        assert r["tok_s"] > 0
        # MFU = passes x FLOPs/token x tokens/s / peak, in %, to the printed 0.1 (tokens/s printed to the unit)
        want = 100 * passes * FLOPS_PER_TOKEN * r["tok_s"] / PEAK
        assert abs(r["mfu"] - want) <= 0.05 + 100 * passes * FLOPS_PER_TOKEN * 0.5 / PEAK, (row, want, r)
        # s/step = tokens per step / tokens/s, to the printed 0.001
        assert r["step_s"] == pytest.approx(TOKENS_PER_STEP / r["tok_s"], abs=6e-4, rel=1e-3), (row, r)
        if r["vs"] == "-":
            assert r["ratio"] == "-" and row.startswith("plain"), (row, r)
            continue
        # ratio = tokens/s / the vs row's; a ratio of medians over 2 rounds lies within the per-round ratios
        ratio, (low, high) = float(r["ratio"]), map(float, r["per_round"].split(" .. "))
        assert ratio == pytest.approx(r["tok_s"] / rows[r["vs"].replace("SAM rho", "SAM rho 0.05")]["tok_s"],
                                      rel=5e-3, abs=1e-3), (row, r)
        assert low - 1e-3 <= ratio <= high + 1e-3, (row, r)
    assert {r["vs"] for r in rows.values()} - {"-"} == {
        "plain PyTorch loop (ZeRO-2 group), ckpt off", "plain PyTorch loop (ZeRO-2 group), ckpt on",
        "forgetray train_epoch, ZeRO-2, ckpt off", "plain PyTorch loop (ZeRO-3 group), ckpt off",
        "plain PyTorch loop (ZeRO-3 group), ckpt on"}

    # Every engine and the plain model start from the same weights: the same first-batch loss, that of a random
    # model (its logits near 0: about ln V)
    first = next(line for line in lines if line.startswith("first-batch loss"))
    losses = [float(x) for x in re.findall(r" (\d+\.\d{6})", first)]
    assert len(losses) == 4 and len(set(losses)) == 1 and first.endswith("(identical)"), first
    assert losses[0] == pytest.approx(math.log(V), abs=0.1), first
    # The GPU machine has no Ray, MLflow or datasets: forgetray's part of the bench must not import them.
    imports = next(line for line in lines if line.startswith("forgetray + torch + transformers imports loaded: "))
    loaded, _, checked = imports.split(": ", 1)[1].partition(" of ")
    assert loaded == "none" and checked.split(", ") == ["ray", "mlflow", "datasets", "pyarrow"], imports
    # SAM's cost: its s/step over the plain forgetray ZeRO-2 step's = the inverse ratio of their tokens/s
    sam = next(line for line in lines if line.startswith("SAM cost: one SAM step"))
    found = re.search(r"takes ([\d.]+)x a plain forgetray ZeRO-2 step", sam)
    want = rows["forgetray train_epoch, ZeRO-2, ckpt off"]["tok_s"] / rows["forgetray SAM rho 0.05, ZeRO-2, ckpt off"][
        "tok_s"]
    assert found and float(found[1]) == pytest.approx(want, rel=2e-3, abs=6e-3), (sam, want)
