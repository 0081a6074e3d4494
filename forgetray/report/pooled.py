"""The pooled stage table of a replicated sweep (docs/methods.md §10): per replicate group and checkpoint, the margin rule's
verdict on all replicates' per-question outcomes (`forgetray.metrics.margin`: the replicates' mean drop and residual
with two-level bootstrap intervals), the verdicts at the reported margins, how many replicates' own verdicts agree,
the pooled exact-McNemar variant (`forgetray.metrics.pooled`), knowledge of base, R_0, SFT_e and R_e (mean and sd over
seeds), and the transition epoch's median and range.

A sweep run with `replicates=n` (the parent run's `sweep.replicates` param) is pooled; a sweep without replicates,
`seed=grid([...])` included, is not (its trials are independent). A group is the trials whose settings are equal
but for the seed (`grids.replicate_group`; its id is the trials' `forgetray.replicate_group` tag where logged). The
outcomes are each trial's `stages/per_question_<bench>.parquet` artifact, read through `forgetray.tracking`; the
probing perplexities the restoration rule needs are the trial's logged metrics.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forgetray.grids import TAG_REPLICATE_GROUP
from forgetray.metrics import registry
from forgetray.metrics import margin
from forgetray.metrics.pooled import ReplicateOutcome, classify_pooled, transition_summary
from forgetray.metrics.stage import transition_epoch
from forgetray.report.runs import TrialData, short
from forgetray.report.tables import STAGE_SHORT, setting_column
from forgetray.tracking import TAG_STAGE_BENCHMARK, Tracker
from forgetray.tracking_history import fetch_artifact

POOLED_CSV, POOLED_TXT = "pooled_stage_table.csv", "pooled_stage_table.txt"
_STATES = ("base", "sft", "restored", "control")


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
    """Read every trial's per-question outcomes into its group (one request per trial); the notes for trials that
    have none (no stage judged: no restoration, or it failed first: the store says the file does not exist). Any
    other error (a store that does not answer, an unreadable file) is not missing data: it propagates."""
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        for group in groups:
            for trial in group.trials:
                bench = trial.tags.get(TAG_STAGE_BENCHMARK) or trial.primary
                path = f"stages/per_question_{bench}.parquet"
                local = fetch_artifact(tracker, trial.artifact_uri, path, Path(tmp) / trial.run_id)
                if local is None:
                    notes.append(f"pooled table: {trial.name} has no {path} (no stage judged), left out of its group")
                    continue
                group.outcomes[trial.run_id] = pd.read_parquet(local)
    return notes


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def group_rows(group: ReplicateGroup) -> list[dict[str, Any]]:
    """The group's rows, one per checkpoint epoch any replicate judged, pooled over the replicates that judged it:
    the margin rule on the two-level bootstrap (`metrics.margin`), each replicate's own margin verdict, and the
    pooled exact-McNemar variant (`metrics.pooled`) beside it."""
    members = [t for t in group.trials if t.run_id in group.outcomes]
    if not members:
        return []
    first = members[0]
    alpha, tolerance, stage_margin = (first.number(key) for key in ("stage_alpha", "ppl_tolerance", "stage_margin"))
    ppl = {state: registry.PROBE_PPL.name(state=state) for state in ("base", "restored", "control")}
    epochs = sorted({int(e) for t in members for e in group.outcomes[t.run_id]["epoch"].unique()})
    level = margin.epoch_level(alpha, len(epochs))  # Bonferroni over the grid point's epochs
    rows, own_stages, pooled_stages = [], {t.run_id: {} for t in members}, {}
    for epoch in epochs:
        judged, frames = [], []
        for trial in members:
            frame = group.outcomes[trial.run_id]
            frame = frame[frame["epoch"] == epoch].sort_values("index")
            if not frame.empty:
                judged.append(trial)
                frames.append(frame)
        matrices = {state: np.stack([f[f"{state}_correct"].to_numpy(dtype=bool) for f in frames])
                    for state in _STATES}
        seed = margin.epoch_seed(_seed(judged[0]), epoch)
        found = margin.deltas(*(matrices[s] for s in ("base", "sft", "restored", "control")), level=level, seed=seed)
        ok = [margin.within_control(t.at(ppl["control"], 0), t.at(ppl["restored"], epoch), tolerance) for t in judged]
        verdicts = margin.verdicts(found, stage_margin, all(ok))
        pooled_stages[epoch] = verdicts["stage"]
        own = []
        for k, trial in enumerate(judged):
            mine = margin.deltas(*(matrices[s][k] for s in ("base", "sft", "restored", "control")), level=level,
                                 seed=margin.epoch_seed(_seed(trial), epoch))
            own.append(margin.classify(mine, stage_margin, ok[k]).stage)
            own_stages[trial.run_id][epoch] = own[-1]
        mcnemar = classify_pooled([ReplicateOutcome(matrices["base"][k], matrices["sft"][k], matrices["restored"][k],
                                                    t.at(ppl["base"], 0), t.at(ppl["restored"], epoch))
                                   for k, t in enumerate(judged)], alpha=alpha, ppl_tolerance=tolerance)
        row: dict[str, Any] = {"group": group.group, "label": group.label,
                               **{setting_column(k): v for k, v in group.settings.items()},
                               "epoch": epoch, "benchmark": first.tags.get(TAG_STAGE_BENCHMARK) or first.primary,
                               "replicates": len(judged), "seeds": ",".join(str(_seed(t)) for t in judged),
                               **verdicts, "margin": stage_margin,
                               "agreeing": f"{sum(stage == verdicts['stage'] for stage in own)}/{len(judged)}",
                               "replicate_stages": ",".join(STAGE_SHORT[stage] for stage in own),
                               "restored": f"{sum(ok)}/{len(judged)}", **margin.interval_columns(found),
                               "stage_mcnemar": mcnemar.stage, "p_sft": mcnemar.p_sft,
                               "p_restored": mcnemar.p_restored}
        for state in _STATES:
            per_seed = [float(m.mean()) for m in matrices[state]]
            row[f"knowledge_{state}_mean"], row[f"knowledge_{state}_sd"] = _mean_sd(per_seed)
        rows.append(row)
    summary = transition_summary([own_stages[t.run_id] for t in members])
    pooled_transition = transition_epoch(pooled_stages)
    for row in rows:
        row.update({"transition_pooled": pooled_transition, "transition_median": summary.median,
                    "transition_low": summary.low, "transition_high": summary.high,
                    "transition_reached": f"{summary.reached}/{len(members)}"})
    return rows


def _one_blas_thread():
    """BLAS on one thread while the table is computed: its products are small ([2000, 300] @ [300, 12] per
    checkpoint), and OpenBLAS's threads spin waiting for each other on a busy machine: at 216 trials on 2 shared cores
    the table took 21 s with its default 2 threads and 7.6 s with one. threadpoolctl comes with mlflow (through
    scikit-learn); without it, nothing changes. The numbers do not depend on it (integer sums, exact either way)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def pooled_table(groups: list[ReplicateGroup]) -> pd.DataFrame:
    """One row per replicate group x checkpoint (`group_rows`), in group order."""
    with _one_blas_thread():
        return pd.DataFrame([row for group in groups for row in group_rows(group)])


