"""The Ray callbacks: how what the workers report reaches MLflow and the console.

- `make_report_logger`: a Ray Train `UserCallback` (it runs in the Train controller) that logs every report of a
  trial's workers to its MLflow run as it arrives, each metric at the step the registry declares;
- `make_progress`: a Ray Tune `Callback` that prints one line per epoch and per finished trial.

Ray is imported when a callback is made, never at import time.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path

from forgetray import storage
from forgetray.metrics import registry
from forgetray.tracking import Tracker

# A report's fields, not metrics: its kind, whose it is (the member of its Ray Train run) and the step fields the
# registry declares (a new step meaning needs none).
REPORT_KEYS = ("kind", "member", *(field for field, _ in registry.STEPS.values()))


def make_report_logger(tracking_uri: str, runs: dict[int, tuple[str, dict]]):
    """Log every report to its trial's run: metrics at their declared step (`registry.step_of`; an undeclared
    metric raises), and per-question probe results as Parquet artifacts.

    `runs` maps a report's `member` (the trials one Ray Train run serves in turn) to (its MLflow run id, its
    `artifact_dirs`: report kind -> (local dir or None for the checkpoint's probes/, artifact path with
    `{epoch:03d}`)). Steps a re-attached run already has are not logged twice.

    A tracking store that is down or locked is waited for (`tracking.retrying`: backoff up to
    $FORGETRAY_TRACKING_RETRY_S, default 600 s) while the report is held here, so no metric is lost; past the bound
    the callback raises `TrackingUnavailable` and the trial fails with that error."""
    from ray.train import UserCallback

    class MlflowReportLogger(UserCallback):
        def __init__(self):
            self._tracker = None
            self._seen: dict[tuple[str, str], set[int]] = {}

        def _logged(self, run_id: str, name: str) -> set[int]:
            if (run_id, name) not in self._seen:  # retried while MLflow is down
                self._seen[run_id, name] = self._tracker.logged_steps(run_id, name)
            return self._seen[run_id, name]

        def after_report(self, run_context, metrics, checkpoint):
            report = metrics[0]  # rank 0 holds the gathered probe results
            run_id, artifact_dirs = runs[int(report.get("member", 0))]
            if self._tracker is None:
                self._tracker = Tracker(tracking_uri)
            # One batch for the whole report (its trajectory points and every step): a driver killed while
            # logging it leaves all of it or none, never a checkpoint with some of its metrics.
            found = [p for point in report.get(registry.SERIES, []) for p in self._new_points(run_id, point)]
            found += self._new_points(run_id, report)
            points = list({(name, step): (name, value, step) for name, value, step in reversed(found)}.values())
            self._tracker.log_points(run_id, points)  # the first of any (name, step) given twice
            for name, _, step in points:
                self._seen[run_id, name].add(step)
            self._log_artifacts(run_id, artifact_dirs, report, checkpoint)

        def _new_points(self, run_id: str, report: dict) -> list[tuple[str, float, int]]:
            points = []
            for name, value in report.items():
                if name in REPORT_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                step = registry.step_of(name, report)
                if step not in self._logged(run_id, name):
                    points.append((name, value, step))
            return points

        def _log_artifacts(self, run_id: str, artifact_dirs: dict, report: dict, checkpoint) -> None:
            local, artifact_path = artifact_dirs.get(report.get("kind"), (None, None))
            if artifact_path is None:
                return
            artifact_path = artifact_path.format(epoch=int(report["epoch"]))
            if local is not None and storage.published(local) is not None:  # a shared result (on this node)
                self._tracker.log_artifacts(run_id, storage.fetch(local), artifact_path)
                return
            if checkpoint is None and report.get(registry.RESUMED_FROM):  # the resume point, reported again
                checkpoint = _checkpoint_at(report[registry.RESUMED_FROM])
            if checkpoint is not None:
                with _probes_of(checkpoint) as probes:
                    if probes is not None:
                        self._tracker.log_artifacts(run_id, probes, artifact_path)

    return MlflowReportLogger()


def _checkpoint_at(location: str):
    import ray.train

    path, filesystem = storage.ray_storage(location)
    return ray.train.Checkpoint(path, filesystem=filesystem)


@contextlib.contextmanager
def _probes_of(checkpoint):
    """A reported checkpoint's `probes/` as a local folder (None if it has none): on object storage that folder
    alone is downloaded, into a temporary one, not the model."""
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        probes = Path(checkpoint.path) / "probes"
        yield probes if probes.is_dir() else None
        return
    source = f"{checkpoint.path}/probes"
    if checkpoint.filesystem.get_file_info(source).type == pafs.FileType.NotFound:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="forgetray-probes-") as tmp:
        pafs.copy_files(source, tmp, source_filesystem=checkpoint.filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)


def make_progress(names: list[str], epochs: list[int], benchmarks: list[str], verbose: bool,
                  followers: dict[int, list[int]] | None = None, cohorts: dict[int, list[int]] | None = None):
    """One console line per epoch, restoration and finished trial: trials done / total and what each is doing.
    `names`, `epochs`, `benchmarks` (the primary benchmark's metric name) are per trial index; the total counts
    every grid point. A Tune trial runs the trials of its cohort in turn (`cohorts`: its trial index -> theirs;
    a report's `member` says whose it is), and a trajectory's shorter grid points (`followers` of a trial) are done
    with it, "from trajectory <its name>"."""
    followers, cohorts = followers or {}, cohorts or {}
    from ray.tune import Callback

    def say(text: str, error: bool = False) -> None:
        if verbose or error:
            print(text, file=sys.stderr if error else sys.stdout, flush=True)

    def members(trial) -> list[int]:
        index = trial.config["trial_index"]
        return cohorts.get(index, [index])

    class Progress(Callback):
        def __init__(self):
            self.done = 0
            self.start = time.time()

        def _prefix(self) -> str:
            return f"[{self.done}/{len(names)} trials done, {time.time() - self.start:5.0f}s]"

        def on_trial_result(self, iteration, trials, trial, result, **info):
            i = members(trial)[int(result.get("member", 0))]
            kind, epoch, bench, nan = result.get("kind"), int(result.get("epoch", -1)), benchmarks[i], float("nan")

            def get(metric: registry.Metric, **fields) -> float:
                return result.get(metric.name(**fields), nan)

            if kind == "base":
                line = (f"base model evaluated: knowledge {get(registry.KNOWLEDGE, state='base', bench=bench):.3f}, "
                        f"probe ppl {get(registry.PROBE_PPL, state='base'):.2f}")
            elif kind == "epoch":
                line = (f"epoch {epoch}/{epochs[i]}: loss {get(registry.TRAIN_LOSS):.3f}, "
                        f"knowledge {get(registry.KNOWLEDGE, state='sft', bench=bench):.3f}, "
                        f"probe ppl {get(registry.PROBE_PPL, state='sft'):.2f}, "
                        f"{result.get(registry.TRAIN_TOKENS_PER_S.name(), 0):.0f} tok/s")
            elif kind == "control":
                line = (f"control R_0 (the start restored): knowledge "
                        f"{get(registry.KNOWLEDGE, state='control', bench=bench):.3f}, "
                        f"probe ppl {get(registry.PROBE_PPL, state='control'):.2f}")
            elif kind == "restored":
                line = (f"epoch {epoch} restored: knowledge "
                        f"{get(registry.KNOWLEDGE, state='restored', bench=bench):.3f}, "
                        f"probe ppl {get(registry.PROBE_PPL, state='restored'):.2f}")
            else:  # fine-grained steps, prior phases, restoring trajectories: MLflow has them; the console stays short
                return
            again = " (resumed from this checkpoint)" if result.get(registry.RESUMED_FROM) else ""
            say(f"{self._prefix()} {names[i]}: {line}{again}")

        def on_trial_start(self, iteration, trials, trial, **info):
            group = members(trial)
            then = f"; then {len(group) - 1} more in these workers" if len(group) > 1 else ""
            say(f"{self._prefix()} {names[group[0]]}: starting (Ray Train workers, DeepSpeed engine, base-model "
                f"probes{then})")

        def on_trial_complete(self, iteration, trials, trial, **info):
            for i in members(trial):
                self.done += 1
                say(f"{self._prefix()} {names[i]}: finished")
                for f in followers.get(i, []):
                    self.done += 1
                    say(f"{self._prefix()} {names[f]}: finished (from trajectory {names[i]})")

        def on_trial_error(self, iteration, trials, trial, **info):
            group = members(trial)
            shorter = sum(len(followers.get(i, [])) for i in group)
            self.done += len(group) + shorter
            who = names[group[0]] if len(group) == 1 else f"{names[group[0]]} and {len(group) - 1} more in its workers"
            say(f"{self._prefix()} {who}: FAILED (the failed trials are listed at the end)"
                + (f"; with {shorter} grid point(s) from their trajectories" if shorter else ""))

    return Progress()
