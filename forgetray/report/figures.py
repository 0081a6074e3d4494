"""The sweep report: the stage table and the figures of PS (METHODS.md §4), built from a sweep's MLflow runs alone.

Everything comes from what the trials logged (README "MLflow layout and metric names"), read through
`forgetray.tracking.Tracker`; no checkpoint is opened, so a report can be made anywhere the store can be read, long
after the checkpoints are gone.

    report = build_report("quickstart", "sqlite:///forgetray-results/mlflow.db", Path("report"))
    print(report.text)            # the stage table and each trial's transition epoch
    report.stage_table            # one row per trial x epoch (also stage_table.csv / .txt in out_dir)
    report.figures                # the PNGs, also logged to the sweep's parent run under report/

What a trial logged decides what is shown: a sweep without restoration has no R_e, no restoring trajectory and no
stages, a failed trial may stop after a few epochs. Whatever is missing is left out of the table and figures, with
one line in `Report.notes` (and the text) saying what and why; the report itself never fails on missing metrics.
"""

from __future__ import annotations

import ast
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from forgetray.metrics.stage import (ACTUAL_FORGETTING, NO_FORGETTING, NOT_RESTORED, PSEUDO_FORGETTING, STAGE_CODES,
                                     STAGES, transition_epoch)
from forgetray.spec import SpecError
from forgetray.tracking import TAG_KIND, TAG_TRIAL, Tracker, default_tracking_uri

REPORT_ARTIFACT_PATH = "report"  # where the report's files go on the sweep's parent run
DEFAULT_RESULTS_DIR = Path("forgetray-results")  # what `forgetray run` uses when given no --tracking-uri

STAGE_BY_CODE = {code: name for name, code in STAGE_CODES.items()}
STAGE_SHORT = {NO_FORGETTING: "no", PSEUDO_FORGETTING: "pseudo", ACTUAL_FORGETTING: "actual",
               NOT_RESTORED: "not restored"}
# Light backgrounds behind a checkpoint's points in Figure 3c, from "fine" to "knowledge lost".
STAGE_COLORS = {NO_FORGETTING: "#d9f0d3", PSEUDO_FORGETTING: "#fee391", ACTUAL_FORGETTING: "#fcbba1",
                NOT_RESTORED: "#e0e0e0"}

FORMAT_ALIGNED = 0.95  # METHODS.md §3: format alignment is reached when mean P_fmt exceeds this

# The per-benchmark scores a probe logs; `knowledge` is the benchmark's primary score under one name.
BENCH_SCORES = ("letter_acc", "acc", "acc_norm", "knowledge", "p_fmt", "entropy_vocab", "entropy_options")
_BENCH_METRIC = re.compile(r"^(?:base|sft|restored|steps)/(?P<bench>.+)/(?:" + "|".join(BENCH_SCORES) + r")$")
_RESTORE_METRIC = re.compile(r"^restore/epoch_(?P<epoch>\d+)/probe_ppl$")
# Metric families logged at step = epoch (the IFT checkpoint e); `restore/` and `steps/` count other steps.
_PER_EPOCH_FAMILIES = ("sft", "restored", "stage", "train")

# Fixed names of the files this module writes; the per-benchmark accuracy figures add fig3c_accuracy_<bench>.png.
FIG3A, FIG3B, FIG4, FIG5 = ("fig3a_restoring_ppl.png", "fig3b_ppl_vs_epoch.png", "fig4_format_entropy.png",
                            "fig5_em.png")
TABLE_CSV, TABLE_TXT = "stage_table.csv", "stage_table.txt"

# The stage table's columns after the trial's varying settings, in order. `knowledge_*` are the primary benchmark's
# primary score (named in `benchmark` and `score`); the stage rule judges that benchmark only.
STAGE_COLUMNS = ["epoch", "benchmark", "score", "knowledge_base", "knowledge_sft", "knowledge_restored", "d_sft",
                 "d_restored", "p_sft", "p_restored", "stage", "stage_fixed", "ppl_base", "ppl_sft", "ppl_restored",
                 "em_sft", "em_restored", "transition"]

# How the text table shows each column: (heading, format of a number). Stage names are shortened separately.
_TEXT_COLUMNS = {
    "epoch": ("epoch", "{:d}"), "knowledge_base": ("base", "{:.3f}"), "knowledge_sft": ("sft", "{:.3f}"),
    "knowledge_restored": ("restored", "{:.3f}"), "d_sft": ("dS", "{:+.3f}"), "d_restored": ("dR", "{:+.3f}"),
    "p_sft": ("p(dS)", "{:.2g}"), "p_restored": ("p(dR)", "{:.2g}"), "stage": ("stage", None),
    "stage_fixed": ("fixed", None), "ppl_base": ("ppl base", "{:.2f}"), "ppl_sft": ("ppl sft", "{:.2f}"),
    "ppl_restored": ("ppl R", "{:.2f}"), "em_sft": ("EM sft", "{:.3f}"), "em_restored": ("EM R", "{:.3f}"),
}


