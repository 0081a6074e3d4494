"""Sweep grids: `grid([...])` axes, the `Sweep` (a named grid of `TrialConfig`s, optionally replicated over seeds),
its expansion, the CLI's `--set key=value` parsing and `flatten`.

Split out of `forgetray.spec` (which keeps `TrialConfig`, the settings and their validation, and does not import
this module: import these names from here or from the package, `from forgetray import Sweep`). The module is `grids`,
not `grid`: `forgetray.grid` is the `grid()` function in the package namespace.

Replicates (docs/methods.md §10): `Sweep(..., replicates=n)` runs every grid point with the seeds seed, seed + 1, ...,
seed + n - 1: a hidden seed axis. The trials are exactly those `seed=grid([seed, ..., seed + n - 1])` gives (same
configs, same config hashes, same runs and checkpoints); what differs is that they are declared replicates of one
grid point, so the report pools them (`forgetray.metrics.pooled`, `forgetray.report.pooled`) instead of listing
independent trials. A trial's replicate group is `replicate_group(trial)`, the config hash of its grid point without
the seed. Because of that, `replicates > 1` takes a single seed (the first replicate's), never a seed grid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import types
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from forgetray.spec import SETTINGS, SpecError, TrialConfig

SWEEP_OPTIONS = ("replicates", "share_trajectories", "share_workers")  # `--set` accepts these besides TrialConfig's
TAG_REPLICATE_GROUP = "forgetray.replicate_group"  # a trial run's `replicate_group` (set with its stages)


@dataclass(frozen=True)
class Grid:
    """A sweep axis: every value is tried, one trial each (cartesian product with the other grids)."""

    values: tuple

    def __post_init__(self):
        if len(self.values) == 0:
            raise SpecError("grid([]) is empty: a grid needs at least one value")


def grid(values: Iterable[Any]) -> Grid:
    """Make a sweep axis from the given values, e.g. `epochs=grid([1, 2, 4])`."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise SpecError(f"grid() takes a list of values, got {values!r}")
    return Grid(tuple(values))


@dataclass(frozen=True)
class Per:
    """A setting whose value follows another setting's: `lr=per("dataset", {"a": 5e-3, "b": 4e-3})` gives every
    trial the lr of its dataset. Not an axis of its own (no extra trials); the other setting may be a grid or a value,
    and each of its values needs an entry."""

    setting: str
    values: tuple  # ((value of `setting`, this setting's value), ...)

    def lookup(self, key: Any, name: str) -> Any:
        for candidate, value in self.values:
            if candidate == key:
                return value
        raise SpecError(f"setting {name!r} = per({self.setting!r}, ...) has no value for {self.setting}={key!r} "
                        f"(it has: {', '.join(repr(k) for k, _ in self.values)}); give it one with "
                        f"--set {name}=VALUE (or add {key!r} to the per(...) in the sweep file)")


def per(setting: str, values: Mapping[Any, Any]) -> Per:
    """A setting that follows `setting`'s value, e.g. `lr=per("dataset", {"organism-alpaca": 5e-3, ...})`."""
    if not isinstance(values, Mapping) or not values:
        raise SpecError(f"per({setting!r}, ...) takes a non-empty dict from {setting}'s values to this setting's, "
                        f"got {values!r}")
    return Per(setting, tuple(values.items()))


def replicate_group(trial: TrialConfig) -> str:
    """The trial's replicate group: a stable short hash of its config without the seed (its grid point). The
    replicates of one grid point share it; so would trials of a `seed=grid(...)` sweep, which the report still
    keeps apart (it pools only a sweep run with `replicates > 1`)."""
    data = trial.to_dict()
    del data["seed"]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True, init=False)
