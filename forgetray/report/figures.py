"""The report's figures (PS Figures 3a, 3b, 3c/3d, 4, 5), drawn with matplotlib from `TrialData` alone.

Each `fig_*` function returns a `Drawn` (the file name and the matplotlib `Figure`, not yet saved) or the one line
saying why the figure is skipped; `draw_figures` draws and saves them all. Matplotlib is imported inside the
functions, so importing the report costs nothing until a figure is drawn. Panels carry the trial's name and each
plotted series a short name as their matplotlib `gid` (invisible in a PNG), so that what a figure plots can be
read back from the `Figure` and checked against the store.
"""

from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from forgetray.metrics import registry
from forgetray.metrics.stage import (ACTUAL_FORGETTING, INCONCLUSIVE, NO_FORGETTING, NOT_RESTORED, PSEUDO_FORGETTING,
                                     STAGES)
from forgetray.report.panel_data import capped, data_path, legend_label, panel_data, trial_panel, unnamed
from forgetray.report.runs import TrialData
from forgetray.report.tables import STAGE_SHORT

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Fixed names of the figure files; the per-benchmark accuracy figures are fig3c_accuracy_<bench>.png.
FIG3A, FIG3B, FIG4, FIG5 = ("fig3a_restoring_ppl.png", "fig3b_ppl_vs_epoch.png", "fig4_format_entropy.png",
                            "fig5_em.png")
FIG3C_GLOB = "fig3c_accuracy_*.png"
# Light backgrounds behind a checkpoint's points in Figure 3c, from "fine" to "knowledge lost".
STAGE_COLORS = {NO_FORGETTING: "#d9f0d3", PSEUDO_FORGETTING: "#fee391", ACTUAL_FORGETTING: "#fcbba1",
                INCONCLUSIVE: "#ffffff", NOT_RESTORED: "#e0e0e0"}
FORMAT_ALIGNED = 0.95  # docs/methods.md §3: format alignment is reached when mean P_fmt exceeds this
# Figure 4's rows: the IFT-step probes the registry declares, with their axis labels.
FORMAT_LABELS = {"p_fmt": "P_fmt", "entropy_vocab": "H_V (nats)", "entropy_options": "H_opt (nats)",
                 "knowledge": "accuracy"}
CONTROL_LABEL, CONTROL_COLOR = "R_0 (control)", "tab:green"
# The two model states of a checkpoint as Figures 3b and 3c draw them: (state, legend label, style, colour).
_CHECKPOINT_STATES = (("sft", "SFT_e", "o-", "tab:blue"), ("restored", "R_e", "s-", "tab:purple"))


@dataclass
class Drawn:
    """A figure drawn for the report: its file name in the report's folder and the matplotlib Figure; `data`, for a
    figure that left panels out (`panel_data`), every panel's data, saved beside it as `<name>.csv`."""

    file: str
    figure: Figure
    data: Any = None


def _shown(metric: registry.Metric, **fields: str) -> str:
    """A metric's name for a note, the fields not given shown as placeholders (`restore/probe_ppl/epoch_NNN`)."""
    placeholders = {name: "NNN" if name == "epoch" else f"<{name}>" for name in metric.fields}
    return metric.pattern.format(**{**placeholders, **fields})


# --- drawing helpers ------------------------------------------------------------------------------------------------