TAG_POOLED = "forgetray.pooled."  # + <group>.epoch_NNN, <group>.transition_epoch, <group>.grid_point


def pooled_tags(table: pd.DataFrame) -> dict[str, str]:
    """The pooled verdicts as tags of the sweep's parent run: per group `forgetray.pooled.<group>.epoch_NNN` = the
    margin rule's pooled stage, `...transition_epoch` = its first epoch of actual forgetting ("none"), and
    `...grid_point` = the group's label (its settings and seeds); {} for an empty table."""
    tags: dict[str, str] = {}
    if table.empty:
        return tags
    for group, rows in table.groupby("group", sort=False):
        head = rows.iloc[0]
        tags[f"{TAG_POOLED}{group}.grid_point"] = str(head["label"])
        for epoch, stage in zip(rows["epoch"], rows["stage"]):
            tags[f"{TAG_POOLED}{group}.epoch_{int(epoch):03d}"] = str(stage)
        tags[f"{TAG_POOLED}{group}.transition_epoch"] = _epoch(head["transition_pooled"])
    return tags


def _epoch(value: Any) -> str:
    return "none" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:g}"


def _interval(row: dict, key: str) -> str:
    estimate, low, high = row[key], row[f"{key}_low"], row[f"{key}_high"]
    return "undefined" if pd.isna(estimate) else f"{estimate:+.3f} [{low:+.3f}, {high:+.3f}]"


def pooled_text(table: pd.DataFrame) -> str:
    """The pooled table as text: a block per group, a line per checkpoint, then the group's transition epoch."""
    first = table.iloc[0]
    lines = ["pooled over replicates (docs/methods.md §4, §10): the margin rule at delta = "
             f"{first['margin']:g} on the replicates' mean; drop D_S = base - SFT_e, residual D_R = R_0 - R_e, "
             "share = (R_e - SFT_e) / (R_0 - SFT_e), each with its two-level bootstrap interval (seeds, then "
             f"questions) at {first['level']:.4g} (Bonferroni over the epochs); agree = replicates whose own verdict "
             "is the pooled one; at .01/.02/.05 = the verdict at those margins; McNemar = the pooled exact-test "
             "variant (reported, never the headline); knowledge mean +- sd over seeds",
             f"{'epoch':>5}  {'stage':<12} {'agree':>5}  {'restored':>8}  {'drop D_S':<24} {'residual D_R':<24} "
             f"{'share':<24} {'at .01/.02/.05':<38} {'McNemar':<12} {'base':>11}  {'R_0':>11}  {'SFT_e':>11}  "
             f"{'R_e':>11}  replicates"]
    for group, rows in table.groupby("group", sort=False):
        head = rows.iloc[0]
        lines.append(f"{head['label']}  [group {group}, benchmark {head['benchmark']}]")
        for row in rows.to_dict("records"):
            knowledge = "  ".join(f"{row[f'knowledge_{s}_mean']:.3f}+-{row[f'knowledge_{s}_sd']:.3f}"
                                  for s in ("base", "control", "sft", "restored"))
            at = "/".join(STAGE_SHORT[row[f"stage_at_{m:g}"]] for m in margin.REPORTED_MARGINS)
            lines.append(f"{row['epoch']:>5d}  {STAGE_SHORT[row['stage']]:<12} {row['agreeing']:>5}  "
                         f"{row['restored']:>8}  {_interval(row, 'drop'):<24} {_interval(row, 'residual'):<24} "
                         f"{_interval(row, 'share'):<24} {at:<38} {STAGE_SHORT[row['stage_mcnemar']]:<12} "
                         f"{knowledge}  {row['replicate_stages']}")
            if isinstance(row["why"], str) and row["why"]:
                lines.append(f"       {row['why']}")
        low, high = head["transition_low"], head["transition_high"]
        spread = "" if low is None or pd.isna(low) else f", range {_epoch(low)}-{_epoch(high)}"
        lines.append(f"  transition epoch (margin rule): pooled {_epoch(head['transition_pooled'])}; replicates "
                     f"median {_epoch(head['transition_median'])}{spread} ({head['transition_reached']} reached "
                     "actual)")
    return "\n".join(lines) + "\n"
