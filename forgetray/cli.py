"""The `forgetray` command.

    forgetray run SWEEP [--tracking-uri URI] [--storage PATH] [--set key=value ...] [--resume]
    forgetray validate SWEEP [--set key=value ...]
    forgetray organism build [--for-tests] [--root DIR] [--pretrain]
    forgetray organism verify [--full] [--root DIR]
    forgetray organism ship --root DIR
    forgetray report EXPERIMENT [--tracking-uri URI] [--out DIR] [--run PARENT_RUN_ID]
    forgetray ui [STORE] [--port N] [--host H]

Exit codes: 0 success, 1 some trial failed, 2 bad input (found before Ray starts; nothing is written).
"""

from __future__ import annotations

import argparse
import runpy
import sys
import traceback
from pathlib import Path

from forgetray.grids import Sweep, parse_override
from forgetray.spec import SpecError

EXIT_OK, EXIT_TRIAL_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def load_sweep(path: str, overrides: list[str] | None = None) -> Sweep:
    """Execute a sweep file and return its module-level `sweep`, with `--set` overrides applied."""
    file = Path(path)
    if not file.is_file():
        raise SpecError(f"sweep file {path!r} does not exist")
    try:
        namespace = runpy.run_path(str(file), run_name="forgetray_sweep")
    except SpecError as exc:
        raise SpecError(f"{path}:{_line_in(file, exc)}: {exc}") from None
    except Exception as exc:  # a sweep file is user code: report where it broke, in one line
        raise SpecError(f"{path}:{_line_in(file, exc)}: {type(exc).__name__}: {exc}") from None
    sweep = namespace.get("sweep")
    if not isinstance(sweep, Sweep):
        raise SpecError(f"{path}: must define a module-level `sweep = forgetray.Sweep(...)`")
    if overrides:
        sweep = sweep.with_overrides(dict(parse_override(o) for o in overrides))
    return sweep