def _figure(width: float, height: float) -> Figure:
    """A figure drawn with the Agg canvas: no pyplot, no global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _panels(trials: list[TrialData], varying: list[str], width: float = 3.6, height: float = 2.8,
            max_cols: int = 4) -> tuple[Figure, list[Axes]]:
    """A figure with one panel per trial (up to 4 per row), titled with the trial's label, its gid the trial's name.

    The panels share their y axis: trials of one sweep measure the same quantity on the same data, and a common
    scale is what makes them comparable at a glance."""
    return panel_grid([(trial.name, trial.label(varying)) for trial in trials], width, height, max_cols)


def panel_grid(panels: list[tuple[str, str]], width: float = 3.6, height: float = 2.8,
               max_cols: int = 4) -> tuple[Figure, list[Axes]]:
    """A figure with one panel per (gid, title), up to `max_cols` per row, sharing the y axis."""
    n = len(panels)
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig = _figure(width * cols + 1.2, height * rows + 1.2)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax, (gid, title) in zip(axes, panels):
        ax.set_gid(gid)
        ax.set_title("\n".join(textwrap.wrap(title, 42)), fontsize=9)
    return fig, list(axes[:n])


def _panel_ylabel(ax: Axes, label: str) -> None:
    """The y label on the first panel of each row only: the panels share their y axis."""
    if ax.get_subplotspec().is_first_col():
        ax.set_ylabel(label)


def _suptitle(fig: Figure, text: str) -> None:
    """The figure's title, wrapped to its width (about 13 characters per inch at this size)."""
    fig.suptitle("\n".join(textwrap.wrap(text, int(fig.get_figwidth() * 13))), fontsize=11)


def _min_span(ax: Axes, span: float) -> None:
    """Widen the y range to at least `span`, so that a 0.01 wobble in accuracy does not fill a panel."""
    low, high = ax.get_ylim()
    if high - low < span:
        middle = (low + high) / 2
        ax.set_ylim(middle - span / 2, middle + span / 2)


