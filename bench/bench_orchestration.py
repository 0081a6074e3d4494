# .venv/bin/python bench/bench_orchestration.py --trials 216
"""What orchestration costs per trial in a big sweep of minimal trials (issue 19 item 2): the Tune driver's memory
and each trial's time outside its arithmetic, for N trials.

The sweep: N trials that differ only in their learning rate (a grid of N values: no two share training), each the
smallest work that still goes through Ray Tune, Ray Train (one DeepSpeed rank), MLflow and the stage rule: the
tests' tiny Llama (2 layers, hidden 32), one epoch of 8 Alpaca-shaped examples, one 4-question benchmark, 4 probe
passages, no restoration. `forgetray run` runs it as a subprocess (as users do) on a local Ray with this machine's
cores, two trials at a time on two cores, into a temporary sqlite store.

Measured: the driver process's resident memory (psutil, every 0.5 s: peak, and after the first and the last trial),
the sweep's wall time per trial, and per trial from its MLflow run: its whole time (run start -> end) and what of
it was arithmetic (`train/epoch_seconds`), the rest being orchestration (Ray Train's controller and workers starting,
the model and data loaded, the probes, MLflow calls, the stage rule).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

SWEEP = """from forgetray import Sweep, grid
sweep = Sweep("orchestration", model={model!r}, dataset={dataset!r}, benchmarks=[{benchmark!r}],
    probe_set={probe_set!r}, probe_passages=4, probe_batch_size=4, batch_size=8, max_length=256, workers=1,
    cpus_per_worker=1, epochs=1, lr=grid({lrs!r}), max_concurrent_trials=2)
"""


def write_sweep(root: Path, trials: int) -> Path:
    import fixtures

    files = {"model": fixtures.make_model_dir(root / "tiny-llama"),
             "dataset": fixtures.make_alpaca_file(root / "ift.jsonl", n=8),
             "benchmark": fixtures.make_benchmark_file(root / "bench.jsonl", n=4),
             "probe_set": fixtures.make_passages_file(root / "probe.jsonl", n=4)}
    lrs = [round(1e-3 * (1 + i / 1000), 9) for i in range(trials)]
    path = root / "sweep.py"
    path.write_text(SWEEP.format(**{k: str(v) for k, v in files.items()}, lrs=lrs))
    return path


class RssSampler(threading.Thread):
    """The resident memory of one process, every `every` seconds, until stopped."""

    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        import psutil

        self.process, self.every, self.samples = psutil.Process(pid), every, []
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._stop_event.is_set():
            try:
                self.samples.append((time.time(), self.process.memory_info().rss))
            except psutil.NoSuchProcess:
                return
            time.sleep(self.every)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def per_trial(uri: str) -> list[dict]:
    """Each trial run's start, end and arithmetic (train/epoch_seconds), from MLflow."""
    from bench_trial import metric_times
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("orchestration")
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=5000)
            if r.data.tags.get("forgetray.kind") == "trial"]

    def first_time(run, prefix: str) -> float:
        times = metric_times(client, run, prefix)
        return min(times) if times else float("nan")

    return [{"status": r.info.status, "start": r.info.start_time / 1000, "end": r.info.end_time / 1000,
             "base": first_time(r, "base/"), "sft": first_time(r, "sft/"),
             "training": r.data.metrics.get("train/epoch_seconds", float("nan"))} for r in runs]


def main(argv: list[str] | None = None) -> int:
    from machine import cpu_name, usable_cores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=216)
    args = parser.parse_args(argv)
    print(f"machine: {cpu_name()}, {usable_cores()} cores; {args.trials} minimal trials, two at a time; load "
          f"average {os.getloadavg()[0]:.1f} at the start", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as tmp:
        root = Path(tmp)
        sweep = write_sweep(root, args.trials)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        log = (root / "driver.log").open("w")
        started = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "forgetray.cli", "run", str(sweep), "--tracking-uri", uri,
                                 "--storage", str(root / "storage")], cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        sampler = RssSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        wall = time.time() - started
        sampler.stop()
        if rc != 0:
            print((root / "driver.log").read_text()[-4000:])
            raise SystemExit(f"forgetray run exited {rc}")
        trials = per_trial(uri)
    finished = sorted(t["end"] for t in trials)
    peak = max(rss for _, rss in sampler.samples)

    def rss_at(when: float) -> float:
        return min(sampler.samples, key=lambda s: abs(s[0] - when))[1]

    first, last = rss_at(finished[0]), rss_at(finished[-1])
    whole = [t["end"] - t["start"] for t in trials]
    other = sorted(t["end"] - t["start"] - t["training"] for t in trials)
    mib = 1024 ** 2
    print(f"trials: {len(trials)} ({sum(t['status'] == 'FINISHED' for t in trials)} FINISHED); sweep wall {wall:.0f} s "
          f"= {wall / len(trials):.2f} s per trial with two at a time")
    print(f"driver (`forgetray run`, Ray Tune's controller) resident memory: peak {peak / mib:.0f} MiB; "
          f"{first / mib:.0f} MiB when the first trial ended, {last / mib:.0f} MiB when the last did "
          f"({(last - first) / mib / max(len(trials) - 1, 1) * 1024:.0f} KiB per trial between)")
    print(f"per trial (run start -> end): median {statistics.median(whole):.1f} s, of which arithmetic "
          f"(train/epoch_seconds) median {statistics.median(t['training'] for t in trials):.2f} s; orchestration "
          f"median {statistics.median(other):.1f} s (range {other[0]:.1f} .. {other[-1]:.1f})")
    for name, a, b in (("start -> base model probed", "start", "base"), ("base -> epoch 1 probed", "base", "sft"),
                       ("epoch 1 probed -> run end", "sft", "end")):
        parts = sorted(t[b] - t[a] for t in trials)
        print(f"  {name}: median {statistics.median(parts):.1f} s (range {parts[0]:.1f} .. {parts[-1]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