def _line_in(file: Path, exc: BaseException) -> str:
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if Path(frame.filename).resolve() == file.resolve():
            return str(frame.lineno)
    return "?"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forgetray", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a sweep file (Ray Tune + Ray Train/DeepSpeed, results in MLflow)")
    run.add_argument("sweep", help="path to a sweep file defining `sweep`")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite store in ./forgetray-results)")
    run.add_argument("--storage", help="checkpoint storage root: a local or shared folder, or s3://bucket/prefix "
                     "(default: ./forgetray-results/storage)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a setting; a JSON list makes it a grid (repeatable)")
    run.add_argument("--resume", action="store_true",
                     help="continue the latest interrupted execution of this sweep (same storage)")

    validate = sub.add_parser("validate", help="check a sweep file and everything it names, without running")
    validate.add_argument("sweep")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    organism = sub.add_parser("organism", help="the built-in synthetic model organism")
    organism_sub = organism.add_subparsers(dest="organism_command", required=True)
    build = organism_sub.add_parser("build", help="generate the world and pre-train the base models (cached)")
    build.add_argument("--root", help="build into this directory instead of the cache")
    build.add_argument("--for-tests", action="store_true", help="the tiny configuration the tests use")
    build.add_argument("--pretrain", action="store_true",
                       help="pre-train the base models on this machine instead of installing the shipped weights")
    verify = organism_sub.add_parser(
        "verify", help="pre-train again here and compare with the shipped weights bit for bit")
    verify.add_argument("--full", action="store_true",
                        help="the whole pre-training (minutes) instead of its first steps (seconds)")
    verify.add_argument("--root", help="the built organism whose data and tokenizer to use (default: the cache's)")
    ship = organism_sub.add_parser(
        "ship", help="(maintainers) copy a build's pre-trained base weights into the package's shipped weights")
    ship.add_argument("--root", required=True, help="an organism built with --pretrain")

    report = sub.add_parser("report", help="stage table and figures of a sweep execution, from MLflow alone")
    report.add_argument("experiment", help="the sweep's name (its MLflow experiment)")
    report.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite store in ./forgetray-results)")
    report.add_argument("--out", help="output directory (default: ./forgetray-results/report/EXPERIMENT)")
    report.add_argument("--run", help="the sweep's parent run id (default: the newest execution)")

    # listed for --help; `main` hands its arguments to forgetray.ui.main, which parses them
    sub.add_parser("ui", add_help=False, help="start the MLflow UI on a results folder and print each sweep's "
                   "grouped view (forgetray ui --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ui"]:
        from forgetray import ui

        return ui.main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "organism":
            return _organism(args)
        if args.command == "report":
            from forgetray.report import run_report

            run_report(args.experiment, tracking_uri=args.tracking_uri, parent_run_id=args.run, out_dir=args.out)
            return EXIT_OK
        sweep = load_sweep(args.sweep, args.overrides)
        if args.command == "validate":
            from forgetray.resources import resolve_sweep

            from forgetray.sharing import describe

            resolve_sweep(sweep)
            print(f"ok: sweep {sweep.name!r}, {sweep.size} trial(s); axes: "
                  + (", ".join(f"{k}={list(v)}" for k, v in sweep.axes.items()) or "none"))
            from forgetray.grids import Per

            for key, rule in sweep.settings.items():
                if isinstance(rule, Per):
                    print(f"{key} follows {rule.setting}: " + ", ".join(f"{k} -> {v}" for k, v in rule.values))
            print("\n".join(describe(list(sweep.trials), sweep.share_trajectories)))
            return EXIT_OK
        return _run(sweep, args)
    except SpecError as exc:
        print(f"forgetray: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _report(name: str, uri: str, parent_run_id: str, execution: str) -> None:
    """The report into `<execution>/report/` (on object storage: made in a temporary folder, then uploaded)."""
    import tempfile

    from forgetray import storage
    from forgetray.report import run_report

    if not storage.is_remote(execution):
        run_report(name, uri, parent_run_id, Path(execution) / "report")
        return
    with tempfile.TemporaryDirectory(prefix="forgetray-report-") as tmp:
        run_report(name, uri, parent_run_id, Path(tmp) / "report")
        storage.put_dir(Path(tmp) / "report", storage.join(execution, "report"))


def _run(sweep: Sweep, args) -> int:
    from forgetray.sweep import run_sweep

    table = run_sweep(sweep, tracking_uri=args.tracking_uri, storage=args.storage, resume=args.resume)
    print()
    print(summary_table(table))
    uri = table.attrs["tracking_uri"]
    if not table.empty:  # the run ends with its report: the stage table and the figures, from MLflow alone
        print()
        _report(sweep.name, uri, table.attrs["parent_run_id"], table.attrs["execution_dir"])
    print(f"\nMLflow: {uri}  experiment {sweep.name!r}, parent run {table.attrs['parent_run_id']}")
    if uri.startswith("sqlite:"):
        # forgetray ui, not `mlflow ui`: one worker (comes up on a busy machine), runs open in Model training mode
        print(f"browse: forgetray ui {Path(uri[len('sqlite:///'):]).parent}")
    if table.attrs.get("ui_link"):  # the trial runs as knowledge curves (README: "Browsing results in MLflow")
        print(f"knowledge curves: {table.attrs['ui_link']}")
    failed = table.attrs.get("failed_trials", 0)
    if failed:
        print(f"forgetray: {failed} trial(s) failed", file=sys.stderr)
        return EXIT_TRIAL_FAILED
    return EXIT_OK


def summary_table(table) -> str:
    """Per-checkpoint summary: primary knowledge score of base and SFT, its change, probing perplexity."""
    if table.empty:
        return "(no checkpoints)"
    knowledge = sorted(c for c in table.columns if c.startswith("sft/") and c.endswith("/knowledge"))
    columns = {"trial": table["trial"], "epoch": table["epoch"]}
    for col in knowledge:
        bench = col[len("sft/"):-len("/knowledge")]
        base = table.get(f"base/{bench}/knowledge")
        columns[f"{bench} base"] = base
        columns[f"{bench} sft"] = table[col]
        if base is not None:
            columns[f"{bench} delta"] = table[col] - base
    for state in ("base", "sft"):
        if f"{state}/probe/ppl" in table:
            columns[f"ppl {state}"] = table[f"{state}/probe/ppl"]
    import pandas as pd

    return pd.DataFrame(columns).to_string(index=False, float_format=lambda v: f"{v:.3f}")


def _organism(args) -> int:
    from forgetray import organism

    from forgetray.organism import shipped

    root = Path(args.root) if args.root else None
    if args.organism_command == "ship":
        print(f"shipped weights written to {shipped.ship(organism.OrganismConfig(), root)}")
        return EXIT_OK
    if args.organism_command == "verify":
        config = organism.OrganismConfig()
        root = organism.build(config=config, root=root)
        same = True
        for name, (expected, found) in shipped.verify(config, root, args.full).items():
            same &= expected == found
            print(f"{name}: {'bit for bit equal' if expected == found else 'DIFFERENT'} "
                  f"(shipped {expected[:16]}, here {found[:16]})")
        made = shipped.read_shipped(shipped.shipped_dir(config))["made_on"]
        print(f"shipped weights made on {made['cpu']} ({made['kernels']}, torch {made['torch']}); "
              f"this machine: {shipped.cpu_signature()}")
        return EXIT_OK if same else EXIT_TRIAL_FAILED
    config = organism.OrganismConfig.for_tests() if args.for_tests else organism.OrganismConfig()
    root = organism.build(config=config, root=root, pretrain=args.pretrain)
    print(f"organism ready: {root}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
