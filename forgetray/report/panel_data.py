"""Figures with a panel per trial or per grid point (3a, 3b, 3c and their bands over seeds) draw at most `MAX_PANELS`
panels; past that the figure shows the first `MAX_PANELS` (its title says so) and every panel's data goes to a CSV
beside it (`<figure>.csv`), drawn by the same code into a `Recorder` instead of an Axes.

Why a cap: a panel is 2.8 inches tall, so a 216-trial sweep's Figure 3a was 54 rows of panels (a 17,000-pixel PNG)
and a 1,000-trial one 250 rows: nobody reads them, and drawing and laying them out was most of the report's time
(issue 19: 123 of 162 s at 216 trials; matplotlib's shared y axis makes each added panel cost more). The CSV keeps
everything the full figure showed, in a form that can be filtered and re-plotted. Sweeps of up to `MAX_PANELS`
trials (grid points) are drawn as before, byte for byte.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from forgetray.report.runs import TrialData

MAX_PANELS = 24  # 6 rows of 4 panels: ~17 inches tall, still one screen's scroll
DATA_GLOB = "fig*.csv"  # the data files a report may write (build._clear_previous removes stale ones)
COLUMNS = ("panel", "title", "series", "x", "y", "y_min", "y_max", "stage")


class Recorder:
    """Stands in for a panel's matplotlib Axes in the drawing code of a panel figure, and keeps the data instead: a
    row per plotted point (`plot`), per band point (`fill_between`: y_min, y_max), per level line (`axhline`: no x)
    and per stage background (`axvspan`: x its middle, `stage` from its colour). `series` is the artist's gid, as in
    the figure."""

    def __init__(self, panel: str, title: str, stage_of_color: dict[str, str]):
        self.panel, self.title, self.stage_of_color = panel, title, stage_of_color
        self.rows: list[dict[str, Any]] = []

    def _row(self, series: str | None, x: float, y: float = math.nan, y_min: float = math.nan,
             y_max: float = math.nan, stage: str = "") -> None:
        self.rows.append({"panel": self.panel, "title": self.title, "series": series, "x": x, "y": y,
                          "y_min": y_min, "y_max": y_max, "stage": stage})

    def plot(self, xs: Iterable[float], ys: Iterable[float], *_: Any, gid: str | None = None, **__: Any) -> None:
        for x, y in zip(xs, ys):
            self._row(gid, x, y)

    def fill_between(self, xs: Iterable[float], lows: Iterable[float], highs: Iterable[float], *_: Any,
                     gid: str | None = None, **__: Any) -> None:
        for x, low, high in zip(xs, lows, highs):
            self._row(gid, x, y_min=low, y_max=high)

    def axhline(self, y: float, *_: Any, gid: str | None = None, **__: Any) -> None:
        self._row(gid, math.nan, y)

    def axvspan(self, x0: float, x1: float, *_: Any, color: str = "", gid: str | None = None, **__: Any) -> None:
        self._row(gid, (x0 + x1) / 2, stage=self.stage_of_color.get(color, ""))


def capped(items: list) -> tuple[list, str]:
    """The items a panel figure draws (the first MAX_PANELS) and the words its title adds when some are left out."""
    if len(items) <= MAX_PANELS:
        return items, ""
    return items[:MAX_PANELS], f" [first {MAX_PANELS} of {len(items)} panels; every panel's data in the .csv]"


def panel_data(items: list, panel: Callable[[Any], tuple[str, str]], draw: Callable[[Any, Any], None],
               stage_of_color: dict[str, str]) -> pd.DataFrame:
    """Every item's panel as rows (`COLUMNS`): `panel(item)` gives its gid and title, `draw(ax, item)` is the code
    that plots its series on an Axes, here run on a `Recorder`."""
    rows = []
    for item in items:
        recorder = Recorder(*panel(item), stage_of_color)
        draw(recorder, item)
        rows += recorder.rows
    return pd.DataFrame(rows, columns=list(COLUMNS))


def data_path(out_dir: Path, figure_file: str) -> Path:
    return out_dir / (Path(figure_file).stem + ".csv")


def trial_panel(trial: TrialData, varying: list[str]) -> tuple[str, str]:
    """A trial's panel: its gid (the trial's name) and title (its label), as `figures._panels` gives them."""
    return trial.name, trial.label(varying)


def legend_label(trials: list[TrialData], trial: TrialData, varying: list[str]) -> str | None:
    """A line's legend label in a figure with a line per trial (4, 5), none past MAX_PANELS trials: a legend of 216
    labels took the whole figure (its plot collapsed to nothing), and tab10's colours repeat after 10 anyway."""
    return trial.label(varying) if len(trials) <= MAX_PANELS else None


def unnamed(trials: list[TrialData]) -> str:
    """What the title of a figure with a line per trial adds when `legend_label` names none."""
    return f" [{len(trials)} trials, a line each, too many to name]" if len(trials) > MAX_PANELS else ""
