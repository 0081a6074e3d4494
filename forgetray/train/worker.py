"""The one worker function: Ray Train runs `phase_worker` once per DeepSpeed rank, and it runs the phases of the
trial's plan (`forgetray.plan`) that it was given, in turn, on the DeepSpeed engine.

The worker starts once (rank, device, logging); each phase then loads its starting weights, its data, builds its
engine and runs its recipe: `run_prior` here, `forgetray.train.ift.run_ift`, `forgetray.train.restore.run_restore`.
Every report to Ray Train carries `kind` ("base" | "step" | "epoch" | "prior" | "restore_step" | "restored") and the
step fields the metric registry names (`epoch`, `global_step`, `restore_step`, `phase_epoch`).

Prior phases hand their weights on in memory; the IFT phase starts from the result, saved once in the trial folder
(`ift_start/`) so a restarted run does not train the prior phases again.
"""

from __future__ import annotations

import logging
import os
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
    last_prior = next((p.name for p in reversed(phases) if p.kind == "prior"), None)
    start_dir = Path(worker.dirs["trial_dir"]) / IFT_START
    prior_done = (start_dir / "config.json").is_file()  # a restarted run does not train the prior phases again
    model = None  # the weights a prior phase hands to the next
    for phase in phases:
        if phase.kind == "prior":
            if not prior_done:
                model = run_prior(worker, phase, model)
                if phase.name == last_prior:
                    save_model_dir(model, load_tokenizer(worker.resolved["model"]), start_dir, worker.rank,
                                   worker.world)
        elif phase.kind == "ift":
            start = {"name": "IFT start", "path": str(start_dir)} if start_dir.is_dir() else worker.resolved["model"]
            run_ift(worker, phase, start)
        else:
            run_restore(worker, phase)


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
