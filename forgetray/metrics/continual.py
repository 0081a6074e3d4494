"""Continual-learning metrics over a trial's fine-tuning steps (docs/methods.md §9, as TRACE and Avalanche define them).

Pure functions on an accuracy matrix: `matrix[t][b]` = benchmark b's primary knowledge score after fine-tuning step t,
t = 0 (the model before any fine-tuning), 1..k (after each prior phase), T = k + 1 (after the IFT phase: its last
checkpoint). A step's row may lack a benchmark (or hold nan): it was not measured, and is left out.

- forgetting of b = max over t < T of a[t][b] - a[T][b] (the forgetting measure of Chaudhry et al. 2018, which
  Avalanche's `StreamForgetting` and TRACE report): the drop from b's best earlier value. It is NOT clamped at 0:
  like Avalanche's forgetting and TRACE's BWT, it is signed, and a benchmark that ends above every earlier value has
  negative forgetting (by how much it improved on its best). Clamping would hide that, and a mean over benchmarks
  would then only ever grow.
- backward transfer BWT = mean over steps i < T that have an own benchmark task_i of a[T][task_i] - a[i][task_i]
  (TRACE's BWT; Avalanche's BWT is the same difference per experience). Step 0 (no training) never has one, so a
  trial with T = 1 has no BWT (nan), as TRACE's 1/(T-1) normalisation says.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

Matrix = Sequence[Mapping[str, float]]  # one row per fine-tuning step t = 0..T: benchmark -> score


def _value(row: Mapping[str, float], bench: str) -> float:
    value = row.get(bench, math.nan)
    return float(value) if value is not None else math.nan


def forgetting(matrix: Matrix, bench: str) -> float:
    """max over t < T of a[t][bench] - a[T][bench] (signed); nan without a final or any earlier value."""
    if len(matrix) < 2:
        return math.nan
    final = _value(matrix[-1], bench)
    earlier = [v for row in matrix[:-1] if math.isfinite(v := _value(row, bench))]
    if not math.isfinite(final) or not earlier:
        return math.nan
    return max(earlier) - final


def forgetting_by_benchmark(matrix: Matrix) -> dict[str, float]:
    """Forgetting of every benchmark the matrix has (in order of first appearance); nan where undefined."""
    benches = list(dict.fromkeys(b for row in matrix for b in row))
    return {bench: forgetting(matrix, bench) for bench in benches}


def backward_transfer(matrix: Matrix, own: Sequence[str | None]) -> float:
    """Mean over steps i < T with an own benchmark (`own[i]`, None = none) of a[T][own_i] - a[i][own_i]; nan when
    no step contributes. `own` has one entry per step of the matrix (its last, the IFT phase's, is not used)."""
    if len(own) != len(matrix):
        raise ValueError(f"own benchmarks: {len(own)} entries for a matrix of {len(matrix)} steps")
    final = matrix[-1] if matrix else {}
    diffs = []
    for row, bench in zip(matrix[:-1], own[:-1]):
        if bench is None:
            continue  # a step without its own benchmark (the base model, or a phase on unrelated data)
        diff = _value(final, bench) - _value(row, bench)
        if math.isfinite(diff):
            diffs.append(diff)
    return sum(diffs) / len(diffs) if diffs else math.nan
