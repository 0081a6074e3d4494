"""The one worker function: Ray Train runs `phase_worker` once per DeepSpeed rank, and it runs the phases of the
trial's plan (`forgetray.plan`) that it was given, in turn, on the DeepSpeed engine.

The worker starts once (rank, device, logging); each phase then loads its starting weights, its data, builds its
engine and runs its recipe: `run_prior` here, `forgetray.train.ift.run_ift`, `forgetray.train.restore.run_restore`.
Every report to Ray Train carries `kind` ("base" | "step" | "epoch" | "prior" | "continual" | "restore_step" |
"restored") and the step fields the metric registry names (`epoch`, `global_step`, `restore_step`, `phase_epoch`,
`ft_step`).

Prior phases hand their weights on in memory; the IFT phase starts from the result, saved once in the trial folder
(`ift_start/`) so a restarted run does not train the prior phases again.

With prior phases, the model is also probed (knowledge only) before the first and after each of them: the
continual-learning matrix a[t][b] for t = 0..k (METHODS.md §9), reported as kind "continual" at `ft_step` t. A
report reaches MLflow asynchronously (Ray Train queues it on the worker), so the probes are also written to the trial
folder (`continual_probes.json`) before `ift_start/` is, and a run that skips the prior phases reports them again
from there; the MLflow callback skips the steps a run already has, so they are neither lost nor logged twice.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from forgetray import probes
from forgetray.data import rehearsal
from forgetray.data.instruct import tokenize_dataset
from forgetray.methods import wiseft
from forgetray.metrics import registry
from forgetray.models import load_model, load_tokenizer
from forgetray.plan import Phase
from forgetray.spec import TrialConfig
from forgetray.train.checkpoints import save_model_dir
from forgetray.train.deepspeed_config import deepspeed_config
from forgetray.train.engine import build_engine, steps_per_epoch, train_epoch, worker_device, zero3_scope

# Test hook: if this names a file that does not exist yet, the worker creates it and fails once after the given
# epoch's checkpoint ("path:epoch"). Lets tests exercise restart-from-checkpoint without mocking Ray.
FAIL_ONCE_ENV = "FORGETRAY_FAIL_ONCE"
IFT_START = "ift_start"  # the trial folder's model after the prior phases (the IFT phase's start)
CONTINUAL_PROBES = "continual_probes.json"  # the trial folder's a[t][b], t = 0..k (written before IFT_START)


@dataclass
class Worker:
    """What every phase of this rank needs: the trial, its resolved sources and folders, rank and device."""

    trial: TrialConfig
    resolved: dict
    dirs: dict  # trial_dir, base_eval_dir, base_em_dir, restoring_dir (plain paths from the trial driver)
    rank: int
    world: int
    device: torch.device

    def engine_config(self, phase: Phase) -> dict:
        return deepspeed_config(phase, self.trial.zero_stage, self.trial.precision)

    def load(self, source: dict, phase: Phase):
        """(model, ZeRO-3 scope) of a resolved model source: under ZeRO-3 the weights are partitioned at load time
        while the scope lives, and it must outlive the engine, so the caller keeps it."""
        scope = zero3_scope(self.engine_config(phase)) if self.trial.zero_stage == 3 else None
        return load_model(source, self.trial.precision), scope

    def source(self, key: str) -> dict:
        """A resolved source by the plan's key ("dataset", "prior_datasets/<i>")."""
        name, _, index = key.partition("/")
        return self.resolved[name][int(index)] if index else self.resolved[name]

    def instructions(self, key: str, tokenizer) -> list[dict]:
        """Tokenized instruction data as plain lists of ids (the epoch loop indexes them thousands of times)."""
        source = self.source(key)
        data = tokenize_dataset(source, tokenizer, self.trial.max_length).to_list()
        if len(data) < self.trial.batch_size:
            raise ValueError(f"dataset {source['name']!r}: only {len(data)} examples keep response tokens within "
                             f"max_length={self.trial.max_length}, fewer than batch_size={self.trial.batch_size}")
        return data

    def training_set(self, phase: Phase, tokenizer) -> list[dict]:
        """The phase's instruction examples plus, with rehearsal, a replayed sample of the previous phase's."""
        own = self.instructions(phase.data.source, tokenizer)
        if not phase.data.rehearse:
            return own
        previous = self.instructions(phase.data.rehearse, tokenizer)
        return rehearsal.mix(own, previous, phase.methods.rehearsal_ratio, seed=self.trial.seed)


def phase_worker(config: dict) -> None:
    """Ray Train's per-rank function. `config` = {"trial", "resolved", "phases": [Phase dicts], **dirs}."""
    from forgetray.train.ift import run_ift
    from forgetray.train.restore import run_restore

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    worker = Worker(TrialConfig.from_dict(config["trial"]), config["resolved"],
                    {k: config.get(k) for k in ("trial_dir", "base_eval_dir", "base_em_dir", "restoring_dir")},
                    dist.get_rank(), dist.get_world_size(), worker_device())
    phases = [Phase.from_dict(p) for p in config["phases"]]
    priors = [p for p in phases if p.kind == "prior"]
    start_dir = Path(worker.dirs["trial_dir"]) / IFT_START
    if priors:
        if (start_dir / "config.json").is_file():  # a restarted run does not train the prior phases again
            report_saved_probes(worker)
        else:
            run_priors(worker, priors, start_dir)
    for phase in phases:
        if phase.kind == "prior":
            continue
        elif phase.kind == "ift":
            start = {"name": "IFT start", "path": str(start_dir)} if start_dir.is_dir() else worker.resolved["model"]
            run_ift(worker, phase, start)
        else:
            run_restore(worker, phase)


