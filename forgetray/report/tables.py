"""The report's tables and its text: the stage table (one row per trial x checkpoint), the methods table (CF's
Table 2 shape) and the text `forgetray report` prints, built from `TrialData` alone.

Metric names come from `forgetray.metrics.registry`; the table's own column names (`knowledge_sft`,
`<bench>/knowledge_restored`) are the report's, not MLflow's.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from forgetray.metrics import registry
from forgetray.metrics.stage import ACTUAL_FORGETTING, INCONCLUSIVE, NO_FORGETTING, NOT_RESTORED, PSEUDO_FORGETTING
from forgetray.report.runs import TrialData, short

STAGE_SHORT = {NO_FORGETTING: "no", PSEUDO_FORGETTING: "pseudo", ACTUAL_FORGETTING: "actual",
               INCONCLUSIVE: "inconclusive", NOT_RESTORED: "not restored"}

# The stage table's columns after the trial's varying settings, in order. `knowledge_*` are the primary benchmark's
# primary score (named in `benchmark` and `score`); the stage rule judges that benchmark only. The headline is the
# margin rule (docs/methods.md §4): `stage` at the trial's stage_margin, `stage_at_<m>` at each reported margin, from the
# drop D_S = base - SFT_e and the residual D_R = R_0 - R_e with their intervals (`level`: Bonferroni over the
# trial's epochs); `stage_test` (paired test, p-values `p_*` of the variants' `d_*` = SFT_e / R_e minus base) and
# `stage_fixed` are the reported variants, never the headline.
MARGIN_COLUMNS = [f"stage_at_{key}" for key in registry.MARGIN_KEYS]
STAGE_COLUMNS = ["epoch", "benchmark", "score", "knowledge_base", "knowledge_control", "knowledge_sft",
                 "knowledge_restored", "drop", "drop_low", "drop_high", "residual", "residual_low", "residual_high",
                 "share", "share_low", "share_high", "level", "stage", *MARGIN_COLUMNS, "transition", "stage_test",
                 "stage_fixed", "d_sft", "d_restored", "p_sft", "p_restored", "ppl_base", "ppl_control", "ppl_sft",
                 "ppl_restored", "em_sft", "em_restored"]

INTERVAL, AT_MARGINS = "interval", "at margins"  # text formats: an estimate with its interval; the stage_at_* trio
# How the text table shows each column: (heading, format of a number, INTERVAL or AT_MARGINS). Stage names are
# shortened separately; the p-values belong to the test variant.
TEXT_COLUMNS = {
    "epoch": ("epoch", "{:d}"), "knowledge_base": ("base", "{:.3f}"), "knowledge_control": ("R_0", "{:.3f}"),
    "knowledge_sft": ("SFT_e", "{:.3f}"), "knowledge_restored": ("R_e", "{:.3f}"),
    "drop": ("drop D_S [interval]", INTERVAL), "residual": ("residual D_R [interval]", INTERVAL),
    "stage": ("stage", None), MARGIN_COLUMNS[0]: ("at .01/.02/.05", AT_MARGINS), "stage_test": ("test", None),
    "p_sft": ("p(dS)", "{:.2g}"), "p_restored": ("p(dR)", "{:.2g}"), "stage_fixed": ("fixed", None),
    "ppl_base": ("ppl base", "{:.2f}"), "ppl_control": ("ppl R_0", "{:.2f}"), "ppl_sft": ("ppl SFT_e", "{:.2f}"),
    "ppl_restored": ("ppl R_e", "{:.2f}"), "em_sft": ("EM SFT_e", "{:.3f}"), "em_restored": ("EM R_e", "{:.3f}"),
}

_METHOD_SETTINGS = ("sam_rho", "sam_adaptive", "sam_every", "wiseft_alpha", "rehearsal_ratio")
_STATES = ("base", "control", "sft", "restored")


# --- the stage table ------------------------------------------------------------------------------------------------

def setting_column(key: str) -> str:
    """A varying setting's column in the stage table; one named like a column of the table keeps its prefix."""
    return f"trial.{key}" if key in ("trial", *STAGE_COLUMNS) else key


