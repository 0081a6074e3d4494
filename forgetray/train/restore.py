"""The restoration phase's recipe (docs/methods.md §2): continue training an IFT checkpoint SFT_e on plain text close to
the pre-training distribution, one epoch over the restoring set, causal-LM loss on every token, sequences packed
to a fixed length, with restoration's own optimizer (`forgetray.plan.restore_phase`). The result R_e gets the same
probes as SFT_e. Along the way the probing perplexity is measured at evenly spaced steps (the paper's Figure 3a).
Before the first R_e, the control R_0: the IFT phase's start through the same recipe (`ensure_control`), the
reference of the residual and of the precondition (restored = R_e's probing PPL within the tolerance of R_0's).

A Ray Train run may restore several checkpoints in turn (a group); a restarted run skips the ones it finished.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from forgetray import probes
from forgetray.metrics import registry
from forgetray.models import load_tokenizer
from forgetray.plan import Phase, checkpoint_name
from forgetray.train.checkpoints import checkpoint_epoch, computed_once, read_state, report_checkpoint
from forgetray.train.context import RankContext
from forgetray.train.engine import build_engine, steps_per_epoch, train_epoch
from forgetray.train.evaluate import ProbeSuite, evaluate, probing_perplexity


# An extra pass (restore_max_passes > 1) checks the probing PPL this many times and stops once it is within the
# target: the first pass is PS's full epoch; a whole extra pass overshot R_0's PPL by 4-7% in the quickstart (R_e
# 2.23-2.29 after two passes against R_0 2.38-2.42 after its one), which the two-sided precondition calls not restored.
EXTRA_PASS_CHECKS = 8


def pack(passages: list[list[int]], eos_id: int, seq_len: int) -> list[dict]:
    """Concatenate passages (each followed by EOS) and cut the stream into sequences of `seq_len` tokens; the last
    one may be shorter. Labels are the inputs: the loss is on every token."""
    stream: list[int] = []
    for ids in passages:
        stream.extend(ids)
        stream.append(eos_id)
    return [{"input_ids": stream[i:i + seq_len], "labels": stream[i:i + seq_len]}
            for i in range(0, len(stream), seq_len)]


def sft_model_dir(trial_dir: str | Path, epoch: int) -> Path:
    """Where the IFT phase's checkpoint SFT_epoch keeps its Hugging Face model."""
    return Path(trial_dir) / "ift" / f"epoch_{epoch:03d}" / "model"


def run_restore(ctx: RankContext, phase: Phase) -> None:
    """Restore SFT_e (e = `phase.restores_epoch`) into R_e, unless a restarted run of this group already did; the
    control R_0 first (once per sweep for every trial with the same start and recipe: `ensure_control`)."""
    import datasets

    checkpoint = ctx.resume
    if checkpoint is not None and checkpoint_epoch(checkpoint, "restored") >= phase.restores_epoch:
        return
    trial, rank, epoch = ctx.trial, ctx.rank, phase.restores_epoch
    restoring = datasets.load_from_disk(str(Path(ctx.dirs["restoring_dir"]) / "dataset"))
    suite = ProbeSuite.load(ctx.resolved, trial, ctx.dirs)
    control_ppl = ensure_control(ctx, phase, restoring, suite)
    source = {"name": f"sft-epoch-{epoch}", "path": str(sft_model_dir(ctx.dirs["trial_dir"], epoch))}
    tokenizer = load_tokenizer(source)
    ift = ctx.instructions("dataset", tokenizer)
    em_examples = ift[: trial.em_examples] if trial.em_examples else ift
    trajectory = registry.RESTORE_TRAJECTORY.name(epoch=epoch)
    # Its ends are measured anyway: step 0 is SFT_e (probed when it was made), the last step R_e (probed below).
    series = [_point(epoch, 0, trajectory, _sft_probe_ppl(ctx.dirs["trial_dir"], epoch))]
    # Restored means within the tolerance of R_0's probing PPL: restore again while above it.
    engine, stats, passes, _scope = _restore(ctx, phase, source, restoring, suite,  # noqa: F841 (ZeRO-3 scope)
                                             limit=control_ppl * (1 + trial.ppl_tolerance), series=series)
    found, frames = evaluate(engine, tokenizer, suite, ctx.device, state="restored", ift_examples=em_examples)
    if rank == 0:
        series.append(_point(epoch, stats["steps"], trajectory, found[registry.PROBE_PPL.name(state="restored")]))
    # the trajectory travels with R_e's report (callbacks.SERIES): one report per restoration
    metrics = {"kind": "restored", "epoch": epoch, registry.RESTORE_LOSS.name(): stats["loss"],
               registry.RESTORE_TOKENS.name(): stats["tokens"], registry.RESTORE_STEPS.name(): stats["steps"],
               registry.RESTORE_PASSES.name(): passes,
               **found, registry.SERIES: series if rank == 0 else []}
    # R_e is probed and nothing resumes from its DeepSpeed state: written only with delete_finished_state=False
    report_checkpoint(engine, tokenizer, metrics, frames, ctx, checkpoint_name(phase, epoch),
                      save_state=not trial.delete_finished_state)
    engine.destroy()  # free the optimizer state before the next checkpoint of the group


