"""Figures 3b and 3c of a replicated sweep: a panel per replicate group, the mean over its seeds as the line and the
min-max over seeds as a band (docs/methods.md §10). They replace the per-trial Figures 3b/3c (same file names) when the
sweep has replicate groups; a sweep without replicates keeps the per-trial figures.

Min-max rather than +-sd: with the few seeds a grid point gets (3), an sd rests on 2 degrees of freedom, while the
min-max band shows where every replicate was. As in `figures`, each panel's gid is the group id and each series has a
gid: `sft` / `restored` (the mean lines), `sft band` / `restored band` (the fill between min and max), `base` (the
mean base level), `control` (the mean level of the control R_0, over seeds) and, on the primary benchmark of Figure
3c, `stage <e>` for the pooled margin-rule stage behind epoch e.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from forgetray.metrics import registry
from forgetray.metrics.stage import STAGES
from forgetray.report.figures import (_CHECKPOINT_STATES, CONTROL_LABEL, FIG3B, STAGE_COLORS, _draw, Drawn,
                                      _data, _figure_handles, _file_safe, _integer_epochs, _legend_columns, _log_y,
                                      _min_span,
                                      control_level, panel_grid, _panel_ylabel, _suptitle)
from forgetray.report.panel_data import capped
from forgetray.report.pooled import ReplicateGroup
from forgetray.report.tables import STAGE_SHORT

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def band(group: ReplicateGroup, metric: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """(epochs, mean, min, max) over the group's replicates of a per-epoch metric, at each epoch any replicate
    logged it."""
    values: dict[int, list[float]] = {}
    for trial in group.trials:
        for step, value in trial.history.get(metric, {}).items():
            if step >= 1 and math.isfinite(value):
                values.setdefault(step, []).append(value)
    epochs = sorted(values)
    return (epochs, [statistics.fmean(values[e]) for e in epochs], [min(values[e]) for e in epochs],
            [max(values[e]) for e in epochs])


def base_level(group: ReplicateGroup, metric: str) -> float:
    """A value logged once per trial at step 0 (the base model's, the control R_0's) averaged over the group's
    replicates; nan if none logged it."""
    values = [v for t in group.trials if math.isfinite(v := t.at(metric, 0))]
    return statistics.fmean(values) if values else math.nan


def _group_panels(groups: list[ReplicateGroup], width: float = 3.6, height: float = 2.8,
                  max_cols: int = 4) -> tuple[Figure, list[Axes]]:
    return panel_grid([(group.group, group.label) for group in groups], width, height, max_cols)


def _group_panel(group: ReplicateGroup) -> tuple[str, str]:
    return group.group, group.label


def _draw_states(ax: Axes, group: ReplicateGroup, metric_of: dict[str, str]) -> None:
    for state, label, style, color in _CHECKPOINT_STATES:
        epochs, mean, low, high = band(group, metric_of[state])
        if epochs:
            ax.fill_between(epochs, low, high, color=color, alpha=0.2, linewidth=0, gid=f"{state} band",
                            label=f"{label} min-max over seeds")
            ax.plot(epochs, mean, style, label=f"{label} (mean)", markersize=4, color=color, gid=state)
    level = base_level(group, metric_of["base"])
    if not math.isnan(level):
        ax.axhline(level, color="black", linestyle="--", linewidth=1.1, label="base (mean)", gid="base")
    control_level(ax, base_level(group, metric_of["control"]), f"{CONTROL_LABEL} (mean)")


def fig_ppl_band(groups: list[ReplicateGroup]) -> Drawn | str:
    """Figure 3b over seeds: probing PPL of SFT_e and R_e vs epoch, mean and min-max band per group."""
    ppl = {state: registry.PROBE_PPL.name(state=state) for state in ("base", "control", "sft", "restored")}
    shown = [g for g in groups if any(t.has(ppl["sft"]) or t.has(ppl["restored"]) for t in g.trials)]
    if not shown:
        return f"fig3b skipped: no trial logged {ppl['sft']} or {ppl['restored']}"
    every, (shown, left_out) = shown, capped(shown)
    fig, axes = _group_panels(shown)
    for ax, group in zip(axes, shown):
        _draw_states(ax, group, ppl)
        _log_y(ax)
        ax.set_xlabel("epoch e")
        _panel_ylabel(ax, "probing PPL")
        _integer_epochs(ax)
    handles, labels = _figure_handles(axes)
    fig.legend(handles, labels, loc="outside lower center", ncols=_legend_columns(fig.get_figwidth(), labels))
    _suptitle(fig, "Fig. 3b: probing perplexity of SFT_e and R_e vs epoch, mean over seeds with min-max band "
                   "(base dashed, R_0 dotted)" + left_out)
    data = _data(every, _group_panel, lambda ax, group: _draw_states(ax, group, ppl)) if left_out else None
    return Drawn(FIG3B, fig, data)


def fig_accuracy_band(groups: list[ReplicateGroup], bench: str,
                      pooled_stages: dict[str, dict[int, str]]) -> Drawn | str:
    """Figure 3c over seeds for one benchmark: knowledge of base, SFT_e and R_e vs epoch, mean and min-max band per
    group; on the group's stage benchmark each epoch's background is its pooled stage (`pooled_stages`: group ->
    epoch -> stage)."""
    from matplotlib.patches import Patch

    knowledge = {state: registry.KNOWLEDGE.name(state=state, bench=bench)
                 for state in ("base", "control", "sft", "restored")}
    shown = [g for g in groups if any(t.has(knowledge["sft"]) or t.has(knowledge["restored"]) for t in g.trials)]
    if not shown:
        return f"fig3c for {bench} skipped: no {knowledge['sft']} or {knowledge['restored']} logged"
    drawn = set()

    def draw(ax: Axes, group: ReplicateGroup) -> None:
        if group.trials[0].primary == bench:
            for epoch, stage in sorted(pooled_stages.get(group.group, {}).items()):
                ax.axvspan(epoch - 0.5, epoch + 0.5, color=STAGE_COLORS[stage], zorder=0, linewidth=0,
                           gid=f"stage {epoch}")
                drawn.add(stage)
        _draw_states(ax, group, knowledge)

    every, (shown, left_out) = shown, capped(shown)
    data = _data(every, _group_panel, draw) if left_out else None
    drawn.clear()  # the legend explains the stages of the panels drawn
    fig, axes = _group_panels(shown)
    for ax, group in zip(axes, shown):
        draw(ax, group)
        ax.set_xlabel("epoch e")
        _panel_ylabel(ax, f"accuracy ({group.trials[0].scores.get(bench, 'primary score')})")
        _integer_epochs(ax)
    handles, labels = _figure_handles(axes)
    for stage in STAGES:
        if stage in drawn:
            handles.append(Patch(color=STAGE_COLORS[stage]))
            labels.append(f"pooled stage (margin rule): {STAGE_SHORT[stage]}")
    fig.legend(handles, labels, loc="outside lower center", ncols=_legend_columns(fig.get_figwidth(), labels, 10))
    _min_span(axes[0], 0.05)
    _suptitle(fig, f"Fig. 3c: accuracy on {bench} of base, R_0, SFT_e and R_e vs epoch, mean over seeds with min-max "
                   "band" + ("; background = pooled margin-rule stage of checkpoint e" if drawn else "") + left_out)
    return Drawn(f"fig3c_accuracy_{_file_safe(bench)}.png", fig, data)


def draw_band_figures(groups: list[ReplicateGroup], pooled: pd.DataFrame, out_dir: Path) -> list[Drawn | str]:
    """Figures 3b and 3c (one per benchmark) over seeds, saved into out_dir; a figure whose data no trial logged comes
    back as the one line saying what is missing. `pooled` is the pooled stage table (its stages colour Figure 3c)."""
    stages = {} if pooled.empty else {group: dict(zip(rows["epoch"], rows["stage"]))
                                      for group, rows in pooled.groupby("group", sort=False)}
    benches = list(dict.fromkeys(bench for group in groups for trial in group.trials for bench in trial.benchmarks))
    return [_draw(fig_ppl_band, out_dir, groups),
            *(_draw(fig_accuracy_band, out_dir, groups, bench, stages) for bench in benches)]
