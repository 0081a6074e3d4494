"""The one worker function: Ray Train runs `phase_worker` once per DeepSpeed rank, and it runs the phases of the
trial's plan (`forgetray.plan`) that it was given, in turn, on the DeepSpeed engine.

The worker starts once (rank, device, logging); each phase then loads its starting weights, its data, builds its
engine and runs its recipe: `run_prior` here, `forgetray.train.ift.run_ift`, `forgetray.train.restore.run_restore`.
One Ray Train run may serve several trials in turn (a grid point's replicates: `forgetray.sharing.cohorts`), its
*members*: each report says whose it is (`member`), and each member's checkpoints go to its own folder of the run.
Every report to Ray Train carries `kind` ("base" | "iv" | "iv_probe" | "step" | "epoch" | "prior" | "continual" |
"restore_step" | "restored") and the step fields the metric registry names (`epoch`, `global_step`, `restore_step`, `phase_epoch`,
`ft_step`).

Prior phases hand their weights on in memory and run in a Ray Train run of their own, once per sweep for all the
trials that share them (`forgetray.trial` holds a file lock meanwhile): their result, the IFT phase's start, is
saved in the sweep's shared folder `start/<key>/` (`keys.prior_start_key`), complete or absent.

With prior phases, the model is also probed (knowledge only) before the first and after each of them: the
continual-learning matrix a[t][b] for t = 0..k (docs/methods.md §9). Those probes and the prior phases' per-epoch losses
are saved in the start folder (`continual_probes.json`, `prior_losses.json`), and every IFT run that starts from it
reports them into its own trial run (kinds "continual" at `ft_step` t and "prior" at `phase_epoch`); the MLflow
callback skips the steps a run already has, so a restarted run neither loses nor logs them twice.
"""

from __future__ import annotations

import json
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
from forgetray.train import lora
from forgetray.train.checkpoints import save_model_dir
from forgetray.train.deepspeed_config import deepspeed_config
from forgetray.train.engine import build_engine, steps_per_epoch, train_epoch, worker_device, zero3_scope

# Test hook: if this names a file that does not exist yet, the worker creates it and fails once after the given
# epoch's checkpoint ("path:epoch", or "path:epoch:seed" for the trial of that seed only). Lets tests exercise
# restart-from-checkpoint without mocking Ray.
FAIL_ONCE_ENV = "FORGETRAY_FAIL_ONCE"
IFT_START = "ift_start"  # in a trial folder: a link to the shared start it trained from (prior phases only)
CONTINUAL_PROBES = "continual_probes.json"  # in a start folder: a[t][b], t = 0..k
PRIOR_LOSSES = "prior_losses.json"  # in a start folder: each prior phase's mean loss per epoch


@dataclass
class Worker:
    """What every phase of this rank needs: the trial, its resolved sources and folders, rank and device."""

    trial: TrialConfig
    resolved: dict
    dirs: dict  # DIRS: the trial's folder and the sweep's shared ones (plain paths)
    rank: int
    world: int
    device: torch.device
    # The checkpoint this Ray Train run resumes from (None on a first start), taken once when the worker starts:
    # later in the run `ray.train.get_checkpoint()` may return a checkpoint this run just reported, possibly before
    # rank 0's files are on storage, and a phase must not mistake its own group's progress for a resume point.
    resume: object = None
    control_reported: bool = False  # R_0's report goes into the trial's run once per Ray Train run
    member: int = 0  # which trial of the Ray Train run this is (its reports carry it)
    prefix: str = ""  # its checkpoints' folder in the run ("<trial key>/" when the run serves several trials)

    def report(self, metrics: dict, checkpoint=None, name: str | None = None) -> None:
        """`ray.train.report` of this member: the report says whose it is, its checkpoint goes to its folder."""
        import ray.train

        ray.train.report({**metrics, "member": self.member}, checkpoint=checkpoint,
                         checkpoint_dir_name=None if name is None else self.prefix + name)

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
    """Ray Train's per-rank function. `config` = {"members": [{"trial", "resolved", "phases": [Phase dicts],
    "prefix", **dirs}]}: the trials this run serves, in turn. A restarted run resumes the member its last
    checkpoint belongs to (the ones before it are finished) and starts the ones after it afresh."""
    from forgetray.train.checkpoints import checkpoint_member
    from forgetray.train.ift import run_ift
    from forgetray.train.restore import run_restore

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # Subnormal floats (activation and gradient tails of a training model) run on a slow microcode path on x86
    # CPUs: flushing them to zero made the organism's IFT epochs 2-3x faster with the same losses (bench/README.md).
    torch.set_flush_denormal(True)
    import ray.train

    resume = ray.train.get_checkpoint()
    resumed = checkpoint_member(resume) if resume is not None else 0
    rank, world, device = dist.get_rank(), dist.get_world_size(), worker_device()
    for m, member in enumerate(config["members"]):
        if m < resumed:
            continue  # finished before the restart
        worker = Worker(TrialConfig.from_dict(member["trial"]), member["resolved"],
                        {k: member.get(k) for k in DIRS}, rank, world, device,
                        resume=resume if m == resumed else None, member=m, prefix=member.get("prefix", ""))
        run_phases(worker, [Phase.from_dict(p) for p in member["phases"]], run_ift, run_restore)


