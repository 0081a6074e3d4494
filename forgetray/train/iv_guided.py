"""IV-guided training as the IFT phase's option (issue 12 item 4; `forgetray.plan.IVGuided`): the orchestration
around the pure maths of `forgetray.iv` -- the task's prompts tokenised and batched, the clean-prompt filter, the
extraction sharded over the workers, the reference model, and the training step.

Extraction (once per sweep per `keys.iv_key`, in the phase's workers at its start, from the phase's starting model):
`iv_prompts` clean n-shot prompts, of which those the model answers correctly (greedy first answer token, Todd et al.)
give the mean head activations; `iv_corrupted` corrupted prompts (`iv_corruption`; labels shuffled by default) give
each head's causal indirect effect; the top `iv_heads` heads make the vector. Each rank takes every world-th prompt
and the sums are all-reduced, so the result does not depend on the number of workers beyond float summation order.
Saved as `vector.pt` (vector, heads, CIE, mean activations, counts) with a `summary.json`; logged as the trial's `iv/`
artifacts.

The step (`iv_step`, in place of the plain step): per micro-batch, a no-grad reference forward with
degree x vector injected at `iv_layer` at the last prompt token (from the labels), then the model's forward and
`iv.iv_guided_loss`, whose total is back-propagated. The reference is the phase's starting model: with LoRA the same
module with its adapters disabled (no copy), with full fine-tuning a frozen copy of the starting weights kept on the
worker's device (one more model's parameters in the training dtype; ZeRO 0-2 keep full weights on every rank, and
ZeRO-3 is refused at validation).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from forgetray import iv
from forgetray.plan import IVGuided
from forgetray.probes.tokens import encode_pairs, pad_right
from forgetray.train import lora

VECTOR_FILE = "vector.pt"
# What a step logs per epoch (registry.TRAIN_IV): raw quantities and the terms as counted, and the degree.
TERMS = ("ce", "kl_first", "kl_all", "mse", "kl_first_term", "kl_all_term", "mse_term")


def load_task(resolved_task: dict) -> iv.Task:
    """The task a trial's resolved `iv_task` names (resources.resolve_iv_task)."""
    if resolved_task["kind"] == "builtin":
        from forgetray.iv.builtin import builtin_task

        return builtin_task(resolved_task["name"], resolved_task["path"])
    return iv.load_task(resolved_task["path"])


def encode_prompts(tokenizer, prompts: list[iv.Prompt], bos: str, max_length: int) -> list[tuple[list[int], int]]:
    """(prompt ids, first answer token) per prompt, tokenised as the probes score a continuation (lm-eval's
    `_encode_pair`: the answer's tokens are those of encode(prompt + answer) after the prompt's), the prompt cut from
    the left to max_length (its end, the query, is what the vector is read at)."""
    contexts, answers = encode_pairs(tokenizer, [p.text for p in prompts], [[p.answer] for p in prompts], bos)
    out = []
    for prompt, ids, (answer,) in zip(prompts, contexts, answers):
        if not answer:
            raise ValueError(f"iv_task: the answer {prompt.answer!r} has no token of its own")
        out.append((ids[-max_length:], answer[0]))
    return out


def batches(encoded: list[tuple[list[int], int]], batch_size: int, pad_id: int, device) -> list[dict]:
    """Right-padded batches with the read position (each prompt's last token) and the first answer token."""
    out = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        ids, mask = pad_right([c[0] for c in chunk], pad_id)
        out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device),
                    "positions": torch.tensor([len(c[0]) - 1 for c in chunk], device=device),
                    "answer_ids": torch.tensor([c[1] for c in chunk], device=device)})
    return out


def _all_sum(x: Tensor, device) -> Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.to(device)
        dist.all_reduce(x)
    return x.cpu()