def ensure_control(ctx: RankContext, phase: Phase, restoring, suite: ProbeSuite) -> float:
    """The control R_0 (docs/methods.md §4): the IFT phase's start put through this restoration recipe, probed like R_e.
    Computed once per sweep under a lock (`checkpoints.computed_once`, `keys.control_key`) into the control folder
    (per-question probes + summary.json), reported into this trial's run once per Ray Train run (kind "control",
    step 0; its probes as the run's probes/control artifacts). Returns R_0's probing PPL on every rank."""
    summary = computed_once(ctx.dirs["control_dir"], ctx.rank,
                            lambda out: _restore_control(ctx, phase, restoring, suite, out))
    ppl = torch.zeros(1, dtype=torch.float64)
    if ctx.rank == 0:
        ppl[0] = summary[registry.PROBE_PPL.name(state="control")]
    if ctx.world > 1:
        dist.broadcast(ppl, 0)
    if not ctx.control_reported:
        ctx.report({"kind": "control", "epoch": 0, **summary})  # every rank reports; rank 0 carries it
        ctx.control_reported = True
    return float(ppl[0])


def _restore_control(ctx: RankContext, phase: Phase, restoring, suite: ProbeSuite, out: Path) -> None:
    """Restore the IFT phase's start with the trial's recipe and probe it as state "control" into `out`. Its passes
    end as R_e's would were it the base: within the tolerance of the base's probing PPL (R_0 starts there)."""
    start = ctx.resolved["model"]
    if ctx.trial.prior_phases:
        start = {"name": "IFT start", "path": ctx.dirs["start_dir"]}
    limit = _base_ppl(ctx) * (1 + ctx.trial.ppl_tolerance)
    engine, stats, passes, _scope = _restore(ctx, phase, start, restoring, suite, limit=limit,  # noqa: F841
                                             series=None)
    tokenizer = load_tokenizer(start)
    found, frames = evaluate(engine, tokenizer, suite, ctx.device, state="control")
    engine.destroy()
    if ctx.rank == 0:
        for bench, frame in frames.items():
            frame.to_parquet(out / f"{bench}.parquet")
        found[registry.CONTROL_PASSES.name()] = passes
        (out / "summary.json").write_text(json.dumps(found, indent=1, sort_keys=True))


