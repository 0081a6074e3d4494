"""The IFT phase's recipe, top to bottom: load the start model and the data; with the untouched start model,
evaluate it and select the restoring set (each once per sweep, cached and shared across trials); then for each
epoch train, probe, and report a checkpoint SFT_e (DeepSpeed state for resuming + a plain Hugging Face model +
per-question probe results; README "Checkpoints and storage" says which checkpoints keep the DeepSpeed state). If
Ray Train restarts the workers after a failure, the run resumes from its last checkpoint (`RankContext.resume`) and
the loop continues after its epoch.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from forgetray import flatness, probes
from forgetray.data.instruct import collate
from forgetray.data.passages import load_passage_set
from forgetray.data.restoring import build_restoring_set, score_pool, text_key
from forgetray.methods import wiseft
from forgetray.metrics import registry
from forgetray.models import load_tokenizer
from forgetray.plan import Phase, checkpoint_name
from forgetray.train import iv_guided, iv_probe, lora
from forgetray.train.checkpoints import checkpoint_epoch, computed_once, report_checkpoint
from forgetray.train.context import RankContext, maybe_fail_once, start_weights
from forgetray.train.engine import build_engine, steps_per_epoch, train_epoch
from forgetray.train.evaluate import ProbeSuite, evaluate, format_metrics, memorization


def run_ift(ctx: RankContext, phase: Phase, start: dict) -> None:
    trial, rank, world, device = ctx.trial, ctx.rank, ctx.world, ctx.device
    checkpoint = ctx.resume
    if checkpoint is not None and (checkpoint_epoch(checkpoint, "restored")
                                   or checkpoint_epoch(checkpoint, "epoch") >= phase.epochs):
        return  # finished (a re-run of the group): its DeepSpeed state may be gone (delete_finished_state)
    torch.manual_seed(trial.seed)
    tokenizer = load_tokenizer(ctx.resolved["model"])
    model, _scope = ctx.load(start, phase)  # noqa: F841 (the ZeRO-3 scope is kept alive on purpose)
    data = ctx.training_set(phase, tokenizer)  # with rehearsal: the phase's own plus the replayed examples
    own = ctx.instructions(phase.data.source, tokenizer)
    theta0 = start_weights(model) if phase.methods.wiseft_alpha < 1 else None  # the plain model's keys
    # IV guidance's reference with full fine-tuning: a frozen copy of the start (LoRA: the adapters disabled)
    reference = iv_guided.frozen_reference(model, device) if phase.iv.on and not phase.lora.rank else None
    model = lora.wrap(model, phase.lora)  # LoRA (lora_rank > 0): adapters train, the start's weights stay frozen
    steps = steps_per_epoch(len(data), phase)
    suite = ProbeSuite.load(ctx.resolved, trial, ctx.dirs)
    em_examples = own[: trial.em_examples] if trial.em_examples else own
    flatness_batch = _flatness_batch(suite, tokenizer, trial, device) if trial.flatness_grid else None
    engine, scheduler = build_engine(model, phase, ctx.engine_config(phase), total_steps=steps * phase.epochs)

    guide = None
    if phase.iv.on:  # the vector of the phase's start: once per sweep (keys.iv_key), before any resume
        computed_once(ctx.dirs["iv_dir"], rank, lambda out: _extract_iv(engine, tokenizer, phase, ctx, out))
        found = iv_guided.load(ctx.dirs["iv_dir"])
        guide = iv_guided.make_guide(phase.iv, found, reference, steps * phase.epochs, device)

    if suite.iv_probe is not None:  # the dynamics probe's base vector, once per sweep (keys.iv_probe_key)
        with lora.adapter_disabled(engine.module) as module:  # LoRA: exactly the start
            computed_once(ctx.dirs["iv_probe_dir"], rank, lambda out: iv_probe.extract_base(
                suite.iv_probe, module, tokenizer, device, rank, world, out))

    if checkpoint is None:
        # The engine before its first step is the phase's starting model (under ZeRO-3 only the engine can run it).
        base = computed_once(ctx.dirs["base_eval_dir"], rank,
                             lambda out: _evaluate_base(engine, tokenizer, suite, device, out, rank))
        base.update(computed_once(ctx.dirs["base_em_dir"], rank,
                                  lambda out: _base_memorization(engine, tokenizer, em_examples, suite, device, out,
                                                                 rank)))
        if ctx.resolved.get("restore_pool"):
            computed_once(ctx.dirs["restoring_dir"], rank,
                          lambda out: _select_restoring_set(engine, tokenizer, own, ctx, out))
        ctx.report({"kind": "base", "epoch": 0, "global_step": 0, **base, **format_metrics(base)})
        if guide is not None:  # its numbers, and its files as the run's iv/ artifacts (trial.py)
            ctx.report({"kind": "iv", "epoch": 0, **(iv_guided.report_metrics(found) if rank == 0 else {})})
        if suite.iv_probe is not None:  # the dynamics probe's base vector as the run's iv_probe/ artifacts
            ctx.report({"kind": "iv_probe", "epoch": 0})
        start_epoch = 0
    else:
        with checkpoint.as_directory() as ckpt_dir:
            # a LoRA phase's state holds the adapters only: the frozen weights are the start's, loaded above
            engine.load_checkpoint(str(Path(ckpt_dir) / "deepspeed"), tag="state",
                                   load_module_strict=not lora.is_lora(engine.module))
        start_epoch = checkpoint_epoch(checkpoint)

    early = _early_steps(steps, trial.early_checkpoints)
    series: list[dict] = []  # the early points travel with epoch 1's report (registry.SERIES)

    def probe_early(step: int) -> None:  # fine-grained probes inside epoch 1 (format alignment happens early)
        if step in early:
            found, _ = evaluate(engine, tokenizer, suite, device, state="sft", knowledge_only=True)
            series.append({"kind": "step", "epoch": 1, "global_step": step, **format_metrics(found)})

    for epoch in range(start_epoch + 1, phase.epochs + 1):
        t0 = time.perf_counter()
        stats = train_epoch(engine, data, phase, epoch, trial.seed, rank, world, probes.padding_id(tokenizer), device,
                            after_step=probe_early if epoch == 1 and early else None, guide=guide)
        seconds = time.perf_counter() - t0
        # The checkpoint SFT_e that is probed (and restored) is the Wise-FT mix when alpha < 1; training goes on
        # from the trained weights, which the DeepSpeed state keeps.
        surface = None
        with wiseft_weights(engine.module, theta0, phase.methods.wiseft_alpha) as model_state:
            found, frames = evaluate(engine, tokenizer, suite, device, state="sft", ift_examples=em_examples)
            if flatness_batch is not None and rank == 0:
                surface, flat = _flatness(engine.module, flatness_batch, trial)
                found.update(flat)
        metrics = {
            "kind": "epoch", "epoch": epoch, "global_step": epoch * steps,
            registry.TRAIN_LOSS.name(): stats["loss"],
            registry.TRAIN_TOKENS.name(): stats["tokens"],
            registry.TRAIN_EXAMPLES.name(): len(data),
            registry.TRAIN_TOKENS_PER_S.name(): stats["tokens"] / seconds,
            registry.TRAIN_EPOCH_SECONDS.name(): seconds,
            registry.TRAIN_LR.name(): scheduler.get_last_lr()[0],
            **{registry.TRAIN_IV.name(key=k): v for k, v in stats.get("iv", {}).items()},
            **found, **format_metrics(found), registry.SERIES: series if epoch == 1 else [],
        }
        # DeepSpeed state for resuming; the last epoch's is never resumed from, so it is kept only on request
        report_checkpoint(engine, tokenizer, metrics, frames, ctx, checkpoint_name(phase, epoch),
                          model_state=model_state, surface=surface,
                          save_state=epoch < phase.epochs or not trial.delete_finished_state)
        if rank == 0:
            maybe_fail_once(epoch, trial.seed)
    engine.destroy()  # free the optimizer state before the restorations that may follow in these workers


@contextlib.contextmanager
def wiseft_weights(module, theta0: dict | None, alpha: float):
    """Inside the block the module holds (1-alpha)*theta0 + alpha*theta_trained (yields that state dict, for the
    checkpoint's Hugging Face model); afterwards exactly the trained weights again. No-op without theta0.
    A LoRA module holds the mix of theta0 and the merged model in its base weights, its adapters disabled."""
    if theta0 is None:
        yield None
        return
    if lora.is_lora(module):
        frozen = lora.base_weights(module)
        merged = lora.merged_state_dict(module)
        mixed = wiseft.interpolate_state_dicts({k: v.to(merged[k].device) for k, v in theta0.items()}, merged, alpha)
        with lora.adapter_disabled(module):
            lora.load_base_weights(module, mixed)
            try:
                yield mixed
            finally:
                lora.load_base_weights(module, frozen)
        return
    trained = {k: v.detach().clone() for k, v in module.state_dict().items()}
    mixed = wiseft.interpolate_state_dicts({k: v.to(trained[k].device) for k, v in theta0.items()}, trained, alpha)
    module.load_state_dict(mixed)
    try:
        yield mixed
    finally:
        module.load_state_dict(trained)


def _extract_iv(engine, tokenizer, phase: Phase, ctx: RankContext, out: Path) -> None:
    """Heads and vector of the IV task on the phase's start (the engine before its first step; a LoRA module with
    its adapters disabled, exactly the start), sharded over the ranks; rank 0 writes them."""
    task = iv_guided.load_task(ctx.resolved["iv_task"])
    with lora.adapter_disabled(engine.module) as module:
        found = iv_guided.extract(module, tokenizer, task, phase.iv, ctx.resolved["bos"], ctx.trial.max_length,
                                  ctx.trial.probe_batch_size, ctx.trial.seed, ctx.device, ctx.rank,
                                  ctx.world)
    if ctx.rank == 0:
        iv_guided.save(found, out)


def _flatness_batch(suite: ProbeSuite, tokenizer, trial, device) -> dict:
    """The fixed held-out batch of the loss surface: the first `flatness_batch` probing passages, [BOS] + tokens,
    loss on every token (the same batch for every model of a sweep)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    examples = []
    for ids in probes.encode(tokenizer, suite.passages[: trial.flatness_batch]):
        ids = (bos + ids)[: trial.probe_max_length]
        examples.append({"input_ids": ids, "labels": ids})
    return {k: v.to(device) for k, v in collate(examples, probes.padding_id(tokenizer)).items()}


