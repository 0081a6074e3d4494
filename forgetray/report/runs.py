"""Reading a sweep execution back from MLflow: the parent run and, per trial run, a `TrialData`.

Everything goes through `forgetray.tracking` (bulk reads: `forgetray.tracking_history`), and every metric name is
read through `forgetray.metrics.registry` (which benchmarks a trial has, which metrics count IFT epochs, which
restorations it logged): this module is where the report meets the store; the tables and figures only see `TrialData`.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetray.metrics import registry
from forgetray.metrics.stage import STAGE_CODES, STAGES, transition_epoch
from forgetray.spec import SpecError, TrialConfig
from forgetray.report.history import load_histories
from forgetray.tracking import TAG_KIND, TAG_TRIAL, Tracker
from forgetray.tracking_history import search_trial_runs

STAGE_BY_CODE = {code: name for name, code in STAGE_CODES.items()}
# Tags forgetray.trial_stages sets on a trial run (tags, not metrics: the registry does not declare them).
TAG_STAGE_PREFIX = "forgetray.stage.epoch_"
TAG_TRANSITION = "forgetray.transition_epoch"
_AT_START = ("base", "control")  # the states measured once, at step 0: the IFT phase's start and the control R_0
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrialConfig)}


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
    artifact_uri: str = ""  # the run's artifact root (search_runs gives it): its files in one request each

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

    def number(self, key: str) -> float:
        """A numeric setting of this run. A run from before the setting existed did not log it: TrialConfig's default,
        what such a run used. A logged value that is not a number is a broken store: SpecError naming the run, the
        setting and the value, never a guess."""
        raw = self.settings.get(key)
        if raw is None:
            return float(_DEFAULTS[key])
        try:
            return float(raw)
        except ValueError:
            raise SpecError(f"run {self.name} ({self.run_id}): setting {key}={raw!r} is not a number") from None

    def knowledge(self, state: str, bench: str | None, epoch: int) -> float:
        """A benchmark's primary score for a model state at an epoch (base and the control R_0: step 0); nan without a
        benchmark."""
        if bench is None:
            return math.nan
        return self.at(registry.KNOWLEDGE.name(state=state, bench=bench), 0 if state in _AT_START else epoch)

    @property
    def epochs(self) -> list[int]:
        """The IFT checkpoints this trial logged anything about: the steps >= 1 of the metrics the registry logs per
        epoch (step 0, the base model, is not a checkpoint; optimizer and restoring steps are not epochs)."""
        per_epoch = [name for name in self.history if (found := registry.parse(name)) and found[0].step == "epoch"]
        return sorted({step for name in per_epoch for step in self.history[name] if step >= 1})

    def restorations(self) -> dict[int, str]:
        """Checkpoint epoch -> the metric holding probing PPL along its restoration (Figure 3a), for those logged."""
        out = {}
        for name in self.history:
            found = registry.parse(name)
            if found and found[0] is registry.RESTORE_TRAJECTORY and self.has(name):
                out[int(found[1]["epoch"])] = name
        return out

    @property
    def judged_before_margin_rule(self) -> bool:
        """Whether the run was judged before the margin rule existed: it logged `stage/code` without
        `stage/test_code`, so its `stage/code` (and `forgetray.stage.*` tags, transition tag) are the significance
        test's stages, now the `test` variant, and it has no control R_0 and no intervals."""
        return self.has(registry.STAGE_CODE.name()) and not self.has(registry.STAGE_TEST_CODE.name())

    def stage(self, epoch: int, fixed: bool = False, test: bool = False) -> str | None:
        """The checkpoint's stage name: by default the margin rule's (the `stage/code` metric, else the
        `forgetray.stage.epoch_NNN` tag; None for a run judged before the margin rule), with `test` the paired-test
        variant's, with `fixed` the fixed-threshold variant's (None where not logged)."""
        legacy = self.judged_before_margin_rule
        if fixed:
            metric = registry.STAGE_FIXED_CODE
        elif test:
            metric = registry.STAGE_CODE if legacy else registry.STAGE_TEST_CODE
        elif legacy:
            return None
        else:
            metric = registry.STAGE_CODE
        code = self.at(metric.name(), epoch)
        if math.isfinite(code):
            return STAGE_BY_CODE.get(int(code), f"code {code:g}")
        if not (fixed or test):
            return self.tags.get(f"{TAG_STAGE_PREFIX}{epoch:03d}")
        return None

    def stage_at(self, epoch: int, margin: str) -> str | None:
        """The margin rule's stage at one of the reported margins (`registry.MARGIN_KEYS`: "0.01", ...)."""
        code = self.at(registry.STAGE_AT_MARGIN.name(key=margin), epoch)
        return STAGE_BY_CODE.get(int(code), f"code {code:g}") if math.isfinite(code) else None

    def transition(self) -> tuple[bool, int | None]:
        """(judged, transition epoch) by the margin rule: whether any margin-rule stage was logged, and the first
        epoch with actual forgetting. A run judged before the margin rule is not judged by it."""
        if self.judged_before_margin_rule:
            return False, None
        tag = self.tags.get(TAG_TRANSITION)
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

    def label(self, varying: list[str]) -> str:
        """The trial's name with its varying settings: how tables' text and figure legends tell trials apart."""
        settings = ", ".join(f"{key}={short(self.settings.get(key))}" for key in varying)
        return f"{self.name} ({settings})" if settings else self.name