@torch.no_grad()
def extract(model: nn.Module, tokenizer, task: iv.Task, settings: IVGuided, bos: str, max_length: int,
            batch_size: int, seed: int, device, rank: int = 0, world: int = 1, require_clean: bool = True) -> dict:
    """Heads and vector of `task` on `model` (every rank calls it; each takes its share of the prompts).
    `settings`: anything with `prompts`, `corrupted`, `corruption` and `heads` (IVGuided, or the dynamics probe's
    settings).
    A model that answers no clean prompt correctly has no vector: an error, or with `require_clean=False` the
    counts with vector None and no heads (the dynamics probe of a checkpoint that lost the task)."""
    from forgetray.probes import padding_id

    layout = iv.head_layout(model)
    pad = padding_id(tokenizer)
    clean = iv.n_shot_prompts(task, settings.prompts, seed)
    corrupted = iv.n_shot_prompts(task, settings.corrupted, seed + 1, corruption=settings.corruption)
    was_training = model.training
    model.eval()
    try:
        mine = batches(encode_prompts(tokenizer, clean[rank::world], bos, max_length), batch_size, pad, device)
        for batch in mine:
            batch["keep"] = iv.answered_correctly(model, batch)
        kept = sum(int(b["keep"].sum()) for b in mine)
        total = torch.zeros(layout.n_layers, layout.n_heads, layout.head_dim, dtype=torch.float64)
        if kept:  # mean x count = this rank's sum (mean_head_activations refuses an all-empty input)
            total += iv.mean_head_activations(model, [b for b in mine if b["keep"].any()]).double().cpu() * kept
        counts = _all_sum(torch.tensor([float(kept), float(len(clean[rank::world]))], dtype=torch.float64), device)
        total = _all_sum(total, device)
        if counts[0] == 0 and not require_clean:
            return {"vector": None, "heads": [], "scores": [], "cie": None, "mean_activations": None,
                    "clean_prompts": int(counts[1]), "clean_correct": 0, "corrupted_prompts": len(corrupted),
                    "task": task.name}
        if counts[0] == 0:
            raise ValueError(f"iv_task {task.name!r}: the starting model answers none of the {len(clean)} clean "
                             "prompts correctly, so there are no activations to average (Todd et al.'s filter)")
        mean = (total / counts[0]).float()
        theirs = corrupted[rank::world]
        cie = torch.zeros(layout.n_layers, layout.n_heads, dtype=torch.float64)
        if theirs:
            corrupt = batches(encode_prompts(tokenizer, theirs, bos, max_length), batch_size, pad, device)
            cie += iv.causal_indirect_effect(model, corrupt, mean.to(device)) * len(theirs)
        cie = _all_sum(cie, device) / len(corrupted)
        heads = iv.top_heads(cie, settings.heads)
        vector = iv.instruction_vector(model, mean.to(device), heads).float().cpu()
    finally:
        model.train(was_training)
    return {"vector": vector, "heads": [(l, h) for l, h, _ in heads], "scores": [s for _, _, s in heads],
            "cie": cie.float(), "mean_activations": mean, "clean_prompts": int(counts[1]),
            "clean_correct": int(counts[0]), "corrupted_prompts": len(corrupted), "task": task.name}


def save(found: dict, out: Path) -> None:
    torch.save(found, out / VECTOR_FILE)
    summary = {k: found[k] for k in ("heads", "scores", "clean_prompts", "clean_correct", "corrupted_prompts",
                                     "task")}
    summary["vector_norm"] = float(found["vector"].norm())
    (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))


def load(cache_dir: str | Path) -> dict:
    return torch.load(Path(cache_dir) / VECTOR_FILE, map_location="cpu", weights_only=False)


def report_metrics(found: dict) -> dict:
    """The extraction's numbers as registry.IV_EXTRACTION metrics (logged at epoch 0)."""
    from forgetray.metrics import registry

    values = {"clean_prompts": found["clean_prompts"], "clean_correct": found["clean_correct"],
              "corrupted_prompts": found["corrupted_prompts"], "top_cie": found["scores"][0],
              "vector_norm": float(found["vector"].norm())}
    return {registry.IV_EXTRACTION.name(key=k): float(v) for k, v in values.items()}