def _margin_columns(trial: TrialData, epoch: int, row: dict[str, Any]) -> None:
    """The margin rule's quantities as logged (`stage/<key>`). A run without them (judged before the margin rule,
    or not judged) still gets the drop from its accuracies, and the residual where it logged R_0 and R_e: the same
    definitions (docs/methods.md §4), without intervals."""
    for key in registry.INTERVAL_KEYS:
        row[key] = trial.at(registry.STAGE_INTERVAL.name(key=key), epoch)
    if math.isnan(row["drop"]):
        row["drop"] = row["knowledge_base"] - row["knowledge_sft"]
    if math.isnan(row["residual"]):
        row["residual"] = row["knowledge_control"] - row["knowledge_restored"]


def _stage_rows(trial: TrialData, varying: list[str]) -> list[dict[str, Any]]:
    judged, transition = trial.transition()
    bench = trial.primary
    rows = []
    for epoch in trial.epochs:
        row: dict[str, Any] = {"trial": trial.name, **{setting_column(key): trial.settings.get(key) for key in varying},
                               "epoch": epoch, "benchmark": bench, "score": trial.scores.get(bench) if bench else None}
        for state in _STATES:
            row[f"knowledge_{state}"] = trial.knowledge(state, bench, epoch)
        _margin_columns(trial, epoch, row)
        row["stage"] = trial.stage(epoch)
        for column, key in zip(MARGIN_COLUMNS, registry.MARGIN_KEYS):
            row[column] = trial.stage_at(epoch, key)
        row["transition"] = transition if judged else None
        row["stage_test"] = trial.stage(epoch, test=True)
        row["stage_fixed"] = trial.stage(epoch, fixed=True)
        # The variants log dS and dR (against base) with their stage; a sweep without a stage analysis still gets
        # them from the accuracies, which is the same definition.
        for delta, metric, state in (("d_sft", registry.STAGE_D_SFT, "sft"),
                                     ("d_restored", registry.STAGE_D_RESTORED, "restored")):
            logged = trial.at(metric.name(), epoch)
            row[delta] = logged if not math.isnan(logged) else row[f"knowledge_{state}"] - row["knowledge_base"]
        row["p_sft"] = trial.at(registry.STAGE_P_SFT.name(), epoch)
        row["p_restored"] = trial.at(registry.STAGE_P_RESTORED.name(), epoch)
        for state in _STATES:
            row[f"ppl_{state}"] = trial.at(registry.PROBE_PPL.name(state=state), 0 if state in ("base", "control")
                                           else epoch)
        row["em_sft"] = trial.at(registry.EM.name(state="sft"), epoch)
        row["em_restored"] = trial.at(registry.EM.name(state="restored"), epoch)
        # Other benchmarks' knowledge, for reading alongside; their stages are not judged.
        for other in trial.benchmarks[1:]:
            for state in _STATES:
                row[f"{other}/knowledge_{state}"] = trial.knowledge(state, other, epoch)
        rows.append(row)
    return rows


def stage_table(trials: list[TrialData], varying: list[str]) -> pd.DataFrame:
    """One row per trial x checkpoint: the trial's varying settings, then STAGE_COLUMNS, then other benchmarks."""
    rows = [row for trial in trials for row in _stage_rows(trial, varying)]
    setting_columns = [setting_column(key) for key in varying]
    other_benchmarks = list(dict.fromkeys(key for row in rows for key in row
                                          if key not in {"trial", *setting_columns, *STAGE_COLUMNS}))
    frame = pd.DataFrame(rows, columns=["trial", *setting_columns, *STAGE_COLUMNS, *other_benchmarks])
    frame["transition"] = frame["transition"].astype("Int64")
    return frame


