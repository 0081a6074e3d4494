"""The pooled stage table of a replicated sweep (METHODS.md §10): per replicate group and checkpoint, the stage decided
from all replicates' per-question outcomes (`forgetray.metrics.pooled`), how many replicates agree, knowledge mean
and sd over seeds, and the transition epoch's median and range.

A sweep run with `replicates=n` (the parent run's `sweep.replicates` param) is pooled; a sweep without replicates,
`seed=grid([...])` included, is not (its trials are independent). A group is the trials whose settings are equal
but for the seed (`grids.replicate_group`; its id is the trials' `forgetray.replicate_group` tag where logged). The
outcomes are each trial's `stages/per_question_<bench>.parquet` artifact, read through `forgetray.tracking`; the
probing perplexities the restoration rule needs are the trial's logged metrics.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from forgetray.grids import TAG_REPLICATE_GROUP
from forgetray.metrics import registry
from forgetray.metrics.pooled import ReplicateOutcome, classify_pooled, transition_summary
from forgetray.metrics.stage import transition_epoch
from forgetray.report.runs import TrialData, short
from forgetray.report.tables import STAGE_SHORT, setting_column
from forgetray.tracking import TAG_STAGE_BENCHMARK, Tracker

POOLED_CSV, POOLED_TXT = "pooled_stage_table.csv", "pooled_stage_table.txt"
_STATES = ("base", "sft", "restored")


@dataclass
class ReplicateGroup:
    """One grid point's replicates: its id, a label of its varying settings (the seed left out), its trials in seed
    order, and their outcomes (trial run id -> the per-question frame; a trial without one is left out)."""

    group: str
    label: str
    settings: dict[str, str]
    trials: list[TrialData]
    outcomes: dict[str, pd.DataFrame]


def sweep_replicates(parent: Any) -> int:
    """The replicates the sweep run asked for (its `sweep.replicates` param); 1 for older sweep runs without it."""
    try:
        return int(parent.data.params.get("sweep.replicates", "1"))
    except (TypeError, ValueError):
        return 1


def _seed(trial: TrialData) -> int:
    try:
        return int(trial.settings.get("seed", 0))
    except ValueError:
        return 0


def replicate_groups(trials: list[TrialData], replicates: int, varying: list[str]) -> list[ReplicateGroup]:
    """The sweep's replicate groups in order of their first trial, each trial's outcomes not yet read; [] unless the
    sweep asked for replicates."""
    if replicates <= 1:
        return []
    by_point: dict[tuple, list[TrialData]] = {}
    for trial in trials:
        by_point.setdefault(tuple(sorted((k, v) for k, v in trial.settings.items() if k != "seed")), []).append(trial)
    groups = []
    shown = [key for key in varying if key != "seed"]
    for point, members in by_point.items():
        members = sorted(members, key=_seed)
        tags = [t.tags[TAG_REPLICATE_GROUP] for t in members if TAG_REPLICATE_GROUP in t.tags]
        group = tags[0] if tags else hashlib.sha256(repr(point).encode()).hexdigest()[:10]
        settings = {key: members[0].settings.get(key) for key in shown}
        label = ", ".join(f"{key}={short(value)}" for key, value in settings.items()) or "all"
        label += f" (seeds {','.join(str(_seed(t)) for t in members)})"
        groups.append(ReplicateGroup(group, label, settings, members, {}))
    return groups


def load_outcomes(tracker: Tracker, groups: list[ReplicateGroup]) -> list[str]:
    """Read every trial's per-question outcomes into its group; the notes for trials that have none."""
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        for group in groups:
            for trial in group.trials:
                bench = trial.tags.get(TAG_STAGE_BENCHMARK) or trial.primary
                path = f"stages/per_question_{bench}.parquet"
                try:
                    local = tracker.download_artifacts(trial.run_id, path, Path(tmp) / trial.run_id)
                    group.outcomes[trial.run_id] = pd.read_parquet(local)
                except Exception:  # noqa: BLE001 - a trial without stages (no restoration, failed) is left out
                    notes.append(f"pooled table: {trial.name} has no {path} (no stage judged), left out of its group")
    return notes