@dataclass
class Report:
    """A sweep execution's report. `text` is what the CLI prints; `notes` says what was left out and why."""

    stage_table: pd.DataFrame
    figures: list[Path]
    text: str
    parent_run_id: str
    out_dir: Path
    notes: list[str] = field(default_factory=list)


# --- what one trial logged ------------------------------------------------------------------------------------------

@dataclass
class TrialData:
    """One trial run, read once: its settings, its benchmarks (primary first) and every metric's history."""

    name: str
    run_id: str
    status: str
    settings: dict[str, str]  # the `trial.*` params without the prefix
    benchmarks: list[str]  # benchmark keys as in metric names; the first is the primary one
    scores: dict[str, str]  # benchmark -> name of its primary score ("letter", "acc", ...)
    history: dict[str, dict[int, float]]  # metric name -> {step: value}
    tags: dict[str, str]

    @property
    def primary(self) -> str | None:
        return self.benchmarks[0] if self.benchmarks else None

    def at(self, metric: str, step: int) -> float:
        return self.history.get(metric, {}).get(step, math.nan)

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        """The metric's (steps, values), sorted by step; empty lists when it was never logged."""
        points = sorted(self.history.get(metric, {}).items())
        return [step for step, _ in points], [value for _, value in points]

    def has(self, metric: str) -> bool:
        return bool(self.history.get(metric))

    @property
    def epochs(self) -> list[int]:
        """The IFT checkpoints this trial logged anything about (step 0, the base model, is not a checkpoint)."""
        steps = {step for name, values in self.history.items() if name.split("/")[0] in _PER_EPOCH_FAMILIES
                 for step in values if step >= 1}
        return sorted(steps)

    def stage(self, epoch: int, fixed: bool = False) -> str | None:
        """The checkpoint's stage name: from the `stage/code` metric, else the `forgetray.stage.epoch_NNN` tag."""
        code = self.at("stage/fixed_code" if fixed else "stage/code", epoch)
        if math.isfinite(code):
            return STAGE_BY_CODE.get(int(code), f"code {code:g}")
        if not fixed:
            return self.tags.get(f"forgetray.stage.epoch_{epoch:03d}")
        return None

    def transition(self) -> tuple[bool, int | None]:
        """(judged, transition epoch): whether any stage was logged, and the first epoch with actual forgetting."""
        tag = self.tags.get("forgetray.transition_epoch")
        if tag is not None:
            if tag.strip().lower() == "none":
                return True, None
            try:
                return True, int(tag)
            except ValueError:
                pass  # an unreadable tag: fall back to the per-epoch stages below
        stages = {epoch: stage for epoch in self.epochs if (stage := self.stage(epoch)) in STAGES}
        if not stages:
            return False, None
        return True, transition_epoch(stages)


def _load_trial(tracker: Tracker, run) -> TrialData:
    history = tracker.metric_history(run.info.run_id, sorted(run.data.metrics))
    params = run.data.params
    benchmarks = _ordered_benchmarks(params.get("trial.benchmarks", ""), history)
    return TrialData(
        name=run.data.tags.get(TAG_TRIAL) or run.info.run_name or run.info.run_id,
        run_id=run.info.run_id,
        status=run.info.status,
        settings={key[len("trial."):]: value for key, value in params.items() if key.startswith("trial.")},
        benchmarks=benchmarks,
        scores={bench: params.get(f"resolved.benchmarks.{bench}.score", "primary score") for bench in benchmarks},
        history=history,
        tags=dict(run.data.tags),
    )


def _ordered_benchmarks(declared_param: str, history: dict) -> list[str]:
    """The benchmarks with logged metrics, in the order the trial declared them (its first is the primary one).

    The `trial.benchmarks` param is the list as written in the sweep (names or file paths); metrics are logged under
    the name, or under a file's stem (`resources.benchmark_key`), so each declared entry is matched both ways."""
    logged = {m["bench"] for name in history if (m := _BENCH_METRIC.match(name)) and m["bench"] not in ("probe", "ift")}
    try:
        declared = ast.literal_eval(declared_param)
    except (ValueError, SyntaxError):
        declared = []
    if isinstance(declared, str):
        declared = [declared]
    ordered: list[str] = []
    for entry in declared if isinstance(declared, (list, tuple)) else []:
        for key in (str(entry), Path(str(entry)).name.split(".")[0]):
            if key in logged and key not in ordered:
                ordered.append(key)
                break
    return ordered + sorted(logged - set(ordered))