def empty_columns(table: pd.DataFrame) -> list[str]:
    """The text table's columns that no trial logged anything for (a sweep without restoration has no R_e)."""
    return [column for column in TEXT_COLUMNS if table[column].isna().all()]


# --- the mitigation table (CF's Table 2) -----------------------------------------------------------------------------

def _method(trial: TrialData) -> str:
    parts = []
    if trial.number("wiseft_alpha") < 1:
        parts.append(f"Wise-FT a={trial.number('wiseft_alpha'):g}")
    if trial.number("rehearsal_ratio") > 0:
        parts.append(f"rehearsal {trial.number('rehearsal_ratio'):g}")
    return " + ".join(parts) or "fine-tuning"


def _sam(trial: TrialData) -> str:
    rho = trial.number("sam_rho")
    if rho == 0:
        return "without SAM"
    adaptive = trial.settings.get("sam_adaptive", "False") == "True"
    every = int(trial.number("sam_every"))
    return f"{'ASAM' if adaptive else 'SAM'} rho={rho:g}" + (f" every {every}" if every > 1 else "")


def methods_table(trials: list[TrialData], varying: list[str]) -> pd.DataFrame:
    """One row per trial at its last checkpoint, shaped like CF's Table 2: method and SAM as the row labels, the
    other varying settings, knowledge per benchmark, their average and its change from the IFT phase's start (base),
    then probing perplexity, EM and flatness. Empty unless some trial uses a mitigation method."""
    if not any(_method(t) != "fine-tuning" or _sam(t) != "without SAM" for t in trials):
        return pd.DataFrame()
    others = [key for key in varying if key not in _METHOD_SETTINGS]
    benches = list(dict.fromkeys(bench for trial in trials for bench in trial.benchmarks))
    rows = []
    for trial in trials:
        if not trial.epochs:
            continue
        last = trial.epochs[-1]
        row = {"method": _method(trial), "sam": _sam(trial), **{key: trial.settings.get(key) for key in others},
               "epoch": last}
        sft = [trial.knowledge("sft", bench, last) for bench in benches]
        base = [trial.knowledge("base", bench, 0) for bench in benches]
        row.update({bench: value for bench, value in zip(benches, sft)})
        row["average"] = sum(sft) / len(sft) if sft else math.nan
        row["delta"] = row["average"] - (sum(base) / len(base) if base else math.nan)
        # CF's categories (DK / Understanding / Reasoning / Exams / AVG) when the trial probed their tasks.
        for key in registry.CF_KEYS:
            row[f"cf_{key}"] = trial.at(registry.CF_CATEGORY.name(state="sft", key=key), last)
        row["cf_delta_AVG"] = row["cf_AVG"] - trial.at(registry.CF_CATEGORY.name(state="base", key="AVG"), 0)
        row["ppl"] = trial.at(registry.PROBE_PPL.name(state="sft"), last)
        row["em"] = trial.at(registry.EM.name(state="sft"), last)
        row["flatness"] = trial.at(registry.FLATNESS.name(state="sft", key="flatness"), last)
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    # Plain fine-tuning first and "without SAM" before SAM within a method, as CF's Table 2 reads.
    table["_plain"] = table["method"] != "fine-tuning"
    table["_sam"] = table["sam"] != "without SAM"
    table = table.sort_values(["_plain", "method", "_sam", "sam", *others], kind="stable")
    table = table.drop(columns=["_plain", "_sam"]).reset_index(drop=True)
    return table.dropna(axis=1, how="all")


# --- the text -------------------------------------------------------------------------------------------------------

def _format_cell(value: Any, fmt: str | None) -> str:
    if value is None or pd.isna(value):
        return "-"
    if fmt is None:
        return STAGE_SHORT.get(value, str(value))
    return fmt.format(int(value) if fmt == "{:d}" else float(value))


