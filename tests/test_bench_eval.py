"""bench/bench_eval.py's CPU smoke run (a few MMLU-format subjects on the organism's shape): forgetray's scorer and
lm-eval's HFLM score the same requests, in the suite, so the evaluation bench's GPU rows are one command away. The
check is lm-eval itself: every prediction identical, log-likelihoods equal to float precision."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # ~30-60 s: lm-eval's import and two scorers, 2 rounds
def test_smoke_run_agrees_with_lm_eval():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_eval.py"), "--model", "organism",
                             "--subjects", "2", "--per-subject", "6", "--rounds", "2", "--max-length", "512"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-4000:]
    assert "requests: 12 prompts x 4 continuations, 2 subjects" in out, out
    agree, delta = re.search(r"predictions identical: ([\d.]+); max \|delta log-likelihood\| ([\d.e+-]+)", out).groups()
    assert float(agree) == 1.0 and float(delta) < 1e-3, out
    walls = dict(re.findall(r"^\s+(forgetray|lm-eval)\s+wall\s+([\d.]+) s", out, re.MULTILINE))
    ratio = float(re.search(r"ratio lm-eval/forgetray: wall ([\d.]+)x", out).group(1))
    assert walls.keys() == {"forgetray", "lm-eval"}
    assert ratio == pytest.approx(float(walls["lm-eval"]) / float(walls["forgetray"]), rel=0.06, abs=0.06)


@pytest.mark.slow  # ~25 s: bf16 on the CPU, plus the fp32 reference pass
def test_bf16_smoke_run_keeps_the_fp32_predictions():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_eval.py"), "--model", "organism",
                             "--subjects", "2", "--per-subject", "6", "--rounds", "1", "--max-length", "512",
                             "--dtype", "bf16", "--batch-tokens", "4096", "--fp32-ties", "0.1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-4000:]
    assert "4096 tokens/call, fp32 re-scoring within 0.1 nats" in out, out
    redone, total = map(int, re.search(r"re-scored in fp32: (\d+) of (\d+) prompts", out).groups())
    assert total == 12 and 0 <= redone < total
    ours, theirs = map(float, re.search(r"fp32 copy\): forgetray ([\d.]+), lm-eval ([\d.]+)", out).groups())
    assert ours == 1.0 and 0.5 <= theirs <= 1.0, out  # 12 prompts: one flip would be 0.917 < the bench's 0.995