class Sweep:
    """A named grid of trials. Any `TrialConfig` setting may be a single value or a `grid([...])`; `replicates=n` runs
    each grid point with n seeds (seed, seed + 1, ..., seed + n - 1; module docstring).

    >>> Sweep("demo", model=grid(["organism-tiny", "organism-small"]), epochs=grid([1, 2])).size
    4
    >>> Sweep("demo", epochs=grid([1, 2]), seed=7, replicates=3).size
    6

    `cases=[{...}, ...]`: alternatives that set several settings together, one axis crossed with the grids, for arms
    that no product of grids gives (plain training, a method, the method's control; {} = the defaults):
    >>> Sweep("demo", epochs=grid([1, 2]), cases=[{"lr": 1e-3}, {"lr": 1e-4, "batch_size": 8}]).size
    4
    """

    name: str
    settings: Mapping[str, Any]  # what the user set (values or Grids); the rest take TrialConfig's defaults
    max_concurrent_trials: int  # 0 = as many as the cluster's resources allow
    replicates: int  # seeds per grid point; 1 = none
    cases: tuple  # of mappings (read-only): alternatives setting several settings at once; () = none
    # Trials differing only in `epochs` train one trajectory when the schedule allows (forgetray.sharing). A sweep
    # option, not a trial setting: the results are the same either way, so the trials' identities must not change.
    share_trajectories: bool
    # A grid point's replicates run in turn in one Ray Train worker group (forgetray.sharing.cohorts): its start-up
    # (processes, imports, loading) is paid once per group instead of once per trial. Results are the same either way.
    share_workers: bool
    trials: tuple = field(repr=False)  # grid points in order, each point's replicates next to each other

    def __init__(self, name: str, *, max_concurrent_trials: int = 0, replicates: int = 1,
                 share_trajectories: bool = True, share_workers: bool = True,
                 cases: Iterable[Mapping[str, Any]] = (), **settings: Any):
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\ "):
            raise SpecError(f"sweep name must be a non-empty string without '/', '\\' or spaces, got {name!r}")
        if not isinstance(max_concurrent_trials, int) or max_concurrent_trials < 0:
            raise SpecError(f"max_concurrent_trials must be an int >= 0, got {max_concurrent_trials!r}")
        if not isinstance(replicates, int) or isinstance(replicates, bool) or replicates < 1:
            raise SpecError(f"replicates must be an int >= 1 (seeds per grid point; 1 = none), got {replicates!r}")
        if not isinstance(share_trajectories, bool):
            raise SpecError(f"share_trajectories must be True or False, got {share_trajectories!r}")
        if not isinstance(share_workers, bool):
            raise SpecError(f"share_workers must be True or False, got {share_workers!r}")
        unknown = [k for k in settings if k not in SETTINGS]
        if unknown:
            raise SpecError(f"unknown axis {unknown[0]!r} (known axes: {', '.join(SETTINGS)})")
        for key, value in settings.items():
            if isinstance(value, Per) and (value.setting not in SETTINGS or value.setting == key
                                           or isinstance(settings.get(value.setting), Per)):
                raise SpecError(f"setting {key!r} = per({value.setting!r}, ...): {value.setting!r} must be another "
                                "setting of this sweep that is itself a value or a grid")
        cases = tuple(types.MappingProxyType(dict(case)) for case in _checked_cases(cases, settings))
        if replicates > 1 and (isinstance(settings.get("seed"), Grid) or any("seed" in c for c in cases)):
            raise SpecError(f"replicates={replicates} runs each grid point with seeds seed, seed+1, ...: give 'seed' "
                            "one value (the first replicate's), not a grid (seed=grid([...]) alone runs independent "
                            "trials)")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "settings", types.MappingProxyType(dict(settings)))
        object.__setattr__(self, "max_concurrent_trials", max_concurrent_trials)
        object.__setattr__(self, "replicates", replicates)
        object.__setattr__(self, "share_trajectories", share_trajectories)
        object.__setattr__(self, "share_workers", share_workers)
        object.__setattr__(self, "cases", cases)
        object.__setattr__(self, "trials", tuple(_expand(settings, replicates, cases)))

    @property
    def size(self) -> int:
        return len(self.trials)

    @property
    def axes(self) -> dict[str, tuple]:
        """The settings that vary: name -> values (the replicates' hidden seed axis is not one of them; a setting the
        cases set lists each case's value, the default where a case leaves it)."""
        axes = {k: v.values for k, v in self.settings.items() if isinstance(v, Grid)}
        defaults = TrialConfig()
        for key in dict.fromkeys(k for case in self.cases for k in case):
            axes[key] = tuple(case.get(key, getattr(defaults, key)) for case in self.cases)
        return axes

    @property
    def replicate_groups(self) -> dict[str, tuple[TrialConfig, ...]]:
        """Replicate group (`replicate_group`) -> its trials in seed order, in grid order; {} without replicates."""
        if self.replicates == 1:
            return {}
        groups: dict[str, list[TrialConfig]] = {}
        for trial in self.trials:
            groups.setdefault(replicate_group(trial), []).append(trial)
        return {group: tuple(trials) for group, trials in groups.items()}

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Sweep":
        """A copy with some settings replaced (the CLI's `--set key=value`; `replicates` included)."""
        settings = dict(overrides)
        replicates = settings.pop("replicates", self.replicates)
        share = settings.pop("share_trajectories", self.share_trajectories)
        workers = settings.pop("share_workers", self.share_workers)
        cases = [{k: v for k, v in case.items() if k not in settings} for case in self.cases]  # an override wins
        return Sweep(self.name, max_concurrent_trials=self.max_concurrent_trials, replicates=replicates,
                     share_trajectories=share, share_workers=workers, cases=cases,
                     **{**self.settings, **settings})

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "max_concurrent_trials": self.max_concurrent_trials,
            "replicates": self.replicates,
            "share_trajectories": self.share_trajectories,
            "share_workers": self.share_workers,
            "cases": [dict(case) for case in self.cases],
            "settings": {k: _plain(v) for k, v in self.settings.items()},
            "axes": sorted(self.axes),
        }