def _varying_settings(trials: list[TrialData]) -> list[str]:
    """The settings whose value differs between trials: what tells the trials apart in the table and legends."""
    keys = sorted(set().union(*(trial.settings for trial in trials)))
    return [key for key in keys if len({trial.settings.get(key) for trial in trials}) > 1]


def _short(value: str | None, limit: int = 24) -> str:
    """A setting's value for labels: a path shows its last part, a list its items so shortened, anything long is
    cut."""
    text = "" if value is None else str(value)
    if not text:
        return "''"
    if text.startswith(("[", "(")):
        try:
            items = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            items = None
        if isinstance(items, (list, tuple)):
            return ",".join(_short(str(item), limit) for item in items)
    if "/" in text and " " not in text:
        text = text.rstrip("/").rsplit("/", 1)[-1]
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _setting_column(key: str) -> str:
    """A varying setting's column in the stage table; one named like a column of the table keeps its prefix."""
    return f"trial.{key}" if key in ("trial", *STAGE_COLUMNS) else key


def _label(trial: TrialData, varying: list[str]) -> str:
    settings = ", ".join(f"{key}={_short(trial.settings.get(key))}" for key in varying)
    return f"{trial.name} ({settings})" if settings else trial.name


# --- the parent run -------------------------------------------------------------------------------------------------

def _resolve_parent(tracker: Tracker, experiment: str, parent_run_id: str | None):
    """The sweep run to report on: the one asked for, else the experiment's newest. SpecError when there is none."""
    sweeps = tracker.sweep_runs(experiment)
    if not sweeps:
        raise SpecError(f"experiment {experiment!r} has no sweep run in {tracker.uri} "
                        "(check the experiment name and --tracking-uri)")
    if parent_run_id is None:
        return sweeps[0]
    for run in sweeps:
        if run.info.run_id == parent_run_id:
            return run
    raise SpecError(f"run {parent_run_id!r} is not a sweep run of experiment {experiment!r} "
                    f"(its sweep runs: {', '.join(run.info.run_id for run in sweeps[:5])})")


def _check_store_exists(tracking_uri: str) -> None:
    """Opening a missing sqlite store would quietly create an empty one: say it is missing instead."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
        if not path.is_file():
            raise SpecError(f"no MLflow store at {path} (pass --tracking-uri)")


# --- the stage table ------------------------------------------------------------------------------------------------

def _stage_rows(trial: TrialData, varying: list[str]) -> list[dict]:
    judged, transition = trial.transition()
    bench = trial.primary
    rows = []
    for epoch in trial.epochs:
        row: dict = {"trial": trial.name, **{_setting_column(key): trial.settings.get(key) for key in varying},
                     "epoch": epoch, "benchmark": bench, "score": trial.scores.get(bench) if bench else None}
        for state in ("base", "sft", "restored"):
            row[f"knowledge_{state}"] = trial.at(f"{state}/{bench}/knowledge", 0 if state == "base" else epoch)
        # The trial logs dS and dR with the stage; a sweep without a stage analysis still gets dS (and dR if R_e
        # was probed) from the accuracies, which is the same definition (METHODS.md §4).
        for delta, state in (("d_sft", "sft"), ("d_restored", "restored")):
            logged = trial.at(f"stage/{delta}", epoch)
            row[delta] = logged if not math.isnan(logged) else row[f"knowledge_{state}"] - row["knowledge_base"]
        row["p_sft"] = trial.at("stage/p_sft", epoch)
        row["p_restored"] = trial.at("stage/p_restored", epoch)
        row["stage"] = trial.stage(epoch)
        row["stage_fixed"] = trial.stage(epoch, fixed=True)
        for state in ("base", "sft", "restored"):
            row[f"ppl_{state}"] = trial.at(f"{state}/probe/ppl", 0 if state == "base" else epoch)
        row["em_sft"] = trial.at("sft/ift/em", epoch)
        row["em_restored"] = trial.at("restored/ift/em", epoch)
        row["transition"] = transition if judged else None
        # Other benchmarks' knowledge, for reading alongside; their stages are not judged.
        for other in trial.benchmarks[1:]:
            row[f"{other}/knowledge_base"] = trial.at(f"base/{other}/knowledge", 0)
            row[f"{other}/knowledge_sft"] = trial.at(f"sft/{other}/knowledge", epoch)
            row[f"{other}/knowledge_restored"] = trial.at(f"restored/{other}/knowledge", epoch)
        rows.append(row)
    return rows


def _stage_table(trials: list[TrialData], varying: list[str]) -> pd.DataFrame:
    rows = [row for trial in trials for row in _stage_rows(trial, varying)]
    setting_columns = [_setting_column(key) for key in varying]
    other_benchmarks = list(dict.fromkeys(key for row in rows for key in row
                                          if key not in {"trial", *setting_columns, *STAGE_COLUMNS}))
    frame = pd.DataFrame(rows, columns=["trial", *setting_columns, *STAGE_COLUMNS, *other_benchmarks])
    frame["transition"] = frame["transition"].astype("Int64")
    return frame


# --- the text -------------------------------------------------------------------------------------------------------

def _format_cell(value, fmt: str | None) -> str:
    if value is None or pd.isna(value):
        return "-"
    if fmt is None:
        return STAGE_SHORT.get(value, str(value))
    return fmt.format(int(value) if fmt == "{:d}" else float(value))


def _empty_columns(table: pd.DataFrame) -> list[str]:
    """The text table's columns that no trial logged anything for (a sweep without restoration has no R_e)."""
    return [column for column in _TEXT_COLUMNS if table[column].isna().all()]


