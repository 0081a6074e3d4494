# .venv/bin/python bench/bench_trial.py            (the organism must be built: `forgetray organism build`)
"""What a whole quickstart trial costs next to the plain replica of the same work (issue 11 item 4).

Both sides run the quickstart's trials (the sweep's own settings: 12 trials since it is replicated) on this machine,
one after the other in one run:
- forgetray: `forgetray.run(sweeps/quickstart.py)` into a temporary store (Ray, Ray Train, DeepSpeed, MLflow; two
  trials side by side, one DeepSpeed rank each);
- replica: `scripts/replica_testbed.py` (plain PyTorch, one thread) for each trial, all processes side by side.
The same trials on the same two cores: ratio = forgetray wall / replica wall (goal <= 1.5).

Then where forgetray's time went, per trial, read back from its MLflow run (run start and end, and the timestamps
of the metrics each phase reports): start-up + base evaluation (run start -> base metrics), the IFT epochs (-> last
epoch's metrics; of which `train/epoch_seconds` is training compute), restorations (-> last R_e's metrics) and the
end of the trial (stage classification, continual summaries, closing the run).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def run_forgetray(sweep_file: Path, workdir: Path) -> tuple[float, str, str]:
    """Wall seconds of the sweep, its tracking URI and parent run id."""
    from forgetray import run
    from forgetray.cli import load_sweep

    sweep = load_sweep(str(sweep_file))
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    start = time.perf_counter()
    table = run(sweep, tracking_uri=uri, storage=workdir / "storage", verbose=False)
    seconds = time.perf_counter() - start
    if table.attrs["failed_trials"]:
        raise SystemExit(f"{table.attrs['failed_trials']} trial(s) failed; see {workdir}")
    return seconds, uri, table.attrs["parent_run_id"]


def run_replicas(sweep_file: Path) -> tuple[float, list[str]]:
    """Wall seconds of the replica of every trial of the sweep, all side by side (one process each)."""
    from forgetray.cli import load_sweep

    commands = []
    for trial in load_sweep(str(sweep_file)).trials:
        commands.append([sys.executable, str(ROOT / "scripts" / "replica_testbed.py"), "--model", trial.model,
                         "--dataset", trial.dataset, "--lr", str(trial.lr), "--epochs", str(trial.epochs),
                         "--batch", str(trial.batch_size), "--restore-lr", str(trial.restore_lr),
                         "--restore-batch", str(trial.restore_batch_size), "--seed", str(trial.seed),
                         "--restore-passes", str(trial.restore_max_passes),
                         "--early-probes", str(trial.early_checkpoints),
                         "--trajectory-points", str(trial.restore_trajectory_points),
                         "--tolerance", str(trial.ppl_tolerance)])
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands]
    outputs = [p.communicate()[0] for p in procs]
    seconds = time.perf_counter() - start
    for p, out in zip(procs, outputs):
        if p.returncode:
            raise SystemExit(f"replica failed:\n{out[-3000:]}")
    return seconds, outputs


def metric_times(client, run, prefix: str) -> list[float]:
    """When each point of a run's metrics named `prefix...` was logged (seconds since the epoch), from MLflow."""
    return [m.timestamp / 1000 for name in run.data.metrics if name.startswith(prefix)
            for m in client.get_metric_history(run.info.run_id, name)]


def breakdown(uri: str, parent_run_id: str) -> list[dict]:
    """Per trial, from MLflow timestamps: its fixed cost before training (its start -> its base report, which comes
    right before its first training step) and after it (its last restoration's report -> its run's end), and the
    phases between. A trial's start is its run's start, or, for a later trial of a shared worker group (tag
    forgetray.cohort), the previous one's last report: it was waiting until then."""
    from mlflow import MlflowClient

    from forgetray.tracking import TAG_COHORT, Tracker

    client = MlflowClient(uri)
    runs = Tracker(uri).trial_runs(parent_run_id)

    def last_time(run, prefix: str) -> float:
        times = metric_times(client, run, prefix)
        return max(times) if times else float("nan")

    position = {}
    for run in runs:
        key, _, at = run.data.tags.get(TAG_COHORT, f"{run.info.run_id}:0").rpartition(":")
        position[key, int(at)] = run
    rows = []
    for (key, at), run in sorted(position.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        t0 = run.info.start_time / 1000 if at == 0 else last_time(position[key, at - 1], "restored/")
        end = run.info.end_time / 1000
        base, ift, restored = last_time(run, "base/"), last_time(run, "sft/"), last_time(run, "restored/")
        compute = sum(m.value for m in client.get_metric_history(run.info.run_id, "train/epoch_seconds"))
        rows.append({"trial": run.data.tags.get("forgetray.trial", run.info.run_name), "to first step": base - t0,
                     "IFT epochs": ift - base, "(training)": compute, "restorations": restored - ift,
                     "after last probe": end - restored, "fixed": base - t0 + end - restored, "total": end - t0})
    return rows


def main(argv: list[str] | None = None) -> int:
    from machine import cpu_name, usable_cores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default=str(ROOT / "sweeps" / "quickstart.py"))
    parser.add_argument("--keep", metavar="DIR", help="run forgetray's side in DIR (kept) instead of a temp dir")
    parser.add_argument("--no-replica", action="store_true", help="forgetray's side and its breakdown only")
    args = parser.parse_args(argv)
    sweep_file = Path(args.sweep)
    import os

    print(f"machine: {cpu_name()}, {usable_cores()} cores; sweep {sweep_file.name}; load average "
          f"{os.getloadavg()[0]:.1f} at the start (other work on the machine stretches both sides' wall clock)",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-trial-") as tmp:
        if args.keep:
            tmp = args.keep
            Path(tmp).mkdir(parents=True, exist_ok=True)
        ours, uri, parent = run_forgetray(sweep_file, Path(tmp))
        print(f"forgetray: {ours:.0f} s wall", flush=True)
        outputs = []
        if not args.no_replica:
            plain, outputs = run_replicas(sweep_file)
            print(f"replica:   {plain:.0f} s wall (same trials, side by side)", flush=True)
            print(f"ratio forgetray / replica: {ours / plain:.2f}  (goal <= 1.3)\n")
        rows = breakdown(uri, parent)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    columns = ["to first step", "IFT epochs", "(training)", "restorations", "after last probe", "fixed", "total"]
    print("where forgetray's time went (s, from MLflow timestamps; '(training)' = sum of train/epoch_seconds):")
    print(f"{'trial':<44}" + "".join(f"{c:>17}" for c in columns))
    for row in rows:
        print(f"{row['trial'][:44]:<44}" + "".join(f"{row[c]:>17.1f}" for c in columns))
    fixed = sorted(row["fixed"] for row in rows)
    print(f"fixed cost per trial (to first step + after last probe): median {statistics.median(fixed):.1f} s "
          f"(range {fixed[0]:.1f} .. {fixed[-1]:.1f}; goal <= 10)")
    print("\nreplica's own log (last lines):")
    for out in outputs:
        print("  " + "\n  ".join(out.strip().splitlines()[-2:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