@dataclass
class Guide:
    """What the IV-guided step needs: the vector and where it goes, the loss weights, the heads (for the MSE term),
    the reference (None: the training module itself with its LoRA adapters disabled) and the schedule."""

    settings: IVGuided
    vector: Tensor
    heads: list[tuple[int, int]]
    reference: nn.Module | None
    total_steps: int

    @property
    def weights(self) -> iv.IVLossWeights:
        s = self.settings
        return iv.IVLossWeights(w_first=s.kl_first, w_all=s.kl_all, temperature=s.temperature,
                                thr=s.kl_first_threshold, w_mse=s.mse, thr_mse=s.mse_threshold,
                                thr_all=s.kl_all_threshold)

    def degree(self, step: int) -> float:
        """The vector's degree at optimizer step `step` (0-based: progress = step / total_steps)."""
        s = self.settings
        if not s.progressive:
            return s.degree
        return s.degree * iv.degree(step, self.total_steps, s.progressive_start, s.progressive_end)


def frozen_reference(model: nn.Module, device) -> nn.Module:
    """Full fine-tuning's reference: a frozen copy of the phase's starting model (before the engine exists), on the
    worker's device. Costs one more model's parameters in the training dtype (no gradients, no optimizer state)."""
    reference = copy.deepcopy(model).to(device).eval()
    reference.requires_grad_(False)
    return reference


def make_guide(settings: IVGuided, found: dict, reference: nn.Module | None, total_steps: int, device) -> Guide:
    return Guide(settings, found["vector"].to(device), [tuple(h) for h in found["heads"]], reference, total_steps)


@torch.no_grad()
def reference_pass(guide: Guide, module: nn.Module, batch: dict, positions: Tensor, degree: float
                   ) -> tuple[Tensor, Tensor | None]:
    """(reference logits with degree x vector injected, the reference's top-head slices without it or None).

    As the released trainer, the heads' reference is the model without the vector: heads at or before `layer`
    read the same in the injected pass (the vector enters after their o_proj input), so only heads after it cost a
    second forward."""
    model = guide.reference if guide.reference is not None else module
    disabled = lora.adapter_disabled(model) if guide.reference is None else contextlib.nullcontext()
    s = guide.settings
    want_heads = s.mse > 0
    late = want_heads and any(layer > s.layer for layer, _ in guide.heads)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with disabled:
        record = iv.record_heads(model, positions, guide.heads) if want_heads and not late else contextlib.nullcontext()
        with record as rec, iv.inject_vector(model, guide.vector, s.layer, positions, degree, s.site):
            logits = model(**inputs).logits
        ref_heads = rec.stack() if rec is not None else None
        if late:
            with iv.record_heads(model, positions, guide.heads) as rec:
                model(**inputs)
            ref_heads = rec.stack()
    return logits, ref_heads


def iv_step(engine, micro_batches: list[dict], guide: Guide, step: int) -> tuple[list[Tensor], list[dict]]:
    """One optimizer step of IV-guided training over the rank's micro-batches (gradient accumulation as DeepSpeed
    does it). Returns each micro-batch's total loss and its terms (detached)."""
    degree = guide.degree(step)
    weights = guide.weights
    losses, terms = [], []
    for batch in micro_batches:
        positions = iv.last_prompt_positions(batch["labels"])
        ref_logits, ref_heads = reference_pass(guide, engine.module, batch, positions, degree)
        record = iv.record_heads(engine.module, positions, guide.heads) if weights.w_mse > 0 \
            else contextlib.nullcontext()
        with record as rec:
            out = engine(**batch)
        found = iv.iv_guided_loss(out.loss, out.logits, ref_logits, positions, weights,
                                  heads=rec.stack() if rec is not None else None, ref_heads=ref_heads)
        engine.backward(found["loss"])
        engine.step()
        losses.append(found["loss"].detach().float())
        terms.append({k: found[k].detach().float() for k in TERMS})
    return losses, [{**t, "degree": torch.tensor(degree)} for t in terms]


def epoch_terms(terms: list[dict], world: int, mse_on: bool) -> dict[str, float]:
    """Per-epoch means of the terms over this rank's micro-batches, averaged over the ranks. The raw MSE is left
    out when its weight is 0: the heads are not recorded then, and a logged 0 would read as a perfect match."""
    keys = [k for k in TERMS + ("degree",) if mse_on or k != "mse"]
    means = torch.tensor([float(torch.stack([t[k] for t in terms]).mean()) for k in keys], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(means)
        means /= world
    out = dict(zip(keys, means.tolist()))
    if not all(math.isfinite(v) for v in out.values()):
        raise FloatingPointError(f"non-finite IV-guided loss term: {out}")
    return out