def run_phases(worker: Worker, phases: list[Phase], run_ift, run_restore) -> None:
    """One member's phases in turn: its prior phases (their own Ray Train run, while the start is absent), or its
    IFT phase and the restorations that follow it in these workers."""
    priors = [p for p in phases if p.kind == "prior"]
    if priors:
        run_priors(worker, priors, Path(worker.dirs["start_dir"]))
        return
    for phase in phases:
        if phase.kind == "ift":
            start = worker.resolved["model"]
            if worker.trial.prior_phases:
                start = {"name": "IFT start", "path": worker.dirs["start_dir"]}
                report_saved_probes(worker)
            run_ift(worker, phase, start)
        else:
            run_restore(worker, phase)


DIRS = ("trial_dir", "start_dir", "base_eval_dir", "base_em_dir", "restoring_dir", "control_dir", "iv_dir",
        "iv_probe_dir")


def run_priors(worker: Worker, priors: list[Phase], start_dir: Path) -> None:
    """Train the prior phases in turn (each hands its model to the next), probing the knowledge benchmarks before
    the first and after each one (fine-tuning steps t = 0..k); save the result with the probes and the losses in a
    partial folder, then rename it to `start_dir` (the driver removed any partial one a killed run left)."""
    import shutil

    from forgetray.train.evaluate import ProbeSuite

    if start_dir.is_dir():  # a restarted run whose first try got as far as the rename
        return
    tokenizer = load_tokenizer(worker.resolved["model"])
    suite = ProbeSuite.load(worker.resolved, worker.trial)
    model, _ = worker.load(worker.resolved["model"], priors[0])  # prior phases refuse ZeRO-3 (spec): no scope
    # Probed before the engine exists, so the model goes to the worker's device first (the engine would move it).
    matrix = [probe_step(worker, model.to(worker.device), tokenizer, suite, 0)]
    losses: dict[str, list[float]] = {}
    for t, phase in enumerate(priors, start=1):
        model, losses[phase.name] = run_prior(worker, phase, model)
        matrix.append(probe_step(worker, model, tokenizer, suite, t))
    partial = partial_start(start_dir)
    if worker.rank == 0:  # left by a try of this run that failed before the rename
        shutil.rmtree(partial, ignore_errors=True)
    save_model_dir(model, tokenizer, partial, worker.rank, worker.world)
    if worker.rank == 0:
        (partial / CONTINUAL_PROBES).write_text(json.dumps({"knowledge": matrix}, indent=1, sort_keys=True))
        (partial / PRIOR_LOSSES).write_text(json.dumps(losses, indent=1, sort_keys=True))
        partial.rename(start_dir)  # complete or absent: the trials waiting on the lock find all of it
    if worker.world > 1:
        dist.barrier()


def partial_start(start_dir: Path) -> Path:
    return start_dir.parent / f".{start_dir.name}.partial"