def _integer_epochs(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _log_y(ax: Axes) -> None:
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


def _base_level(ax: Axes, value: float) -> None:
    if not math.isnan(value):
        ax.axhline(value, color="black", linestyle="--", linewidth=1.1, label="base", gid="base")


def control_level(ax: Axes, value: float, label: str = CONTROL_LABEL) -> None:
    """The control R_0's level (gid `control`): the start through the same restoration, what R_e is judged against
    (restoration overshoots the base's probing PPL and costs some knowledge of its own)."""
    if not math.isnan(value):
        ax.axhline(value, color=CONTROL_COLOR, linestyle=":", linewidth=1.4, label=label, gid="control")


def _figure_handles(axes: Any) -> tuple[list, list]:
    """Each distinct legend label once, over all panels (a panel may lack a line another has)."""
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    return list(handles.values()), list(handles)


def _trial_colors(trials: list[TrialData]) -> dict[str, tuple]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {trial.name: palette[i % len(palette)] for i, trial in enumerate(trials)}


def _data(items: list, panel: Callable[[Any], tuple[str, str]], draw: Callable[[Any, Any], None]) -> Any:
    """Every item's panel as data (`panel_data`), the stage backgrounds named by their stage."""
    return panel_data(items, panel, draw, {color: stage for stage, color in STAGE_COLORS.items()})


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# --- the figures ----------------------------------------------------------------------------------------------------

def fig_restoring_ppl(trials: list[TrialData], varying: list[str]) -> Drawn | str:
    """Figure 3a: probing PPL along each restoration SFT_e -> R_e (step 0 = SFT_e), one line per checkpoint (gid
    `epoch <e>`), with the base's and the control R_0's levels (gids `base`, `control`)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm
    from matplotlib.lines import Line2D

    curves = [(trial, by_epoch) for trial in trials if (by_epoch := trial.restorations())]
    if not curves:
        return f"fig3a skipped: no trial logged {_shown(registry.RESTORE_TRAJECTORY)} (no restoration in this sweep)"
    last_epoch = max(max(by_epoch) for _, by_epoch in curves)
    # Discrete colours, one per checkpoint epoch, shared by all panels and explained by one colour bar.
    cmap = colormaps["viridis"]
    norm = BoundaryNorm([e + 0.5 for e in range(last_epoch + 1)], cmap.N)

    def draw(ax: Axes, curve: tuple[TrialData, dict[int, str]]) -> None:
        trial, by_epoch = curve
        for epoch, name in sorted(by_epoch.items()):
            steps, values = trial.series(name)
            ax.plot(steps, values, color=cmap(norm(epoch)), linewidth=1.3, marker="o", markersize=2.5,
                    gid=f"epoch {epoch}")
        _base_level(ax, trial.at(registry.PROBE_PPL.name(state="base"), 0))
        control_level(ax, trial.at(registry.PROBE_PPL.name(state="control"), 0))

    shown, left_out = capped(curves)
    fig, axes = _panels([trial for trial, _ in shown], varying)
    for ax, curve in zip(axes, shown):
        draw(ax, curve)
        _log_y(ax)
        ax.set_xlabel("restoring step (0 = SFT_e)")
        _panel_ylabel(ax, "probing PPL")
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="checkpoint epoch e")
    bar.set_ticks(range(1, last_epoch + 1))
    levels = [(Line2D([], [], color="black", linestyle="--"), "base model")]
    if any(line.get_gid() == "control" for ax in axes for line in ax.get_lines()):
        levels.append((Line2D([], [], color=CONTROL_COLOR, linestyle=":"), CONTROL_LABEL))
    fig.legend(*zip(*levels), loc="outside lower center", ncols=len(levels))
    _suptitle(fig, "Fig. 3a: probing perplexity while restoring SFT_e into R_e (base dashed, R_0 dotted)" + left_out)
    return Drawn(FIG3A, fig, _data(curves, lambda curve: trial_panel(curve[0], varying), draw) if left_out else None)


def fig_ppl_vs_epoch(trials: list[TrialData], varying: list[str]) -> Drawn | str:
    """Figure 3b: probing PPL of SFT_e and R_e (gids `sft`, `restored`) against the epoch e, with the base model's
    level (gid `base`) and the control R_0's (gid `control`): restoration overshoots the base, and R_e is restored
    when it is within ppl_tolerance of R_0."""
    ppl = {state: registry.PROBE_PPL.name(state=state) for state in ("base", "control", "sft", "restored")}
    shown = [t for t in trials if t.has(ppl["sft"]) or t.has(ppl["restored"])]
    if not shown:
        return f"fig3b skipped: no trial logged {ppl['sft']} or {ppl['restored']}"

    def draw(ax: Axes, trial: TrialData) -> None:
        for state, label, style, color in _CHECKPOINT_STATES:
            if trial.has(ppl[state]):
                ax.plot(*trial.series(ppl[state]), style, label=label, markersize=4, color=color, gid=state)
        _base_level(ax, trial.at(ppl["base"], 0))
        control_level(ax, trial.at(ppl["control"], 0))

    every, (shown, left_out) = shown, capped(shown)
    fig, axes = _panels(shown, varying)
    for ax, trial in zip(axes, shown):
        draw(ax, trial)
        _log_y(ax)
        ax.set_xlabel("epoch e")
        _panel_ylabel(ax, "probing PPL")
        _integer_epochs(ax)
    fig.legend(*_figure_handles(axes), loc="outside lower center", ncols=4)
    _suptitle(fig, "Fig. 3b: probing perplexity of SFT_e and R_e vs epoch (base dashed, R_0 dotted)" + left_out)
    return Drawn(FIG3B, fig, _data(every, lambda trial: trial_panel(trial, varying), draw) if left_out else None)


def fig_accuracy(trials: list[TrialData], varying: list[str], bench: str) -> Drawn | str:
    """Figure 3c/3d for one benchmark: its primary score for base (dashed), the control R_0 (dotted), SFT_e and R_e
    vs epoch (gids `base`, `control`, `sft`, `restored`); on the primary benchmark each epoch's background shows the
    checkpoint's stage by the margin rule (gid `stage <e>`; none for a run judged before the margin rule)."""
    from matplotlib.patches import Patch

    knowledge = {state: registry.KNOWLEDGE.name(state=state, bench=bench) for state in ("sft", "restored")}
    shown = [t for t in trials if t.has(knowledge["sft"]) or t.has(knowledge["restored"])]
    if not shown:
        return f"fig3c for {bench} skipped: no {knowledge['sft']} or {knowledge['restored']} logged"
    stages_drawn = set()

    def draw(ax: Axes, trial: TrialData) -> None:
        if trial.primary == bench:
            for epoch in trial.epochs:
                stage = trial.stage(epoch)
                if stage in STAGE_COLORS:
                    ax.axvspan(epoch - 0.5, epoch + 0.5, color=STAGE_COLORS[stage], zorder=0, linewidth=0,
                               gid=f"stage {epoch}")
                    stages_drawn.add(stage)
        for state, label, style, color in _CHECKPOINT_STATES:
            if trial.has(knowledge[state]):
                ax.plot(*trial.series(knowledge[state]), style, label=label, color=color, markersize=4, gid=state)
        _base_level(ax, trial.knowledge("base", bench, 0))
        control_level(ax, trial.knowledge("control", bench, 0))

    every, (shown, left_out) = shown, capped(shown)
    data = _data(every, lambda trial: trial_panel(trial, varying), draw) if left_out else None
    stages_drawn.clear()  # the legend explains the stages of the panels drawn, not of those left out
    fig, axes = _panels(shown, varying)
    for ax, trial in zip(axes, shown):
        draw(ax, trial)
        ax.set_xlabel("epoch e")
        _panel_ylabel(ax, f"accuracy ({trial.scores.get(bench, 'primary score')})")
        _integer_epochs(ax)
    handles, labels = _figure_handles(axes)
    for stage in STAGES:
        if stage in stages_drawn:
            handles.append(Patch(color=STAGE_COLORS[stage]))
            labels.append(f"stage (margin rule): {STAGE_SHORT[stage]}")
    fig.legend(handles, labels, loc="outside lower center", ncols=_legend_columns(fig.get_figwidth(), labels, 10))
    _min_span(axes[0], 0.05)  # the panels share y
    judged = any(t.primary == bench for t in shown)
    stages = "; background = margin-rule stage of checkpoint e" if judged else \
        " (stages are judged on the primary benchmark)"
    _suptitle(fig, f"Fig. 3c: accuracy on {bench} of base, R_0, SFT_e and R_e vs epoch{stages}{left_out}")
    return Drawn(f"fig3c_accuracy_{_file_safe(bench)}.png", fig, data)


def fig_format_entropy(trials: list[TrialData], varying: list[str]) -> Drawn | str:
    """Figure 4: P_fmt, the entropies H_V and H_opt (and knowledge) against the IFT step, one line per trial (gid the
    trial's name); a column per benchmark, each panel's gid the metric it plots (`steps/<bench>/<key>`)."""
    from matplotlib.ticker import FuncFormatter

    def steps(bench: str, key: str) -> str:
        return registry.STEPS_FORMAT.name(bench=bench, key=key)

    benches = [b for b in dict.fromkeys(b for t in trials for b in t.benchmarks)
               if any(t.has(steps(b, key)) for t in trials for key in registry.FORMAT_KEYS)]
    if not benches:
        return f"fig4 skipped: no trial logged {_shown(registry.STEPS_FORMAT, key='p_fmt')} or the entropies " \
               "(IFT-step probes)"
    rows = [key for key in registry.FORMAT_KEYS if any(t.has(steps(b, key)) for t in trials for b in benches)]
    colors = _trial_colors(trials)
    fig = _figure(max(6.5, 4.6 * len(benches) + 1.0), 2.3 * len(rows) + 1.3)
    axes = fig.subplots(len(rows), len(benches), squeeze=False, sharex="col")
    for col, bench in enumerate(benches):
        for row, key in enumerate(rows):
            ax = axes[row][col]
            ax.set_gid(steps(bench, key))
            for trial in trials:
                if trial.has(steps(bench, key)):
                    ax.plot(*trial.series(steps(bench, key)), "o-", markersize=3, linewidth=1.2,
                            color=colors[trial.name], label=legend_label(trials, trial, varying), gid=trial.name)
            if key == "p_fmt":
                ax.axhline(FORMAT_ALIGNED, color="gray", linestyle=":", linewidth=1,
                           label=f"format aligned (P_fmt = {FORMAT_ALIGNED})")
            # Format alignment happens within the first few steps, the rest over epochs: a log step axis shows
            # both, and symlog keeps step 0 (the base model) on it.
            ax.set_xscale("symlog", linthresh=1)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.set_ylabel(FORMAT_LABELS[key])
            if row == 0:
                ax.set_title(bench, fontsize=10)
            if row == len(rows) - 1:
                ax.set_xlabel("IFT optimizer step (0 = base)")
    handles, labels = _figure_handles(axes.ravel())
    fig.legend(handles, labels, loc="outside lower center", ncols=_legend_columns(fig.get_figwidth(), labels),
               fontsize=8)
    _suptitle(fig, "Fig. 4: format probability and entropies at the first answer position vs IFT step"
              + unnamed(trials))
    return Drawn(FIG4, fig)


def fig_em(trials: list[TrialData], varying: list[str]) -> Drawn | str:
    """Figure 5: exact memorization EM of the IFT data by SFT_e (solid, gid `<trial> sft`; epoch 0 = base) and R_e
    (dotted, gid `<trial> restored`)."""
    from matplotlib.lines import Line2D

    em = {state: registry.EM.name(state=state) for state in ("base", "sft", "restored")}
    shown = [t for t in trials if t.has(em["sft"]) or t.has(em["restored"])]
    if not shown:
        return f"fig5 skipped: no trial logged {em['sft']}"
    colors = _trial_colors(trials)
    fig = _figure(8.5, 5.2)
    ax = fig.subplots()
    for trial in shown:
        color = colors[trial.name]
        steps, values = trial.series(em["sft"])
        base = trial.at(em["base"], 0)
        if not math.isnan(base) and 0 not in steps:
            steps, values = [0] + steps, [base] + values
        ax.plot(steps, values, "o-", color=color, markersize=4, label=legend_label(trials, trial, varying),
                gid=f"{trial.name} sft")
        if trial.has(em["restored"]):
            ax.plot(*trial.series(em["restored"]), "s:", color=color, markersize=4, gid=f"{trial.name} restored")
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
    _suptitle(fig, "Fig. 5: exact memorization of the IFT data vs epoch" + unnamed(trials))
    return Drawn(FIG5, fig)


# --- all of them ----------------------------------------------------------------------------------------------------

def _draw(figure: Callable[..., Drawn | str], out_dir: Path, *args: Any) -> Drawn | str:
    """One figure, saved to out_dir, or the note saying which data it lacks (each `fig_*` checks for what it
    plots and returns that note). Anything else that goes wrong is a bug, not missing data: it propagates."""
    drawn = figure(*args)
    if isinstance(drawn, Drawn):
        drawn.figure.savefig(out_dir / drawn.file, dpi=110)
        if drawn.data is not None:
            drawn.data.to_csv(data_path(out_dir, drawn.file), index=False)
    return drawn


def draw_figures(trials: list[TrialData], varying: list[str], out_dir: Path,
                 per_trial_checkpoints: bool = True) -> list[Drawn | str]:
    """Every figure of the report, saved into out_dir, in the report's order; a figure whose data no trial logged
    comes back as the one line saying what is missing. Without `per_trial_checkpoints`, Figures 3b and 3c are left to the caller (a
    replicated sweep draws them over seeds: `report.bands`)."""
    benches = list(dict.fromkeys(bench for trial in trials for bench in trial.benchmarks))
    results = [_draw(fig_restoring_ppl, out_dir, trials, varying)]
    if per_trial_checkpoints:
        results.append(_draw(fig_ppl_vs_epoch, out_dir, trials, varying))
        results += [_draw(fig_accuracy, out_dir, trials, varying, bench) for bench in benches]
    if not benches:
        results.append(f"fig3c skipped: no trial logged {_shown(registry.KNOWLEDGE)}")
    results += [_draw(fig_format_entropy, out_dir, trials, varying), _draw(fig_em, out_dir, trials, varying)]
    return results