def interval_text(estimate: Any, low: Any, high: Any) -> str:
    """`+0.100 [+0.060, +0.140]`; the estimate alone where no interval was logged, "-" where there is none."""
    if estimate is None or pd.isna(estimate):
        return "-"
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return f"{estimate:+.3f}"
    return f"{estimate:+.3f} [{low:+.3f}, {high:+.3f}]"


def margins_text(row: Any) -> str:
    """The verdicts at the reported margins, `pseudo/pseudo/inconclusive`; "-" where none was logged."""
    stages = [row[column] for column in MARGIN_COLUMNS]
    if all(stage is None or pd.isna(stage) for stage in stages):
        return "-"
    return "/".join(_format_cell(stage, None) for stage in stages)


def _text_cells(table: pd.DataFrame, column: str, fmt: str | None) -> list[str]:
    if fmt == INTERVAL:
        return [interval_text(row[column], row[f"{column}_low"], row[f"{column}_high"])
                for row in table.to_dict("records")]
    if fmt == AT_MARGINS:
        return [margins_text(row) for row in table.to_dict("records")]
    return [_format_cell(value, fmt) for value in table[column]]


def _left(column: pd.Series) -> pd.Series:
    """Pad a text column so that the right-aligning `to_string` shows it left-aligned, as names read best."""
    width = int(column.str.len().max()) if len(column) else 0
    return column.str.ljust(width)


def _text_table(table: pd.DataFrame, varying: list[str]) -> str:
    """The stage table for a terminal: short headings, rounded numbers, empty columns left out."""
    shown = {"trial": _left(table["trial"].astype(str))}
    for key in varying:
        shown[key] = _left(table[setting_column(key)].map(short))
    empty = empty_columns(table)
    for column, (heading, fmt) in TEXT_COLUMNS.items():
        if column not in empty:
            shown[heading] = _text_cells(table, column, fmt)
    return pd.DataFrame(shown).to_string(index=False)


def _other_benchmarks_text(table: pd.DataFrame) -> str | None:
    columns = [c for c in table.columns if "/knowledge_" in c and not table[c].isna().all()]
    if not columns:
        return None
    shown = {"trial": _left(table["trial"].astype(str)), "epoch": table["epoch"]}
    for column in columns:
        bench, state = column.split("/knowledge_")
        shown[f"{bench} {state}"] = [_format_cell(value, "{:.3f}") for value in table[column]]
    return pd.DataFrame(shown).to_string(index=False)


def _stage_runs(stages: list[tuple[int, str | None]]) -> str:
    """Consecutive epochs with the same stage as one run: "1-2 no, 3-8 pseudo, 9-10 actual"."""
    runs: list[list] = []  # [first epoch, last epoch, stage]
    for epoch, stage in stages:
        if stage is None:
            continue
        if runs and runs[-1][2] == stage and runs[-1][1] == epoch - 1:
            runs[-1][1] = epoch
        else:
            runs.append([epoch, epoch, stage])
    return ", ".join(f"{first}{'' if first == last else f'-{last}'} {STAGE_SHORT.get(stage, stage)}"
                     for first, last, stage in runs)


def _transition_line(trial: TrialData, varying: list[str]) -> str:
    epochs = trial.epochs
    label = trial.label(varying)
    failed = "" if trial.status in ("FINISHED", "RUNNING") else f"; run {trial.status}"
    if not epochs:
        return f"  {label}: no checkpoint logged{failed}"
    if trial.judged_before_margin_rule:
        stages = _stage_runs([(epoch, trial.stage(epoch, test=True)) for epoch in epochs])
        return (f"  {label}: judged before the margin rule (no R_0, no intervals): no margin-rule transition; "
                f"test variant [{stages}]{failed}")
    judged, transition = trial.transition()
    if not judged:
        return f"  {label}: not judged (no stage logged; {len(epochs)} epoch(s) of SFT metrics){failed}"
    stages = _stage_runs([(epoch, trial.stage(epoch)) for epoch in epochs])
    verdict = f"epoch {transition}" if transition is not None else f"none within {max(epochs)} epoch(s)"
    return f"  {label}: transition {verdict}   [{stages}]{failed}"


