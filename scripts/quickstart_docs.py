# .venv/bin/python scripts/quickstart_docs.py [--tracking-uri URI] [--run PARENT_RUN_ID] [--print-only DIR]
# (after `make quickstart`, and `forgetray run sweeps/quickstart.py --set seed=3` for the out-of-sample rerun)
"""Regenerate the README's quickstart block and docs/quickstart/ from the quickstart's executions in MLflow.

Two executions of sweeps/quickstart.py: the one on the sweep file's seeds (the newest whose `sweep.settings.seed`
is the file's, 0: seeds 0-2), and its out-of-sample rerun, the newest execution with every other `sweep.*` param
equal and seeds disjoint from those (`forgetray run sweeps/quickstart.py --set seed=3`: seeds 3-5, not used to choose
anything). Writes each one's report (stage tables, figures) into docs/quickstart/ (the rerun's into
docs/quickstart/out_of_sample/), then docs/quickstart/results.md, and replaces the README's block between the
QUICKSTART-RESULTS markers. The block holds, per execution, the margin rule's verdicts (docs/methods.md §4, §10): per
grid point each replicate's stage sequence, the pooled one, how many replicates agree, the transition epoch (pooled,
and the replicates' median and range); then per grid point and checkpoint the knowledge of base, R_0, SFT_e and R_e,
the drop and residual with their intervals and the verdicts at the reported margins. Without a rerun in the store
the block says so. Nothing is typed by hand: a rerun on another machine rewrites all of it with that machine's
numbers.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "quickstart"
README = ROOT / "README.md"
SWEEP_FILE = ROOT / "sweeps" / "quickstart.py"
EXPERIMENT = "quickstart"
OUT_OF_SAMPLE = "out_of_sample"  # the rerun's report folder inside docs/quickstart/ (or --print-only DIR)
START, END = "<!-- QUICKSTART-RESULTS:START (scripts/quickstart_docs.py writes this block) -->", \
    "<!-- QUICKSTART-RESULTS:END -->"
LETTER = {"no": "n", "pseudo": "P", "actual": "A", "inconclusive": "?", "not restored": "x"}
SEED_PARAM, REPLICATES_PARAM = "sweep.settings.seed", "sweep.replicates"


def machine() -> str:
    from forgetray.organism.shipped import cpu_signature

    sig = cpu_signature()
    return f"{sig['cpu']} ({sig['kernels']} kernels), {os.cpu_count()} cores, torch {sig['torch']}"


def replace_readme_block(start: str, end: str, body: str) -> None:
    """Replace what stands between the README's `start` and `end` markers with `body` (it ends with a newline)."""
    text = README.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{README} has no {start} ... {end} block to replace")
    README.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m: f"{start}\n{body}{end}", text,
                             flags=re.S))


# --- which executions ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Execution:
    """A quickstart execution (its parent run): run id, first seed, replicates, the day it started."""

    run_id: str
    seed: int
    replicates: int
    day: str

    @property
    def seeds(self) -> str:
        return f"{self.seed}-{self.seed + self.replicates - 1}"


def _execution(run: Any) -> Execution | None:
    """An execution's seeds from its parent run's params; None for a run that does not say (an older one)."""
    params = run.data.params
    try:
        seed, replicates = int(params[SEED_PARAM]), int(params.get(REPLICATES_PARAM, "1"))
    except (KeyError, ValueError):
        return None
    day = datetime.datetime.fromtimestamp(run.info.start_time / 1000, datetime.timezone.utc).date().isoformat()
    return Execution(run.info.run_id, seed, replicates, day)


def _same_sweep_but_seed(a: Any, b: Any) -> bool:
    """Whether two parent runs ran the same sweep: every `sweep.*` param equal but the first seed."""
    def settings(run: Any) -> dict[str, str]:
        return {k: v for k, v in run.data.params.items() if k.startswith("sweep.") and k != SEED_PARAM}

    return settings(a) == settings(b)


def find_executions(runs: list, seed: int, run_id: str | None = None) -> tuple[Any | None, Any | None]:
    """(in sample, out of sample) among the experiment's parent runs, newest first: in sample the run `run_id`, else
    the newest whose first seed is `seed` (the sweep file's); out of sample the newest run of the same sweep (every
    other `sweep.*` param equal) whose seeds do not overlap in-sample's. Either is None when there is none."""
    if run_id is not None:
        chosen = next((run for run in runs if run.info.run_id == run_id), None)
        if chosen is None:
            raise SystemExit(f"{run_id!r} is not an execution of {EXPERIMENT!r} in this store")
    else:
        chosen = next((run for run in runs if (e := _execution(run)) is not None and e.seed == seed), None)
    found = _execution(chosen) if chosen is not None else None
    if found is None:
        return chosen, None
    low, high = found.seed, found.seed + found.replicates
    for run in runs:
        other = _execution(run)
        if other is None or run.info.run_id == found.run_id or not _same_sweep_but_seed(run, chosen):
            continue
        if other.seed + other.replicates <= low or other.seed >= high:  # no seed in common
            return chosen, run
    return chosen, None