def _load_trial(run: Any, history: dict[str, dict[int, float]]) -> TrialData:
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
        artifact_uri=run.info.artifact_uri,
    )


def _logged_benchmarks(history: dict) -> set[str]:
    """The benchmarks some per-benchmark score (or IFT-step probe) was logged for, by the registry's names."""
    benches = set()
    for name in history:
        found = registry.parse(name)
        if found and "bench" in found[1]:
            benches.add(found[1]["bench"])
    return benches


def _ordered_benchmarks(declared_param: str, history: dict) -> list[str]:
    """The benchmarks with logged metrics, in the order the trial declared them (its first is the primary one).

    The `trial.benchmarks` param is the list as written in the sweep (names or file paths); metrics are logged under
    the name, or under a file's stem (`resources.benchmark_key`), so each declared entry is matched both ways."""
    logged = _logged_benchmarks(history)
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


def varying_settings(trials: list[TrialData]) -> list[str]:
    """The settings whose value differs between trials: what tells the trials apart in the table and legends."""
    keys = sorted(set().union(*(trial.settings for trial in trials)))
    return [key for key in keys if len({trial.settings.get(key) for trial in trials}) > 1]


def short(value: str | None, limit: int = 24) -> str:
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
            return ",".join(short(str(item), limit) for item in items)
    if "/" in text and " " not in text:
        text = text.rstrip("/").rsplit("/", 1)[-1]
    return text if len(text) <= limit else text[:limit - 1] + "…"


# --- the parent run -------------------------------------------------------------------------------------------------

def check_store_exists(tracking_uri: str) -> None:
    """Opening a missing sqlite store would quietly create an empty one: say it is missing instead."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
        if not path.is_file():
            raise SpecError(f"no MLflow store at {path} (pass --tracking-uri)")


def resolve_parent(tracker: Tracker, experiment: str, parent_run_id: str | None) -> Any:
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


def load_trials(tracker: Tracker, experiment: str, parent: Any, notes: list[str] | None = None,
                per_key: bool = False) -> list[TrialData]:
    """The sweep run's trials, read once each and sorted by name: one search for all of them (paged), then each
    one's metric history from its `metrics/history.parquet` (`report.history`; with `per_key`, or for a run without
    a complete table, one request per metric key, with a line in `notes`). SpecError when it has none."""
    runs = [run for run in search_trial_runs(tracker, parent.info.experiment_id, parent.info.run_id)
            if run.data.tags.get(TAG_KIND) == "trial"]
    if not runs:
        raise SpecError(f"sweep run {parent.info.run_id} of experiment {experiment!r} has no trial runs")
    names = {run.info.run_id: run.data.tags.get(TAG_TRIAL) or run.info.run_name or run.info.run_id for run in runs}
    histories, read_notes = load_histories(tracker, runs, names, per_key=per_key)
    if notes is not None:
        notes.extend(read_notes)
    return sorted((_load_trial(run, histories[run.info.run_id]) for run in runs), key=lambda t: t.name)