def _plain(value: Any) -> Any:
    if isinstance(value, Grid):
        return list(value.values)
    if isinstance(value, Per):
        return {"per": value.setting, "values": [list(pair) for pair in value.values]}
    return value


def _checked_cases(cases: Iterable[Mapping[str, Any]], settings: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if isinstance(cases, Mapping) or isinstance(cases, str):
        raise SpecError("cases must be a list of settings mappings, e.g. cases=[{'lr': 1e-3}, {'lr': 1e-4}]")
    cases = list(cases)
    for i, case in enumerate(cases):
        if not isinstance(case, Mapping):
            raise SpecError(f"cases[{i}] must be a mapping of settings ({{}}: the defaults), got {case!r}")
        for key, value in case.items():
            if key not in SETTINGS:
                raise SpecError(f"cases[{i}]: unknown setting {key!r} (known: {', '.join(SETTINGS)})")
            if key in settings:
                raise SpecError(f"cases[{i}] sets {key!r}, which the sweep also sets: give it in one place")
            if isinstance(value, (Grid, Per)):
                raise SpecError(f"cases[{i}][{key!r}]: a case holds plain values, not grid() or per()")
    return cases


def _expand(settings: Mapping[str, Any], replicates: int = 1,
            cases: tuple[Mapping[str, Any], ...] = ()) -> list[TrialConfig]:
    names = [n for n in settings if not isinstance(settings[n], Per)]
    following = {n: v for n, v in settings.items() if isinstance(v, Per)}
    choices = [settings[n].values if isinstance(settings[n], Grid) else (settings[n],) for n in names]
    defaults = TrialConfig()
    trials, seen = [], set()
    for combo, case in itertools.product(itertools.product(*choices), cases or ({},)):
        values = {**dict(zip(names, combo)), **case}
        for name, rule in following.items():
            values[name] = rule.lookup(values.get(rule.setting, getattr(defaults, rule.setting)), name)
        point = TrialConfig(**values)
        for replicate in range(replicates):
            trial = dataclasses.replace(point, seed=point.seed + replicate) if replicate else point
            key = trial.config_hash()
            if key in seen:
                raise SpecError(f"the grid produces the same trial twice ({trial.short_name()}): remove duplicate "
                                "values")
            seen.add(key)
            trials.append(trial)
    return trials


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `--set key=value`. The value is JSON if it parses (numbers, lists -> grid), else a string.
    `replicates` (a sweep option, not a trial setting) is never a grid."""
    if "=" not in text:
        raise SpecError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in SETTINGS and key not in SWEEP_OPTIONS:
        raise SpecError(f"--set: unknown axis {key!r} (known axes: {', '.join(SETTINGS)}; sweep options: "
                        f"{', '.join(SWEEP_OPTIONS)})")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(value, list) and key not in ("benchmarks", *SWEEP_OPTIONS):
        return key, grid(value)
    return key, value


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value}: how resolved configs become MLflow params."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