def run_priors(worker: Worker, priors: list[Phase], start_dir: Path) -> None:
    """Train the prior phases in turn (each hands its model to the next), probing the knowledge benchmarks before
    the first and after each one (fine-tuning steps t = 0..k); save the probes, then the result as `start_dir`."""
    from forgetray.train.evaluate import ProbeSuite

    tokenizer = load_tokenizer(worker.resolved["model"])
    suite = ProbeSuite.load(worker.resolved, worker.trial)
    model, _ = worker.load(worker.resolved["model"], priors[0])  # prior phases refuse ZeRO-3 (spec): no scope
    # Probed before the engine exists, so the model goes to the worker's device first (the engine would move it).
    matrix = [probe_step(worker, model.to(worker.device), tokenizer, suite, 0)]
    for t, phase in enumerate(priors, start=1):
        model = run_prior(worker, phase, model)
        matrix.append(probe_step(worker, model, tokenizer, suite, t))
    if worker.rank == 0:
        # Complete or absent, and before IFT_START: a run that finds IFT_START finds every probe here.
        trial_dir = Path(worker.dirs["trial_dir"])
        with tempfile.NamedTemporaryFile("w", dir=trial_dir, prefix=f".{CONTINUAL_PROBES}-", delete=False) as f:
            json.dump({"knowledge": matrix}, f, indent=1, sort_keys=True)
        Path(f.name).rename(trial_dir / CONTINUAL_PROBES)
    save_model_dir(model, tokenizer, start_dir, worker.rank, worker.world)


def probe_step(worker: Worker, model, tokenizer, suite, t: int) -> dict:
    """a[t][b] for every benchmark (its primary score; knowledge only: no perplexity or EM), reported as
    `continual/<bench>/knowledge` at fine-tuning step t. Every rank probes its shard; rank 0 returns the values."""
    import ray.train

    from forgetray.train.evaluate import evaluate

    found, _ = evaluate(model, tokenizer, suite, worker.device, state="base", knowledge_only=True)
    values = {registry.CONTINUAL_KNOWLEDGE.name(bench=bench): found[registry.KNOWLEDGE.name(state="base", bench=bench)]
              for bench in suite.benchmarks if worker.rank == 0}
    ray.train.report(continual_report(t, values))
    return values


def report_saved_probes(worker: Worker) -> None:
    """Report the probes `run_priors` saved again (a restarted run: the MLflow callback skips steps already logged,
    and logs any whose first report was lost with the failed run)."""
    import ray.train

    path = Path(worker.dirs["trial_dir"]) / CONTINUAL_PROBES
    if not path.is_file():  # a trial folder from before the continual metrics: its prior models are gone
        logging.getLogger(__name__).warning("%s is missing: the continual metrics of steps 0..k are not reported",
                                            path)
        return
    for t, values in enumerate(json.loads(path.read_text())["knowledge"]):
        ray.train.report(continual_report(t, values if worker.rank == 0 else {}))


def continual_report(t: int, values: dict) -> dict:
    # epoch 0: the continual probes come before the IFT phase's first epoch, like the prior phases' reports.
    return {"kind": "continual", "epoch": 0, "ft_step": t, **values}


def run_prior(worker: Worker, phase: Phase, model=None):
    """Fine-tune on a prior phase's data (its own optimizer and schedule) and return the model it leaves (Wise-FT-
    mixed with its start if the phase sets wiseft_alpha < 1). The first prior phase starts from the base model."""
    import ray.train

    torch.manual_seed(worker.trial.seed)  # every phase starts from the trial's seed
    tokenizer = load_tokenizer(worker.resolved["model"])
    if model is None:
        model, _ = worker.load(worker.resolved["model"], phase)  # prior phases refuse ZeRO-3 (spec): no scope
    data = worker.training_set(phase, tokenizer)
    theta0 = start_weights(model) if phase.methods.wiseft_alpha < 1 else None
    engine, _ = build_engine(model, phase, worker.engine_config(phase),
                             total_steps=steps_per_epoch(len(data), phase) * phase.epochs)
    k = int(phase.name.split("_")[1])
    for epoch in range(1, phase.epochs + 1):
        stats = train_epoch(engine, data, phase, epoch, worker.trial.seed, worker.rank, worker.world,
                            probes.padding_id(tokenizer), worker.device)
        ray.train.report({"kind": "prior", "epoch": 0, "phase_epoch": epoch,
                          registry.PRIOR_LOSS.name(k=k): stats["loss"]})
    module = engine.module
    if theta0 is not None:
        module.load_state_dict(wiseft.interpolate_state_dicts(theta0, start_weights(module),
                                                              phase.methods.wiseft_alpha))
    engine.destroy()
    return module


def start_weights(model) -> dict:
    """theta_0 for Wise-FT: a CPU copy of the weights the phase starts from."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def maybe_fail_once(epoch: int) -> None:
    spec = os.environ.get(FAIL_ONCE_ENV)
    if not spec:
        return
    marker, _, at_epoch = spec.rpartition(":")
    if int(at_epoch) == epoch and not Path(marker).exists():
        Path(marker).write_text(f"failed once after epoch {epoch}\n")
        raise RuntimeError(f"{FAIL_ONCE_ENV}: injected failure after epoch {epoch}")