def _text_table(table: pd.DataFrame, varying: list[str]) -> str:
    """The stage table for a terminal: short headings, rounded numbers, empty columns left out."""
    shown = {"trial": _left(table["trial"].astype(str))}
    for key in varying:
        shown[key] = _left(table[_setting_column(key)].map(_short))
    empty = _empty_columns(table)
    for column, (heading, fmt) in _TEXT_COLUMNS.items():
        if column not in empty:
            shown[heading] = [_format_cell(value, fmt) for value in table[column]]
    return pd.DataFrame(shown).to_string(index=False)


def _left(column: pd.Series) -> pd.Series:
    """Pad a text column so that the right-aligning `to_string` shows it left-aligned, as names read best."""
    width = int(column.str.len().max()) if len(column) else 0
    return column.str.ljust(width)


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
    label = _label(trial, varying)
    failed = "" if trial.status in ("FINISHED", "RUNNING") else f"; run {trial.status}"
    if not epochs:
        return f"  {label}: no checkpoint logged{failed}"
    judged, transition = trial.transition()
    if not judged:
        return f"  {label}: not judged (no stage logged; {len(epochs)} epoch(s) of SFT metrics){failed}"
    stages = _stage_runs([(epoch, trial.stage(epoch)) for epoch in epochs])
    verdict = f"epoch {transition}" if transition is not None else f"none within {max(epochs)} epoch(s)"
    return f"  {label}: transition {verdict}   [{stages}]{failed}"


# --- the mitigation table (CF's Table 2) -----------------------------------------------------------------------------

METHODS_CSV = "methods_table.csv"
_METHOD_SETTINGS = ("sam_rho", "sam_adaptive", "sam_every", "wiseft_alpha", "rehearsal_ratio")


def _number(trial: TrialData, key: str, default: float) -> float:
    try:
        return float(trial.settings.get(key, default))
    except ValueError:
        return default


def _method(trial: TrialData) -> str:
    parts = []
    if _number(trial, "wiseft_alpha", 1.0) < 1:
        parts.append(f"Wise-FT a={_number(trial, 'wiseft_alpha', 1.0):g}")
    if _number(trial, "rehearsal_ratio", 0.0) > 0:
        parts.append(f"rehearsal {_number(trial, 'rehearsal_ratio', 0.0):g}")
    return " + ".join(parts) or "fine-tuning"


def _sam(trial: TrialData) -> str:
    rho = _number(trial, "sam_rho", 0.0)
    if rho == 0:
        return "without SAM"
    adaptive = trial.settings.get("sam_adaptive", "False") == "True"
    every = int(_number(trial, "sam_every", 1))
    return f"{'ASAM' if adaptive else 'SAM'} rho={rho:g}" + (f" every {every}" if every > 1 else "")


