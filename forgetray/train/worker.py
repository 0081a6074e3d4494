"""The one worker function: Ray Train runs `phase_worker` once per DeepSpeed rank, and it runs the phases of the
trial's plan (`forgetray.plan`) that it was given, in turn, on the DeepSpeed engine.

The worker starts once (rank, device, logging); each phase then loads its starting weights, its data, builds its
engine and runs its recipe: `run_prior` here, `forgetray.train.ift.run_ift`, `forgetray.train.restore.run_restore`,
each given the member's `RankContext` (`forgetray.train.context`).
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
from pathlib import Path

import torch
import torch.distributed as dist

from forgetray import probes
from forgetray import storage as store
from forgetray.methods import wiseft
from forgetray.metrics import registry
from forgetray.models import load_tokenizer
from forgetray.plan import Phase
from forgetray.spec import TrialConfig
from forgetray.train import lora
from forgetray.train.checkpoints import checkpoint_state, report_resumed, save_model_dir
from forgetray.train.context import FAIL_ONCE_ENV, RankContext, start_weights  # noqa: F401 (the tests' hook name)
from forgetray.train.engine import build_engine, install_step_hook, steps_per_epoch, train_epoch, worker_device
from forgetray.train.ift import run_ift
from forgetray.train.restore import run_restore

IFT_START = "ift_start"  # in a trial folder: a link to the shared start it trained from (prior phases only)
CONTINUAL_PROBES = "continual_probes.json"  # in a start folder: a[t][b], t = 0..k
PRIOR_LOSSES = "prior_losses.json"  # in a start folder: each prior phase's mean loss per epoch


def phase_worker(config: dict) -> None:
    """Ray Train's per-rank function. `config` = {"members": [{"trial", "resolved", "phases": [Phase dicts],
    "prefix", **dirs}]}: the trials this run serves, in turn. A restarted run resumes the member its last
    checkpoint belongs to (the ones before it are finished) and starts the ones after it afresh."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # Subnormal floats (activation and gradient tails of a training model) run on a slow microcode path on x86
    # CPUs: flushing them to zero made the organism's IFT epochs 2-3x faster with the same losses (bench/README.md).
    torch.set_flush_denormal(True)
    install_step_hook()  # a test hook, from the environment (tests/test_faults.py), or none
    import ray.train

    resume = ray.train.get_checkpoint()
    state = checkpoint_state(resume) if resume is not None else {}
    resumed = int(state.get("member", 0))
    rank, world, device = dist.get_rank(), dist.get_world_size(), worker_device()
    for m, member in enumerate(config["members"]):
        if m < resumed:
            continue  # finished before the restart
        ctx = RankContext(TrialConfig.from_dict(member["trial"]), member["resolved"],
                          {k: member.get(k) for k in DIRS}, rank, world, device,
                          resume=resume if m == resumed else None, member=m, prefix=member.get("prefix", ""))
        if ctx.resume is not None:
            report_resumed(ctx, resume, state["metrics"])  # they may not have reached MLflow before the stop
        run_phases(ctx, [Phase.from_dict(p) for p in member["phases"]])


def run_phases(ctx: RankContext, phases: list[Phase]) -> None:
    """One member's phases in turn: its prior phases (their own Ray Train run, while the start is absent), or its
    IFT phase and the restorations that follow it in these workers."""
    priors = [p for p in phases if p.kind == "prior"]
    if priors:
        run_priors(ctx, priors, ctx.dirs["start_dir"])
        return
    for phase in phases:
        if phase.kind == "ift":
            start = ctx.resolved["model"]
            if ctx.trial.prior_phases:
                start = {"name": "IFT start", "path": str(store.fetch(ctx.dirs["start_dir"]))}
                report_saved_probes(ctx)
            run_ift(ctx, phase, start)
        else:
            run_restore(ctx, phase)


DIRS = ("trial_dir", "start_dir", "base_eval_dir", "base_em_dir", "restoring_dir", "control_dir", "iv_dir",
        "iv_probe_dir")