# --- the tables ---------------------------------------------------------------------------------------------------

def _short(stage: Any) -> str:
    from forgetray.report.tables import STAGE_SHORT

    return STAGE_SHORT.get(stage, str(stage))


def sequence(stages: list[str]) -> str:
    return " ".join(LETTER[s] for s in stages)


def _epoch(value: Any) -> str:
    return "none" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:g}"


def _grid_point(label: str) -> str:
    return label.split(" (seeds")[0]


def summary_rows(pooled: pd.DataFrame) -> list[dict]:
    """One row per grid point: each replicate's margin-rule stage sequence over the checkpoints, the pooled one, the
    replicates agreeing per checkpoint, the transition epoch by the margin rule (pooled; the replicates' median and
    range), how many replicates were restored per checkpoint."""
    rows = []
    for _group, frame in pooled.groupby("group", sort=False):
        frame = frame.sort_values("epoch")
        per_replicate = list(zip(*(str(s).split(",") for s in frame["replicate_stages"])))
        first = frame.iloc[0]
        low, high = first["transition_low"], first["transition_high"]
        spread = "" if low is None or pd.isna(low) else f", {_epoch(low)}-{_epoch(high)}"
        rows.append({
            "grid point": _grid_point(first["label"]),
            "seeds": str(first["seeds"]).split(","),
            "epochs": " ".join(str(int(e)) for e in frame["epoch"]),
            "replicates": [sequence(list(r)) for r in per_replicate],
            "pooled": sequence(list(frame["stage"].map(_short))),
            "agreeing": " ".join(str(a).split("/")[0] for a in frame["agreeing"]),
            "transition": _epoch(first["transition_pooled"]),
            "replicates transition": f"{_epoch(first['transition_median'])}{spread} "
                                     f"({first['transition_reached']} reached actual)",
            "restored": " ".join(str(r).split("/")[0] for r in frame["restored"]),
        })
    return rows


def _interval(row: dict, key: str) -> str:
    estimate, low, high = row[key], row[f"{key}_low"], row[f"{key}_high"]
    if pd.isna(estimate):
        return "-"
    return f"{estimate:+.3f} [{low:+.3f}, {high:+.3f}]"


def checkpoint_rows(pooled: pd.DataFrame) -> list[dict]:
    """One row per grid point and checkpoint: the pooled margin-rule stage and the replicates agreeing, knowledge of
    base, R_0, SFT_e and R_e (means over seeds), the drop and residual with their intervals, the verdicts at the
    reported margins and the McNemar variant."""
    from forgetray.metrics.margin import REPORTED_MARGINS

    rows = []
    for _group, frame in pooled.groupby("group", sort=False):
        for k, row in enumerate(frame.sort_values("epoch").to_dict("records")):
            rows.append({
                "grid point": _grid_point(row["label"]) if k == 0 else "",
                "epoch": str(int(row["epoch"])),
                "stage": f"{_short(row['stage'])} ({row['agreeing']})",
                **{state: f"{row[f'knowledge_{state}_mean']:.3f}" for state in ("base", "control", "sft", "restored")},
                "drop": _interval(row, "drop"), "residual": _interval(row, "residual"),
                "at margins": "/".join(LETTER[_short(row[f"stage_at_{m:g}"])] for m in REPORTED_MARGINS),
                "mcnemar": _short(row["stage_mcnemar"]),
            })
    return rows


def summary_markdown(rows: list[dict]) -> str:
    seeds = rows[0]["seeds"] if rows else []
    lines = ["| grid point | checkpoints | " + " | ".join(f"seed {s}" for s in seeds) + " | pooled | agreeing | "
             "transition (pooled) | replicates' transition (median, range) | replicates restored |",
             "|---|---|" + "---|" * len(seeds) + "---|---|---|---|---|"]
    for r in rows:
        cells = (r["replicates"] + [""] * len(seeds))[:len(seeds)]
        lines.append(f"| {r['grid point']} | {r['epochs']} | {' | '.join(cells)} | {r['pooled']} | {r['agreeing']} | "
                     f"{r['transition']} | {r['replicates transition']} | {r['restored']} |")
    return "\n".join(lines) + "\n"


def checkpoint_markdown(rows: list[dict]) -> str:
    lines = ["| grid point | e | pooled stage (agreeing) | base | R_0 | SFT_e | R_e | drop D_S [interval] | "
             "residual D_R [interval] | at .01/.02/.05 | McNemar variant |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['grid point']} | {r['epoch']} | {r['stage']} | {r['base']} | {r['control']} | {r['sft']} | "
                     f"{r['restored']} | {r['drop']} | {r['residual']} | {r['at margins']} | {r['mcnemar']} |")
    return "\n".join(lines) + "\n"


def execution_markdown(title: str, pooled: pd.DataFrame) -> str:
    """One execution's two tables under a bold title."""
    return (f"**{title}**\n\n{summary_markdown(summary_rows(pooled))}\n"
            f"{checkpoint_markdown(checkpoint_rows(pooled))}")