def _float_setting(trial: TrialData, key: str, default: float) -> float:
    try:
        return float(trial.settings.get(key, default))
    except ValueError:
        return default


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def group_rows(group: ReplicateGroup) -> list[dict[str, Any]]:
    """The group's rows, one per checkpoint epoch any replicate judged, pooled over the replicates that judged it."""
    members = [t for t in group.trials if t.run_id in group.outcomes]
    if not members:
        return []
    alpha = _float_setting(members[0], "stage_alpha", 0.05)
    tolerance = _float_setting(members[0], "ppl_tolerance", 0.05)
    base_ppl = registry.PROBE_PPL.name(state="base")
    restored_ppl = registry.PROBE_PPL.name(state="restored")
    epochs = sorted({int(e) for t in members for e in group.outcomes[t.run_id]["epoch"].unique()})
    rows, own_stages, pooled_stages = [], {t.run_id: {} for t in members}, {}
    for epoch in epochs:
        judged, replicates, accuracy = [], [], {state: [] for state in _STATES}
        for trial in members:
            frame = group.outcomes[trial.run_id]
            frame = frame[frame["epoch"] == epoch].sort_values("index")
            if frame.empty:
                continue
            judged.append(trial)
            outcome = ReplicateOutcome(*(frame[f"{state}_correct"].to_numpy(dtype=bool) for state in _STATES),
                                       trial.at(base_ppl, 0), trial.at(restored_ppl, epoch))
            replicates.append(outcome)
            for state, correct in zip(_STATES, (outcome.base_correct, outcome.sft_correct, outcome.restored_correct)):
                accuracy[state].append(float(correct.mean()))
        pooled = classify_pooled(replicates, alpha=alpha, ppl_tolerance=tolerance)
        pooled_stages[epoch] = pooled.stage
        for trial, stage in zip(judged, pooled.replicate_stages):
            own_stages[trial.run_id][epoch] = stage
        row: dict[str, Any] = {"group": group.group, "label": group.label,
                               **{setting_column(k): v for k, v in group.settings.items()},
                               "epoch": epoch, "benchmark": members[0].tags.get(TAG_STAGE_BENCHMARK) or
                               members[0].primary, "replicates": pooled.n,
                               "seeds": ",".join(str(_seed(t)) for t in judged), "stage": pooled.stage,
                               "agreeing": f"{pooled.agreeing}/{pooled.n}",
                               "replicate_stages": ",".join(STAGE_SHORT[s] for s in pooled.replicate_stages),
                               "restored": f"{pooled.n_restored}/{pooled.n}", "d_sft": pooled.d_sft,
                               "d_restored": pooled.d_restored, "p_sft": pooled.p_sft, "p_restored": pooled.p_restored}
        for state in _STATES:
            row[f"knowledge_{state}_mean"], row[f"knowledge_{state}_sd"] = _mean_sd(accuracy[state])
        rows.append(row)
    summary = transition_summary([own_stages[t.run_id] for t in members])
    pooled_transition = transition_epoch(pooled_stages)
    for row in rows:
        row.update({"transition_pooled": pooled_transition, "transition_median": summary.median,
                    "transition_low": summary.low, "transition_high": summary.high,
                    "transition_reached": f"{summary.reached}/{len(members)}"})
    return rows


def pooled_table(groups: list[ReplicateGroup]) -> pd.DataFrame:
    """One row per replicate group x checkpoint (`group_rows`), in group order."""
    return pd.DataFrame([row for group in groups for row in group_rows(group)])


def _epoch(value: Any) -> str:
    return "none" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:g}"


def pooled_text(table: pd.DataFrame) -> str:
    """The pooled table as text: a block per group, a line per checkpoint, then the group's transition epoch."""
    lines = ["pooled over replicates (METHODS.md §10): exact McNemar on the discordant pairs summed over seeds; "
             "agree = replicates whose own test gives the pooled stage; knowledge mean +- sd over seeds",
             f"{'epoch':>5}  {'stage':<12} {'agree':>5}  {'restored':>8}  {'p(dS)':>8}  {'p(dR)':>8}  "
             f"{'base':>13}  {'sft':>13}  {'R':>13}  replicates"]
    for group, rows in table.groupby("group", sort=False):
        first = rows.iloc[0]
        lines.append(f"{first['label']}  [group {group}, benchmark {first['benchmark']}]")
        for row in rows.itertuples():
            knowledge = "  ".join(f"{getattr(row, f'knowledge_{s}_mean'):.3f}+-{getattr(row, f'knowledge_{s}_sd'):.3f}"
                                  for s in _STATES)
            lines.append(f"{row.epoch:>5d}  {STAGE_SHORT[row.stage]:<12} {row.agreeing:>5}  {row.restored:>8}  "
                         f"{row.p_sft:>8.2g}  {row.p_restored:>8.2g}  {knowledge}  {row.replicate_stages}")
        low, high = first["transition_low"], first["transition_high"]
        spread = "" if low is None or pd.isna(low) else f", range {_epoch(low)}-{_epoch(high)}"
        lines.append(f"  transition epoch: pooled {_epoch(first['transition_pooled'])}; replicates median "
                     f"{_epoch(first['transition_median'])}{spread} ({first['transition_reached']} reached actual)")
    return "\n".join(lines) + "\n"