def _methods_table(trials: list[TrialData], varying: list[str]) -> pd.DataFrame:
    """One row per trial at its last checkpoint, shaped like CF's Table 2: method and SAM as the row labels, the
    other varying settings, knowledge per benchmark, their average and its change from the stage's start (base),
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
        sft = [trial.at(f"sft/{bench}/knowledge", last) for bench in benches]
        base = [trial.at(f"base/{bench}/knowledge", 0) for bench in benches]
        row.update({bench: value for bench, value in zip(benches, sft)})
        row["average"] = sum(sft) / len(sft) if sft else math.nan
        row["delta"] = row["average"] - (sum(base) / len(base) if base else math.nan)
        row["ppl"] = trial.at("sft/probe/ppl", last)
        row["em"] = trial.at("sft/ift/em", last)
        row["flatness"] = trial.at("sft/flatness/flatness", last)
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


def _methods_text(table: pd.DataFrame) -> str:
    shown = table.copy()
    for column in shown.columns:
        if column == "epoch" or not pd.api.types.is_numeric_dtype(shown[column]):
            continue
        fmt = "{:+.3f}" if column == "delta" else "{:.2f}" if column == "ppl" else "{:.3f}"
        shown[column] = shown[column].map(lambda v, f=fmt: "-" if pd.isna(v) else f.format(v))
    return shown.to_string(index=False)


def _text(experiment: str, parent, trials: list[TrialData], varying: list[str], table: pd.DataFrame,
          notes: list[str], methods: pd.DataFrame | None = None) -> str:
    name = parent.data.tags.get("mlflow.runName", parent.info.run_id)
    lines = [f"forgetray report: experiment {experiment!r}, sweep run {name} ({parent.info.run_id}), "
             f"{len(trials)} trial(s)"]
    primaries = sorted({(t.primary, t.scores.get(t.primary)) for t in trials if t.primary}, key=str)
    if len(primaries) == 1:
        lines.append(f"primary benchmark: {primaries[0][0]} (score {primaries[0][1]})")
    elif primaries:
        lines.append("primary benchmarks differ between trials: see the `benchmark` column of stage_table.csv")
    lines.append("base/sft/restored = knowledge of base, SFT_e, R_e; dS, dR = their change vs base; p = paired-test "
                 "p-value; stage = significance-test stage, fixed = fixed-threshold stage; ppl = probing perplexity; "
                 "EM = exact memorization of the IFT data")
    if table.empty:
        lines += ["", "(no checkpoint logged by any trial)"]
    else:
        lines += ["", _text_table(table, varying)]
        others = _other_benchmarks_text(table)
        if others:
            lines += ["", "other benchmarks (knowledge; stages are judged on the primary benchmark only):", others]
    if methods is not None and not methods.empty:
        lines += ["", "mitigation methods at the last checkpoint (CF Table 2 shape; knowledge per benchmark, their "
                      "average and its change from the stage's start; ppl = probing perplexity; flatness = "
                      "mean(SC, AG, MAG)):", _methods_text(methods)]
    lines += ["", "transition epoch (first epoch with actual forgetting):"]
    lines += [_transition_line(trial, varying) for trial in trials]
    if notes:
        lines += ["", "notes:"] + [f"  {note}" for note in notes]
    return "\n".join(lines) + "\n"


# --- the figures ----------------------------------------------------------------------------------------------------

def _panels(n: int, width: float = 3.6, height: float = 2.8, max_cols: int = 4):
    """A figure with one panel per trial (up to 4 per row), drawn with the Agg canvas: no pyplot, no global state.

    The panels share their y axis: trials of one sweep measure the same quantity on the same data, and a common
    scale is what makes them comparable at a glance."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols + 1.2, height * rows + 1.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _panel_title(ax, label: str) -> None:
    ax.set_title("\n".join(textwrap.wrap(label, 42)), fontsize=9)


def _panel_ylabel(ax, label: str) -> None:
    """The y label on the first panel of each row only: the panels share their y axis."""
    if ax.get_subplotspec().is_first_col():
        ax.set_ylabel(label)


def _suptitle(fig, text: str) -> None:
    """The figure's title, wrapped to its width (about 13 characters per inch at this size)."""
    fig.suptitle("\n".join(textwrap.wrap(text, int(fig.get_figwidth() * 13))), fontsize=11)


def _min_span(ax, span: float) -> None:
    """Widen the y range to at least `span`, so that a 0.01 wobble in accuracy does not fill a panel."""
    low, high = ax.get_ylim()
    if high - low < span:
        middle = (low + high) / 2
        ax.set_ylim(middle - span / 2, middle + span / 2)


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _log_y(ax) -> None:
    """A log y axis labelled with plain numbers (20, 30, 60), not 2x10^1: perplexities rarely span decades."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _legend_columns(fig_width: float, labels: list[str], fontsize: float = 8) -> int:
    """As many legend columns as fit across the figure (about 0.6 em per character plus the line sample)."""
    widest = max((len(label) for label in labels), default=1)
    per_column = 0.6 * fontsize / 72 * widest + 0.7
    return max(1, min(len(labels), int(fig_width / per_column)))


def _base_level(ax, value: float) -> None:
    if not math.isnan(value):
        ax.axhline(value, color="black", linestyle="--", linewidth=1.1, label="base")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def _trial_colors(trials: list[TrialData]) -> dict[str, tuple]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {trial.name: palette[i % len(palette)] for i, trial in enumerate(trials)}


def _fig_restoring_ppl(trials: list[TrialData], varying: list[str], out_dir: Path) -> Path | str:
    """Figure 3a: probing PPL along each restoration SFT_e -> R_e (step 0 = SFT_e), one line per checkpoint."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm
    from matplotlib.lines import Line2D

    curves = []
    for trial in trials:
        by_epoch = {int(m["epoch"]): name for name in trial.history
                    if (m := _RESTORE_METRIC.match(name)) and trial.has(name)}
        if by_epoch:
            curves.append((trial, by_epoch))
    if not curves:
        return "fig3a skipped: no trial logged restore/epoch_NNN/probe_ppl (no restoration in this sweep)"
    last_epoch = max(max(by_epoch) for _, by_epoch in curves)
    # Discrete colours, one per checkpoint epoch, shared by all panels and explained by one colour bar.
    cmap = colormaps["viridis"]
    norm = BoundaryNorm([e + 0.5 for e in range(last_epoch + 1)], cmap.N)
    fig, axes = _panels(len(curves))
    for ax, (trial, by_epoch) in zip(axes, curves):
        for epoch, name in sorted(by_epoch.items()):
            steps, values = trial.series(name)
            ax.plot(steps, values, color=cmap(norm(epoch)), linewidth=1.3, marker="o", markersize=2.5)
        _base_level(ax, trial.at("base/probe/ppl", 0))
        _log_y(ax)
        ax.set_xlabel("restoring step (0 = SFT_e)")
        _panel_ylabel(ax, "probing PPL")
        _panel_title(ax, _label(trial, varying))
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="checkpoint epoch e")
    bar.set_ticks(range(1, last_epoch + 1))
    fig.legend([Line2D([], [], color="black", linestyle="--")], ["base model"], loc="outside lower center")
    _suptitle(fig, "Fig. 3a: probing perplexity while restoring SFT_e into R_e")
    return _save(fig, out_dir / FIG3A)