def legend(pooled: pd.DataFrame) -> str:
    seeds = len(str(pooled["seeds"].iloc[0]).split(","))
    return (f"Stages by the margin rule (docs/methods.md §4, §10) at delta = {pooled['margin'].iloc[0]:g}, per checkpoint "
            "(epochs as listed): n = no forgetting, P = pseudo, A = actual, ? = inconclusive (an interval straddles "
            "delta: more questions or seeds settle it), x = not restored (R_e's probing PPL not within ppl_tolerance "
            f"of R_0's, either side); pooled = the rule on the mean over the {seeds} seeds with two-level bootstrap "
            f"intervals (seeds, then questions) at {pooled['level'].iloc[0]:.4g} (Bonferroni over the epochs); "
            "agreeing = replicates whose own verdict is the pooled one. Knowledge = option-likelihood accuracy on the "
            "held-out benchmark, mean over seeds, of the base, the control R_0 (the start through the same "
            "restoration), SFT_e and R_e; drop D_S = base - SFT_e, residual D_R = R_0 - R_e (positive = lost); at "
            ".01/.02/.05 = the verdicts at those margins; McNemar variant = the pooled exact-test rule against base, "
            "reported beside, never the headline.")


def block(in_sample: tuple[Execution, pd.DataFrame], out_of_sample: tuple[Execution, pd.DataFrame] | None,
          planned: str, where: str) -> str:
    """The README block: a header, the in-sample execution's tables, then the out-of-sample rerun's (or a line
    saying it is not in the store; `planned` = the seeds it would run, e.g. "3-5")."""
    execution, pooled = in_sample
    parts = [f"Measured by `make quickstart` on {where}; regenerated by `scripts/quickstart_docs.py`. "
             + legend(pooled), "",
             execution_markdown(f"The quickstart (seeds {execution.seeds}, run {execution.day})", pooled)]
    if out_of_sample is None:
        parts.append(f"**Out of sample (seeds {planned})**: no execution in this store "
                     f"(`forgetray run sweeps/quickstart.py --set seed={planned.split('-')[0]}`).\n")
    else:
        rerun, frame = out_of_sample
        parts.append(execution_markdown(f"Out of sample (seeds {rerun.seeds}, run {rerun.day}; seeds not used to "
                                        "choose anything)", frame))
    return "\n".join(parts)


# --- the run ------------------------------------------------------------------------------------------------------

def sweep_seed() -> tuple[int, int]:
    """The sweep file's first seed and replicates: what "the README's seeds" are."""
    from forgetray.cli import load_sweep

    sweep = load_sweep(str(SWEEP_FILE))
    return int(sweep.settings.get("seed", 0)), sweep.replicates


def main(argv=None) -> int:
    from forgetray.report.build import DEFAULT_RESULTS_DIR, run_report
    from forgetray.tracking import Tracker, default_tracking_uri

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", help="default: the sqlite store `forgetray run` uses in ./forgetray-results")
    parser.add_argument("--run", help="the quickstart's parent run id (default: the newest on the sweep file's seeds)")
    parser.add_argument("--print-only", metavar="DIR",
                        help="write the reports into DIR and print the block; leave docs/ and the README alone")
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri(DEFAULT_RESULTS_DIR)
    seed, replicates = sweep_seed()
    chosen, rerun = find_executions(Tracker(uri).sweep_runs(EXPERIMENT), seed, args.run)
    if chosen is None:
        raise SystemExit(f"no execution of {EXPERIMENT!r} with seed {seed} in {uri} (run `make quickstart`)")
    out = Path(args.print_only) if args.print_only else DOCS
    report = run_report(EXPERIMENT, uri, chosen.info.run_id, out_dir=out, log_to_mlflow=False)
    if report.pooled_table.empty:
        raise SystemExit(f"execution {chosen.info.run_id} has no pooled table (no replicates judged)")
    in_sample = _execution(chosen) or Execution(chosen.info.run_id, seed, replicates, "?")
    texts = [report.text]
    out_of_sample = None
    if rerun is not None:
        second = run_report(EXPERIMENT, uri, rerun.info.run_id, out_dir=out / OUT_OF_SAMPLE, log_to_mlflow=False)
        out_of_sample = (_execution(rerun), second.pooled_table)
        texts.append(second.text)
    planned = f"{in_sample.seed + in_sample.replicates}-{in_sample.seed + 2 * in_sample.replicates - 1}"
    table = block((in_sample, report.pooled_table), out_of_sample, planned, machine())
    if args.print_only:
        print(table)
        return 0
    reports = "\n".join(f"```\n{text}```\n" for text in texts)
    (DOCS / "results.md").write_text(f"# The quickstart's result\n\n{table}\n{reports}")
    replace_readme_block(START, END, table)
    print(table)
    print(f"written: {DOCS}/results.md, the README's quickstart block, the reports in {DOCS}"
          + (f" and {DOCS / OUT_OF_SAMPLE}" if rerun is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
