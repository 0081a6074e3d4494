"""The report's continual-learning table (docs/methods.md §9), built from `TrialData` alone: per trial the matrix a[t][b]
(fine-tuning steps x benchmarks), then forgetting per benchmark and backward transfer.

The matrix is `continual/<bench>/knowledge` at step t (0 = before any fine-tuning, 1..k = after each prior phase,
k+1 = the IFT phase's last checkpoint); forgetting and BWT are the values the trial logged at T, or, where a trial
did not log them (it failed before), computed here from the matrix by the same functions
(`forgetray.metrics.continual`).
"""

from __future__ import annotations

import ast
import math
from typing import Any

import pandas as pd

from forgetray.metrics import continual, registry
from forgetray.report.runs import TrialData, short

FORGETTING_ROW = "forgetting"  # the `row` of a trial's summary line (its matrix lines are "a")
# The column of each step's own benchmark; not "own_benchmark", which is also a setting and may be a varying one.
OWN = "step_own_benchmark"


def _prior_phases(trial: TrialData) -> list[dict]:
    """The trial's prior phases as its `prior_phases` setting lists them ([] when unreadable or none)."""
    try:
        phases = ast.literal_eval(trial.settings.get("prior_phases", "[]"))
    except (ValueError, SyntaxError):
        return []
    return [dict(p) for p in phases] if isinstance(phases, (list, tuple)) else []


def has_prior_phases(trials: list[TrialData]) -> bool:
    return any(_prior_phases(trial) for trial in trials)


def _steps(trial: TrialData) -> list[tuple[str, str]]:
    """(what step t is, its own benchmark as the trial names it, "" = none) for t = 0..T."""
    priors = _prior_phases(trial)
    return ([("before fine-tuning", "")] + [(f"prior_{i + 1}", p.get("own_benchmark", "")) for i, p in enumerate(priors)]
            + [("ift", trial.settings.get("own_benchmark", ""))])


def _own_key(trial: TrialData, own: str) -> str | None:
    """The benchmark key (as in metric names) a setting's own benchmark names: the entry itself or a file's stem."""
    if not own:
        return None
    for key in (own, own.rstrip("/").rsplit("/", 1)[-1].split(".")[0]):
        if key in trial.benchmarks:
            return key
    return None


def _trial_rows(trial: TrialData, varying: list[str]) -> list[dict[str, Any]]:
    steps = _steps(trial)
    last = len(steps) - 1  # T
    matrix = [{bench: value for bench in trial.benchmarks
               if math.isfinite(value := trial.at(registry.CONTINUAL_KNOWLEDGE.name(bench=bench), t))}
              for t in range(last + 1)]
    if not any(matrix):
        return []
    head = {"trial": trial.name, **{key: trial.settings.get(key) for key in varying}}
    rows = [{**head, "row": "a", "step": t, "phase": phase, OWN: _own_key(trial, own) or "",
             **{bench: matrix[t].get(bench, math.nan) for bench in trial.benchmarks}}
            for t, (phase, own) in enumerate(steps)]
    computed = continual.forgetting_by_benchmark(matrix)
    summary = {**head, "row": FORGETTING_ROW, "step": last, "phase": "", OWN: ""}
    for bench in trial.benchmarks:
        logged = trial.at(registry.CONTINUAL_FORGETTING.name(bench=bench), last)
        summary[bench] = logged if math.isfinite(logged) else computed.get(bench, math.nan)
    logged = trial.at(registry.CONTINUAL_BWT.name(), last)
    own = [_own_key(trial, own) for _, own in steps]
    summary["bwt"] = logged if math.isfinite(logged) else continual.backward_transfer(matrix, own)
    return rows + [summary]


def continual_table(trials: list[TrialData], varying: list[str]) -> pd.DataFrame:
    """Per trial: one row per fine-tuning step (`row` "a": a[t][b] per benchmark column, the step's phase and own
    benchmark), then its summary (`row` "forgetting": forgetting per benchmark column, and `bwt`). Empty unless some
    trial has prior phases."""
    if not has_prior_phases(trials):
        return pd.DataFrame()
    rows = [row for trial in trials for row in _trial_rows(trial, varying)]
    if not rows:
        return pd.DataFrame()
    benches = list(dict.fromkeys(bench for trial in trials for bench in trial.benchmarks))
    head = ["trial", *varying, "row", "step", "phase", OWN]
    return pd.DataFrame(rows, columns=[*head, *benches, "bwt"])


def continual_text(table: pd.DataFrame, varying: list[str]) -> str:
    """The continual table for a terminal: one block per trial, scores to 3 places, forgetting and BWT signed."""
    blocks = []
    benches = [c for c in table.columns if c not in {"trial", *varying, "row", "step", "phase", OWN, "bwt"}]
    for name, rows in table.groupby("trial", sort=False):
        settings = ", ".join(f"{key}={short(rows.iloc[0][key])}" for key in varying)
        lines = {"": [], "step": [], "after": [], "own": [], **{b: [] for b in benches}, "BWT": []}
        for _, row in rows.iterrows():
            summary = row["row"] == FORGETTING_ROW
            lines[""].append("forgetting" if summary else "a[t]")
            lines["step"].append("" if summary else str(int(row["step"])))
            lines["after"].append(row["phase"])
            lines["own"].append(row[OWN] or ("" if summary else "-"))
            for bench in benches:
                value = row[bench]
                lines[bench].append("-" if pd.isna(value) else (f"{value:+.3f}" if summary else f"{value:.3f}"))
            lines["BWT"].append("" if not summary else "-" if pd.isna(row["bwt"]) else f"{row['bwt']:+.3f}")
        blocks.append(f"  {name}" + (f" ({settings})" if settings else "") + ":\n"
                      + pd.DataFrame(lines).to_string(index=False))
    return "\n".join(blocks)