def _fig_ppl_vs_epoch(trials: list[TrialData], varying: list[str], out_dir: Path) -> Path | str:
    """Figure 3b: probing PPL of SFT_e and R_e against the epoch e, with the base model's level."""
    shown = [t for t in trials if t.has("sft/probe/ppl") or t.has("restored/probe/ppl")]
    if not shown:
        return "fig3b skipped: no trial logged sft/probe/ppl or restored/probe/ppl"
    fig, axes = _panels(len(shown))
    for ax, trial in zip(axes, shown):
        for metric, label, style in (("sft/probe/ppl", "SFT_e", "o-"), ("restored/probe/ppl", "R_e", "s-")):
            if trial.has(metric):
                ax.plot(*trial.series(metric), style, label=label, markersize=4,
                        color="tab:blue" if label == "SFT_e" else "tab:purple")
        _base_level(ax, trial.at("base/probe/ppl", 0))
        _log_y(ax)
        ax.set_xlabel("epoch e")
        _panel_ylabel(ax, "probing PPL")
        _integer_epochs(ax)
        _panel_title(ax, _label(trial, varying))
    fig.legend(*_figure_handles(axes), loc="outside lower center", ncols=3)
    _suptitle(fig, "Fig. 3b: probing perplexity of SFT_e and R_e vs epoch (base dashed)")
    return _save(fig, out_dir / FIG3B)


def _figure_handles(axes) -> tuple[list, list]:
    """Each distinct legend label once, over all panels (a panel may lack a line another has)."""
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    return list(handles.values()), list(handles)