def methods_text(table: pd.DataFrame) -> str:
    """The methods table for a terminal: knowledge to 3 places, delta signed, ppl to 2, nothing logged as "-"."""
    shown = table.copy()
    for column in shown.columns:
        if column == "epoch" or not pd.api.types.is_numeric_dtype(shown[column]):
            continue
        fmt = "{:+.3f}" if column == "delta" else "{:.2f}" if column == "ppl" else "{:.3f}"
        shown[column] = shown[column].map(lambda v, f=fmt: "-" if pd.isna(v) else f.format(v))
    return shown.to_string(index=False)


def report_text(experiment: str, parent: Any, trials: list[TrialData], varying: list[str], table: pd.DataFrame,
                notes: list[str], methods: pd.DataFrame | None = None, continual: str | None = None) -> str:
    """What `forgetray report` prints (and stage_table.txt holds): the header, the stage table, other benchmarks,
    the methods table and the continual-learning table (its text) when there are, each trial's transition epoch
    and the notes."""
    name = parent.data.tags.get("mlflow.runName", parent.info.run_id)
    lines = [f"forgetray report: experiment {experiment!r}, sweep run {name} ({parent.info.run_id}), "
             f"{len(trials)} trial(s)"]
    primaries = sorted({(t.primary, t.scores.get(t.primary)) for t in trials if t.primary}, key=str)
    if len(primaries) == 1:
        lines.append(f"primary benchmark: {primaries[0][0]} (score {primaries[0][1]})")
    elif primaries:
        lines.append("primary benchmarks differ between trials: see the `benchmark` column of stage_table.csv")
    lines.append("base, R_0, SFT_e, R_e = knowledge of the base, the control R_0 (the start through the same "
                 "restoration), SFT_e and R_e; drop D_S = base - SFT_e, residual D_R = R_0 - R_e (positive = lost) "
                 "with their paired-bootstrap intervals at 1 - stage_alpha / epochs (Bonferroni over the trial's "
                 "epochs); stage = the margin rule at stage_margin (docs/methods.md §4; at .01/.02/.05 = its verdict at "
                 "those margins); reported variants, never the headline: test = paired significance test against "
                 "base (p(dS), p(dR) its p-values), fixed = fixed threshold; ppl = probing perplexity; EM = exact "
                 "memorization of the IFT data")
    if table.empty:
        lines += ["", "(no checkpoint logged by any trial)"]
    else:
        lines += ["", _text_table(table, varying)]
        others = _other_benchmarks_text(table)
        if others:
            lines += ["", "other benchmarks (knowledge; stages are judged on the primary benchmark only):", others]
    if methods is not None and not methods.empty:
        lines += ["", "mitigation methods at the last checkpoint (CF Table 2 shape; knowledge per benchmark, their "
                      "average and its change from the IFT phase's start; ppl = probing perplexity; flatness = "
                      "mean(SC, AG, MAG)):", methods_text(methods)]
    if continual:
        lines += ["", "continual learning (docs/methods.md §9): a[t] = knowledge per benchmark after fine-tuning step t "
                      "(0 = before any, then each prior phase, last = the IFT phase's last checkpoint); forgetting = "
                      "max over t < T of a[t] - a[T] (signed); BWT = mean over steps with an own benchmark of "
                      "a[T] - a[t] on it:", continual]
    lines += ["", "transition epoch (first epoch the margin rule classifies actual forgetting):"]
    lines += [_transition_line(trial, varying) for trial in trials]
    if notes:
        lines += ["", "notes:"] + [f"  {note}" for note in notes]
    return "\n".join(lines) + "\n"