def _flatness(module, batch: dict, trial) -> tuple:
    """The loss surface around the checkpoint and its SC / AG / MAG / flatness degree (docs/methods.md §7). Rank 0 only:
    ZeRO 0-2 keep the full weights on every rank."""
    surface, h = flatness.loss_surface(module, lambda m: m(**batch).loss, steps=trial.flatness_grid, seed=trial.seed)
    return (surface, h), {registry.FLATNESS.name(state="sft", key=k): v
                          for k, v in flatness.surface_metrics(surface, h).items()}


def _evaluate_base(engine, tokenizer, suite, device, out: Path, rank: int) -> None:
    """The start model's probes: depend on the model and the probe suite only (shared by every trial of them)."""
    metrics, frames = evaluate(engine, tokenizer, suite, device, state="base")
    if rank == 0:
        for bench, frame in frames.items():
            frame.to_parquet(out / f"{bench}.parquet")
        (out / "summary.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))


def _base_memorization(engine, tokenizer, em_examples, suite, device, out: Path, rank: int) -> None:
    """The start model's exact memorization of this trial's IFT data (depends on the data, unlike the probes)."""
    engine.eval()
    with torch.no_grad():
        em = memorization(engine, em_examples, probes.padding_id(tokenizer), suite.batch_size, device)
    engine.train()
    if rank == 0:
        (out / "summary.json").write_text(json.dumps({registry.EM.name(state="base"): em}, indent=1))


def _select_restoring_set(engine, tokenizer, data, ctx: RankContext, out: Path) -> None:
    """Rank the restoring pool by base-model perplexity (each rank scores its share of the stream) and keep the
    lowest-perplexity passages worth one IFT epoch of tokens (docs/methods.md §2). The passages the trial probes (the
    first `probe_passages` of the probing set, and no more: it may be an endless stream) are never selected."""
    trial, resolved, rank, world, device = ctx.trial, ctx.resolved, ctx.rank, ctx.world, ctx.device
    probe_texts = excluded_passages(resolved, trial)
    exclude = frozenset(text_key(t) for t in probe_texts)
    options = probes.ProbeOptions(batch_size=trial.probe_batch_size, max_length=trial.probe_max_length, device=device)
    engine.eval()
    with torch.no_grad():
        def score(texts):
            return probes.passage_nlls(engine, tokenizer, texts, options)

        batches = score_pool(score, resolved["restore_pool"]["path"], out / f"scores-{rank}.parquet",
                             batch_size=trial.probe_batch_size, shard=(rank, world), exclude=exclude,
                             count_tokens=lambda texts: [len(ids) for ids in probes.encode(tokenizer, texts)])
        if world > 1:  # ZeRO-3: every rank must make the same number of forward calls
            most = torch.tensor([batches])
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            for _ in range(int(most) - batches):
                score([probe_texts[0]] * trial.probe_batch_size)
    engine.train()
    if world > 1:
        dist.barrier()  # every rank's scores are written
    if rank == 0:
        budget = sum(len(example["input_ids"]) for example in data)
        summary = build_restoring_set(resolved["restore_pool"]["path"], sorted(out.glob("scores-*.parquet")),
                                      budget, tokenizer, out / "dataset")
        (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))


def excluded_passages(resolved: dict, trial) -> list[str]:
    """The probing passages the restoring set must not contain: exactly those the probes score."""
    return load_passage_set(resolved["probe_set"], limit=trial.probe_passages)


def _early_steps(steps_per_epoch: int, count: int) -> set[int]:
    """`count` evenly spaced optimizer steps strictly inside epoch 1."""
    return {round(i * steps_per_epoch / (count + 1)) for i in range(1, count + 1)} - {0, steps_per_epoch}