def _fig_accuracy(trials: list[TrialData], varying: list[str], bench: str, out_dir: Path) -> Path | str:
    """Figure 3c/3d for one benchmark: its primary score for base (dashed), SFT_e and R_e vs epoch; on the primary
    benchmark each epoch's background shows the checkpoint's stage."""
    from matplotlib.patches import Patch

    shown = [t for t in trials if t.has(f"sft/{bench}/knowledge") or t.has(f"restored/{bench}/knowledge")]
    if not shown:
        return f"fig3c for {bench} skipped: no sft/{bench}/knowledge or restored/{bench}/knowledge logged"
    fig, axes = _panels(len(shown))
    stages_drawn = set()
    for ax, trial in zip(axes, shown):
        if trial.primary == bench:
            for epoch in trial.epochs:
                stage = trial.stage(epoch)
                if stage in STAGE_COLORS:
                    ax.axvspan(epoch - 0.5, epoch + 0.5, color=STAGE_COLORS[stage], zorder=0, linewidth=0)
                    stages_drawn.add(stage)
        for state, label, style, color in (("sft", "SFT_e", "o-", "tab:blue"),
                                           ("restored", "R_e", "s-", "tab:purple")):
            if trial.has(f"{state}/{bench}/knowledge"):
                ax.plot(*trial.series(f"{state}/{bench}/knowledge"), style, label=label, color=color, markersize=4)
        _base_level(ax, trial.at(f"base/{bench}/knowledge", 0))
        ax.set_xlabel("epoch e")
        _panel_ylabel(ax, f"accuracy ({trial.scores.get(bench, 'primary score')})")
        _integer_epochs(ax)
        _panel_title(ax, _label(trial, varying))
    handles, labels = _figure_handles(axes)
    for stage in STAGES:
        if stage in stages_drawn:
            handles.append(Patch(color=STAGE_COLORS[stage]))
            labels.append(f"stage: {STAGE_SHORT[stage]}")
    fig.legend(handles, labels, loc="outside lower center", ncols=_legend_columns(fig.get_figwidth(), labels, 10))
    _min_span(axes[0], 0.05)  # the panels share y
    judged = any(t.primary == bench for t in shown)
    stages = "; background = stage of checkpoint e" if judged else " (stages are judged on the primary benchmark)"
    _suptitle(fig, f"Fig. 3c: accuracy on {bench} of base, SFT_e and R_e vs epoch{stages}")
    return _save(fig, out_dir / f"fig3c_accuracy_{_file_safe(bench)}.png")


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _fig_format_entropy(trials: list[TrialData], varying: list[str], out_dir: Path) -> Path | str:
    """Figure 4: P_fmt, the entropies H_V and H_opt (and knowledge) against the IFT step, one line per trial; a
    column per benchmark."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    quantities = [("p_fmt", "P_fmt"), ("entropy_vocab", "H_V (nats)"), ("entropy_options", "H_opt (nats)"),
                  ("knowledge", "accuracy")]
    benches = [b for b in dict.fromkeys(b for t in trials for b in t.benchmarks)
               if any(t.has(f"steps/{b}/{q}") for t in trials for q, _ in quantities)]
    if not benches:
        return "fig4 skipped: no trial logged steps/<bench>/p_fmt or the entropies (IFT-step probes)"
    rows = [(q, label) for q, label in quantities if any(t.has(f"steps/{b}/{q}") for t in trials for b in benches)]
    colors = _trial_colors(trials)
    fig = Figure(figsize=(max(6.5, 4.6 * len(benches) + 1.0), 2.3 * len(rows) + 1.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(benches), squeeze=False, sharex="col")
    for col, bench in enumerate(benches):
        for row, (quantity, label) in enumerate(rows):
            ax = axes[row][col]
            for trial in trials:
                if trial.has(f"steps/{bench}/{quantity}"):
                    ax.plot(*trial.series(f"steps/{bench}/{quantity}"), "o-", markersize=3, linewidth=1.2,
                            color=colors[trial.name], label=_label(trial, varying))
            if quantity == "p_fmt":
                ax.axhline(FORMAT_ALIGNED, color="gray", linestyle=":", linewidth=1,
                           label=f"format aligned (P_fmt = {FORMAT_ALIGNED})")
            # Format alignment happens within the first few steps, the rest over epochs: a log step axis shows
            # both, and symlog keeps step 0 (the base model) on it.
            ax.set_xscale("symlog", linthresh=1)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title(bench, fontsize=10)
            if row == len(rows) - 1:
                ax.set_xlabel("IFT optimizer step (0 = base)")
    handles, labels = _figure_handles(axes.ravel())
    fig.legend(handles, labels, loc="outside lower center", ncols=_legend_columns(fig.get_figwidth(), labels),
               fontsize=8)
    _suptitle(fig, "Fig. 4: format probability and entropies at the first answer position vs IFT step")
    return _save(fig, out_dir / FIG4)


def _fig_em(trials: list[TrialData], varying: list[str], out_dir: Path) -> Path | str:
    """Figure 5: exact memorization EM of the IFT data by SFT_e (solid; epoch 0 = base) and R_e (dotted)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    shown = [t for t in trials if t.has("sft/ift/em") or t.has("restored/ift/em")]
    if not shown:
        return "fig5 skipped: no trial logged sft/ift/em"
    colors = _trial_colors(trials)
    fig = Figure(figsize=(8.5, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for trial in shown:
        color = colors[trial.name]
        steps, values = trial.series("sft/ift/em")
        base = trial.at("base/ift/em", 0)
        if not math.isnan(base) and 0 not in steps:
            steps, values = [0] + steps, [base] + values
        ax.plot(steps, values, "o-", color=color, markersize=4, label=_label(trial, varying))
        if trial.has("restored/ift/em"):
            ax.plot(*trial.series("restored/ift/em"), "s:", color=color, markersize=4)
    ax.set_xlabel("epoch e (0 = base)")
    ax.set_ylabel("EM on the IFT data")
    _integer_epochs(ax)
    # One legend below the plot: colour = trial, line style = model state.
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="gray", linestyle="-", marker="o"),
                Line2D([], [], color="gray", linestyle=":", marker="s")]
    labels += ["SFT_e (solid)", "R_e (dotted)"]
    fig.legend(handles, labels, fontsize=8, loc="outside lower center",
               ncols=_legend_columns(fig.get_figwidth(), labels))
    _suptitle(fig, "Fig. 5: exact memorization of the IFT data vs epoch")
    return _save(fig, out_dir / FIG5)


# --- putting it together --------------------------------------------------------------------------------------------

