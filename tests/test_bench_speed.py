"""bench/bench_speed.py's --smoke mode (the CPU twin of the GPU speed-settings bench) runs every row with the numbers
its table says: a bench broken here would cost a device run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROWS = ["same-numerics loop (fp32 masters, clip 1.0)", "forgetray, padded", "forgetray + packing",
        "forgetray + chunked_loss 16", "forgetray + compile", "forgetray + all three"]


@pytest.mark.slow  # ~70 s on 2 cores: two engines (one compiled), six rows
def test_smoke_mode_runs_every_row():
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_speed import alpaca_shaped

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_speed.py"), "--smoke"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-4000:]
    # the data line: the real and padded token counts of the smoke data (8 examples, batches of 4), by hand here
    data = alpaca_shaped(8, 256, 512, 0)
    real = sum(len(ex["input_ids"]) for ex in data)
    padded = sum(4 * max(len(ex["input_ids"]) for ex in data[i:i + 4]) for i in (0, 4))
    assert f"{real} real tokens; padded batches of 4 hold {padded}" in out, out
    rates = {}
    for row in ROWS:
        hits = [line for line in out.splitlines() if line.startswith(row)]
        assert len(hits) == 1, f"row {row!r} missing or repeated in:\n{out}"
        rate, _mfu, ratio = re.findall(r"[\d,.]+%?", hits[0][len(row):])[-3:]
        rates[row] = (float(rate.replace(",", "")), float(ratio))
    assert all(rate > 0 for rate, _ in rates.values())
    assert rates["forgetray, padded"][1] == 1.0
    for row, (rate, ratio) in rates.items():  # the ratio column is the row's rate over the padded row's
        assert ratio == pytest.approx(rate / rates["forgetray, padded"][0], rel=2e-3, abs=2e-3), row