def probe_step(worker: Worker, model, tokenizer, suite, t: int) -> dict:
    """a[t][b] for every benchmark (its primary score; knowledge only: no perplexity or EM), reported as
    `continual/<bench>/knowledge` at fine-tuning step t. Every rank probes its shard; rank 0 returns the values."""
    from forgetray.train.evaluate import evaluate

    found, _ = evaluate(model, tokenizer, suite, worker.device, state="base", knowledge_only=True)
    values = {registry.CONTINUAL_KNOWLEDGE.name(bench=bench): found[registry.KNOWLEDGE.name(state="base", bench=bench)]
              for bench in suite.benchmarks if worker.rank == 0}
    worker.report(continual_report(t, values))
    return values


def report_saved_probes(worker: Worker) -> None:
    """Report the continual probes and the prior phases' losses saved in the start folder into this trial's run
    (every trial sharing the start has them; the MLflow callback skips the steps a run already has)."""
    start = Path(worker.dirs["start_dir"])
    for t, values in enumerate(json.loads((start / CONTINUAL_PROBES).read_text())["knowledge"]):
        worker.report(continual_report(t, values if worker.rank == 0 else {}))
    for name, losses in json.loads((start / PRIOR_LOSSES).read_text()).items():
        k = int(name.split("_")[1])
        for epoch, loss in enumerate(losses, start=1):
            worker.report({"kind": "prior", "epoch": 0, "phase_epoch": epoch,
                              **({registry.PRIOR_LOSS.name(k=k): loss} if worker.rank == 0 else {})})


def continual_report(t: int, values: dict) -> dict:
    # epoch 0: the continual probes come before the IFT phase's first epoch, like the prior phases' reports.
    return {"kind": "continual", "epoch": 0, "ft_step": t, **values}


def run_prior(worker: Worker, phase: Phase, model=None):
    """Fine-tune on a prior phase's data (its own optimizer and schedule; all weights or LoRA adapters); return the
    plain model it leaves (the adapters merged; Wise-FT-mixed with its start if the phase sets wiseft_alpha < 1)
    and its mean loss per epoch. The first prior phase starts
    from the base model."""
    torch.manual_seed(worker.trial.seed)  # every phase starts from the trial's seed
    tokenizer = load_tokenizer(worker.resolved["model"])
    if model is None:
        model, _ = worker.load(worker.resolved["model"], phase)  # prior phases refuse ZeRO-3 (spec): no scope
    data = worker.training_set(phase, tokenizer)
    theta0 = start_weights(model) if phase.methods.wiseft_alpha < 1 else None
    model = lora.wrap(model, phase.lora)  # LoRA phases train adapters on the frozen model
    engine, _ = build_engine(model, phase, worker.engine_config(phase),
                             total_steps=steps_per_epoch(len(data), phase) * phase.epochs)
    losses = []
    for epoch in range(1, phase.epochs + 1):
        stats = train_epoch(engine, data, phase, epoch, worker.trial.seed, worker.rank, worker.world,
                            probes.padding_id(tokenizer), worker.device)
        losses.append(stats["loss"])  # reported from the start folder by every trial sharing it
    module = lora.merge_and_unload(engine.module)  # the next phase starts from the plain (merged) model
    if theta0 is not None:
        module.load_state_dict(wiseft.interpolate_state_dicts(theta0, start_weights(module),
                                                              phase.methods.wiseft_alpha))
    engine.destroy()
    return module, losses


def start_weights(model) -> dict:
    """theta_0 for Wise-FT: a CPU copy of the weights the phase starts from."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def maybe_fail_once(epoch: int, seed: int) -> None:
    spec = os.environ.get(FAIL_ONCE_ENV)
    if not spec:
        return
    marker, at_epoch, *at_seed = spec.rsplit(":", 2) if spec.count(":") >= 2 else spec.rsplit(":", 1)
    if int(at_epoch) == epoch and (not at_seed or int(at_seed[0]) == seed) and not Path(marker).exists():
        Path(marker).write_text(f"failed once after epoch {epoch}\n")
        raise RuntimeError(f"{FAIL_ONCE_ENV}: injected failure after epoch {epoch}")