def _draw(name: str, figure, *args) -> Path | str:
    """One figure, or a note. The figures are a by-product of the sweep: data that trips matplotlib costs that
    figure (named, with the error, in the notes), not the stage table and the other figures."""
    try:
        return figure(*args)
    except Exception as exc:  # noqa: BLE001 - reported in the notes, see the docstring
        return f"{name} failed: {type(exc).__name__}: {exc}"


def _clear_previous(out_dir: Path) -> None:
    """Remove this module's files from an earlier report in out_dir, so a figure skipped now is not left stale
    (and logged again). Other files in out_dir are left alone."""
    for path in [*(out_dir / name for name in (FIG3A, FIG3B, FIG4, FIG5, TABLE_CSV, TABLE_TXT, METHODS_CSV)),
                 *out_dir.glob("fig3c_accuracy_*.png")]:
        path.unlink(missing_ok=True)


def build_report(experiment: str, tracking_uri: str, out_dir: Path, parent_run_id: str | None = None,
                 log_to_mlflow: bool = True) -> Report:
    """The report of one sweep execution (default: the experiment's newest), written to out_dir and, with
    log_to_mlflow, logged to the sweep's parent run under `report/`.

    Raises SpecError (one line) when the store, the experiment, the sweep run or its trials cannot be found."""
    _check_store_exists(tracking_uri)
    tracker = Tracker(tracking_uri)
    parent = _resolve_parent(tracker, experiment, parent_run_id)
    runs = [run for run in tracker.trial_runs(parent.info.run_id) if run.data.tags.get(TAG_KIND) == "trial"]
    if not runs:
        raise SpecError(f"sweep run {parent.info.run_id} of experiment {experiment!r} has no trial runs")
    trials = sorted((_load_trial(tracker, run) for run in runs), key=lambda t: t.name)
    varying = _varying_settings(trials)
    table = _stage_table(trials, varying)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir)
    # Each figure comes back as its file, or as the one line saying why it was skipped.
    benches = list(dict.fromkeys(bench for trial in trials for bench in trial.benchmarks))
    results = [_draw("fig3a", _fig_restoring_ppl, trials, varying, out_dir),
               _draw("fig3b", _fig_ppl_vs_epoch, trials, varying, out_dir)]
    results += [_draw(f"fig3c for {bench}", _fig_accuracy, trials, varying, bench, out_dir) for bench in benches]
    if not benches:
        results.append("fig3c skipped: no trial logged <state>/<bench>/knowledge")
    results += [_draw("fig4", _fig_format_entropy, trials, varying, out_dir),
                _draw("fig5", _fig_em, trials, varying, out_dir)]
    figures = [result for result in results if isinstance(result, Path)]
    notes = [result for result in results if isinstance(result, str)]
    empty = _empty_columns(table)
    if not table.empty and empty:
        headings = ", ".join(_TEXT_COLUMNS[column][0] for column in empty)
        notes.append(f"columns with nothing logged, left out of the text table: {headings}")
    unjudged = [t.name for t in trials if t.epochs and not t.transition()[0]]
    if unjudged:
        notes.append(f"no stage logged (no restoration?) for: {', '.join(unjudged)}")

    methods = _methods_table(trials, varying)
    text = _text(experiment, parent, trials, varying, table, notes, methods)
    table.to_csv(out_dir / TABLE_CSV, index=False)
    if not methods.empty:
        methods.to_csv(out_dir / METHODS_CSV, index=False)
    (out_dir / TABLE_TXT).write_text(text)
    if log_to_mlflow:
        tracker.log_artifacts(parent.info.run_id, out_dir, REPORT_ARTIFACT_PATH)
    return Report(stage_table=table, figures=figures, text=text, parent_run_id=parent.info.run_id, out_dir=out_dir,
                  notes=notes)


def default_out_dir(experiment: str) -> Path:
    return DEFAULT_RESULTS_DIR / "report" / experiment


def run_report(experiment: str, tracking_uri: str | None = None, parent_run_id: str | None = None,
               out_dir: Path | None = None, log_to_mlflow: bool = True) -> Report:
    """Build the report and print it with the figure paths: what `forgetray report` does, and how `forgetray run`
    ends. Defaults are those of `forgetray run`: the sqlite store in ./forgetray-results, the newest sweep run."""
    tracking_uri = tracking_uri or default_tracking_uri(DEFAULT_RESULTS_DIR)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(experiment)
    report = build_report(experiment, tracking_uri, out_dir, parent_run_id=parent_run_id, log_to_mlflow=log_to_mlflow)
    print(report.text, end="")
    print(f"\nreport files in {report.out_dir}:")
    for path in [*report.figures, report.out_dir / TABLE_CSV, report.out_dir / TABLE_TXT]:
        print(f"  {path}")
    if log_to_mlflow:
        print(f"logged to MLflow run {report.parent_run_id} under {REPORT_ARTIFACT_PATH}/")
    return report