def run_priors(ctx: RankContext, priors: list[Phase], start_dir) -> None:
    """Train the prior phases in turn (each hands its model to the next), probing the knowledge benchmarks before
    the first and after each one (fine-tuning steps t = 0..k); save the result with the probes and the losses in a
    partial folder, then rename it to `start_dir` (the driver removed any partial one a killed run left). On object
    storage (`start_dir` the claim's data folder, `starts._ensure_start_remote`): a temporary folder, uploaded whole."""
    import shutil
    import tempfile

    from forgetray.train.evaluate import ProbeSuite

    remote = store.is_remote(start_dir)
    start_dir = start_dir if remote else Path(start_dir)  # folders cross the process boundary as strings
    if store.complete(start_dir):  # a restarted run whose first try got as far as the rename (the upload)
        return
    tokenizer = load_tokenizer(ctx.resolved["model"])
    suite = ProbeSuite.load(ctx.resolved, ctx.trial)
    model, _ = ctx.load(ctx.resolved["model"], priors[0])  # prior phases refuse ZeRO-3 (spec): no scope
    # Probed before the engine exists, so the model goes to the worker's device first (the engine would move it).
    matrix = [probe_step(ctx, model.to(ctx.device), tokenizer, suite, 0)]
    losses: dict[str, list[float]] = {}
    for t, phase in enumerate(priors, start=1):
        model, losses[phase.name] = run_prior(ctx, phase, model)
        matrix.append(probe_step(ctx, model, tokenizer, suite, t))
    partial = Path(tempfile.mkdtemp(prefix="forgetray-start-")) / "start" if remote else partial_start(start_dir)
    if ctx.rank == 0:  # left by a try of this run that failed before the rename
        shutil.rmtree(partial, ignore_errors=True)
    save_model_dir(model, tokenizer, partial, ctx.rank, ctx.world)
    if ctx.rank == 0:
        (partial / CONTINUAL_PROBES).write_text(json.dumps({"knowledge": matrix}, indent=1, sort_keys=True))
        (partial / PRIOR_LOSSES).write_text(json.dumps(losses, indent=1, sort_keys=True))
        if remote:
            store.put_dir(partial, start_dir)
        else:
            partial.rename(start_dir)  # complete or absent: the trials waiting on the lock find all of it
    if remote:
        shutil.rmtree(partial.parent, ignore_errors=True)
    if ctx.world > 1:
        dist.barrier()


def partial_start(start_dir: Path) -> Path:
    return start_dir.parent / f".{start_dir.name}.partial"


def probe_step(ctx: RankContext, model, tokenizer, suite, t: int) -> dict:
    """a[t][b] for every benchmark (its primary score; knowledge only: no perplexity or EM), reported as
    `continual/<bench>/knowledge` at fine-tuning step t. Every rank probes its shard; rank 0 returns the values."""
    from forgetray.train.evaluate import evaluate

    found, _ = evaluate(model, tokenizer, suite, ctx.device, state="base", knowledge_only=True)
    values = {registry.CONTINUAL_KNOWLEDGE.name(bench=bench): found[registry.KNOWLEDGE.name(state="base", bench=bench)]
              for bench in suite.benchmarks if ctx.rank == 0}
    ctx.report(continual_report(t, values))
    return values


def report_saved_probes(ctx: RankContext) -> None:
    """Report the continual probes and the prior phases' losses saved in the start folder into this trial's run
    (every trial sharing the start has them; the MLflow callback skips the steps a run already has)."""
    start = store.fetch(ctx.dirs["start_dir"])
    for t, values in enumerate(json.loads((start / CONTINUAL_PROBES).read_text())["knowledge"]):
        ctx.report(continual_report(t, values if ctx.rank == 0 else {}))
    for name, losses in json.loads((start / PRIOR_LOSSES).read_text()).items():
        k = int(name.split("_")[1])
        for epoch, loss in enumerate(losses, start=1):
            ctx.report({"kind": "prior", "epoch": 0, "phase_epoch": epoch,
                        **({registry.PRIOR_LOSS.name(k=k): loss} if ctx.rank == 0 else {})})


def continual_report(t: int, values: dict) -> dict:
    # epoch 0: the continual probes come before the IFT phase's first epoch, like the prior phases' reports.
    return {"kind": "continual", "epoch": 0, "ft_step": t, **values}


def run_prior(ctx: RankContext, phase: Phase, model=None):
    """Fine-tune on a prior phase's data (its own optimizer and schedule; all weights or LoRA adapters); return the
    plain model it leaves (the adapters merged; Wise-FT-mixed with its start if the phase sets wiseft_alpha < 1)
    and its mean loss per epoch. The first prior phase starts
    from the base model."""
    torch.manual_seed(ctx.trial.seed)  # every phase starts from the trial's seed
    tokenizer = load_tokenizer(ctx.resolved["model"])
    if model is None:
        model, _ = ctx.load(ctx.resolved["model"], phase)  # prior phases refuse ZeRO-3 (spec): no scope
    data = ctx.training_set(phase, tokenizer)
    theta0 = start_weights(model) if phase.methods.wiseft_alpha < 1 else None
    model = lora.wrap(model, phase.lora)  # LoRA phases train adapters on the frozen model
    engine, _ = build_engine(model, phase, ctx.engine_config(phase),
                             total_steps=steps_per_epoch(len(data), phase) * phase.epochs)
    losses = []
    for epoch in range(1, phase.epochs + 1):
        stats = train_epoch(engine, data, phase, epoch, ctx.trial.seed, ctx.rank, ctx.world,
                            probes.padding_id(tokenizer), ctx.device)
        losses.append(stats["loss"])  # reported from the start folder by every trial sharing it
    module = lora.merge_and_unload(engine.module)  # the next phase starts from the plain (merged) model
    if theta0 is not None:
        module.load_state_dict(wiseft.interpolate_state_dicts(theta0, start_weights(module),
                                                              phase.methods.wiseft_alpha))
    engine.destroy()
    return module, losses