def _restore(ctx: RankContext, phase: Phase, source: dict, restoring, suite: ProbeSuite, *, limit: float,
             series: list | None):
    """The restoration recipe on the model at `source`: one pass over the restoring set packed to the phase's
    length, then (restore_max_passes > 1) again while the probing PPL is above `limit`, each pass a fresh one-pass
    restoration (new optimizer and schedule, another data order) of the previous pass's result. With `series`, the
    probing PPL at the trajectory's points and each unfinished pass's end are appended to it (Figure 3a).
    Returns (engine, {"loss", "tokens", "steps"}, passes, ZeRO-3 scope); the caller probes and destroys the engine,
    keeping the scope (None below ZeRO-3) alive until then."""
    trial, rank, world, device = ctx.trial, ctx.rank, ctx.world, ctx.device
    torch.manual_seed(trial.seed)
    tokenizer = load_tokenizer(source)
    model, scope = ctx.load(source, phase)
    chunks = pack(restoring["input_ids"], tokenizer.eos_token_id, phase.data.max_length)
    steps = steps_per_epoch(len(chunks), phase)
    engine, _ = build_engine(model, phase, ctx.engine_config(phase), total_steps=steps)
    points = {round(i * steps / trial.restore_trajectory_points) for i in range(trial.restore_trajectory_points + 1)}
    epoch = phase.restores_epoch
    trajectory = registry.RESTORE_TRAJECTORY.name(epoch=epoch)

    def measure(step: int) -> None:  # probing perplexity along the restoration (Figure 3a)
        if step in points and step not in (0, steps):
            series.append(_point(epoch, step, trajectory, _probing_ppl(engine, tokenizer, suite, device, rank, world)))

    stats = train_epoch(engine, chunks, phase, epoch=1, seed=trial.seed, rank=rank, world=world,
                        pad_id=probes.padding_id(tokenizer), device=device,
                        after_step=measure if series is not None else None)
    passes, total = 1, dict(stats)
    check = max(1, steps // EXTRA_PASS_CHECKS)

    def back(step: int) -> bool:  # an extra pass ends as soon as the pattern is back (else it overshoots R_0)
        return step % check == 0 and step < steps and \
            _probing_ppl(engine, tokenizer, suite, device, rank, world) <= limit

    while passes < trial.restore_max_passes:
        ppl = _probing_ppl(engine, tokenizer, suite, device, rank, world)
        if ppl <= limit:
            break  # the caller's probes measure this point again
        if series is not None:
            series.append(_point(epoch, total["steps"], trajectory, ppl))
        passes += 1
        engine.destroy()
        engine, _ = build_engine(engine.module, phase, ctx.engine_config(phase), total_steps=steps)
        more = train_epoch(engine, chunks, phase, epoch=passes, seed=trial.seed, rank=rank, world=world,
                           pad_id=probes.padding_id(tokenizer), device=device, after_step=back)
        total = {"loss": more["loss"], "tokens": total["tokens"] + more["tokens"],
                 "steps": total["steps"] + more["steps"]}
    return engine, total, passes, scope


def _probing_ppl(engine, tokenizer, suite: ProbeSuite, device, rank: int, world: int) -> float:
    engine.eval()
    with torch.no_grad():
        ppl, _ = probing_perplexity(engine, tokenizer, suite, device, rank, world)
    engine.train()
    return ppl


def _base_ppl(ctx: RankContext) -> float:
    """The start's probing PPL (the base evaluation, computed once per sweep): rank 0 reads it, the others get it."""
    found = torch.zeros(1, dtype=torch.float64)
    if ctx.rank == 0:
        summary = json.loads((Path(ctx.dirs["base_eval_dir"]) / "summary.json").read_text())
        found[0] = summary[registry.PROBE_PPL.name(state="base")]
    if ctx.world > 1:
        dist.broadcast(found, 0)
    return float(found[0])


def _point(epoch: int, step: int, trajectory: str, ppl: float) -> dict:
    return {"kind": "restore_step", "epoch": epoch, "restore_step": step, trajectory: ppl}


def _sft_probe_ppl(trial_dir: str, epoch: int) -> float:
    """SFT_e's probing perplexity, as its checkpoint recorded it (the restoration's step 0)."""
    return read_state(sft_model_dir(trial_dir, epoch).parent)["metrics"][registry.PROBE_PPL.name(state="sft")]
