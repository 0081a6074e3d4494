"""The forward passes behind `scoring.score_prompts`: which tokens run in which call (`plan_groups`), and running
that plan (`run`) with KV caches. Token bookkeeping only; what the results mean is in `scoring`.

Three kinds of work, all right-padded (positions 0, 1, 2, ... of real tokens are unchanged by padding):
- a group's shared tokens: run once, batch of one; its KV cache is expanded to every batch of the group;
- contexts (after the shared tokens), length-sorted batches: the logits at each context's last token score every
  continuation's first token (and give the answer-position summary);
- the remaining tokens of continuations longer than one token, in batches of rows on a copy of their context's
  KV cache (rows of one prompt share it), with explicit position ids because the cache holds the pads of shorter
  contexts (masked out).
Inputs too long for `max_length` skip all of that: one plain row per continuation, cut from the left.

How many rows a call takes (`chunks`): `batch_size` rows, or with `batch_tokens` as many rows as fit in that many
tokens (rows x the longest row, the group's shared tokens counted in every row, since every row attends to them): on
a GPU a fixed row count either wastes the card on short prompts or runs out of memory on long ones.

Only the scored positions go through the LM head (`logits_to_keep`, where the model takes it), and a bf16/fp16
model's head runs in fp32 there (`fp32_head`): the log-softmax then sees fp32 logits, so rounding the logits to bf16
no longer flips near-tied answers (lm-eval takes the log-softmax of bf16 logits).

KV reuse of a prefix is exact because a prompt only reuses the prefix's tokens that are its own first tokens: the
shared length is the common token prefix of the prefix's own tokens and every member's context tokens. A prompt whose
context tokens leave more than `BOUNDARY_SLACK` of the prefix's tokens (the prefix's last tokens may merge with the
query's first characters, e.g. "\\n\\n" + "\\n") runs without reuse, as do prompts alone in their group.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from forgetray import metrics
from forgetray.probes.tokens import pad_right

BOUNDARY_SLACK = 2


@dataclass
class Request:
    """One prompt in tokens: context, continuations, and the prefix (text, own tokens) it may share."""

    ctx: list[int]
    conts: list[list[int]]
    prefix: str = ""
    prefix_ids: list[int] = field(default_factory=list)


@dataclass
class Group:
    shared: list[int]  # run once for the group; empty: no reuse
    batches: list[list[int]]  # request indices of each context batch


@dataclass
class Plan:
    requests: list[Request]
    groups: list[Group]
    long_rows: list[tuple[int, int, list[int]]]  # (request, continuation, input ids) of inputs cut to max_length
    batch_size: int
    n_calls: int
    batch_tokens: int = 0

    def chunks(self, widths: Sequence[int]) -> list[range]:
        """`chunks(widths, self.batch_size, self.batch_tokens)`."""
        return chunks(widths, self.batch_size, self.batch_tokens)


def chunks(widths: Sequence[int], batch_size: int, batch_tokens: int = 0) -> list[range]:
    """Consecutive runs of rows, each one forward call: `batch_size` rows, or with `batch_tokens` > 0 as many as keep
    rows x the widest row <= batch_tokens (at least one row, however wide)."""
    out, start, widest = [], 0, 0
    for i, width in enumerate(widths):
        widest = max(widest, width)
        full = (i - start + 1) * widest > batch_tokens if batch_tokens else i - start == batch_size
        if full and i > start:
            out.append(range(start, i))
            start, widest = i, width
    if start < len(widths):
        out.append(range(start, len(widths)))
    return out


def plan_groups(requests: list[Request], batch_size: int, max_length: int, keep_head: int | None,
                batch_tokens: int = 0) -> Plan:
    """Which tokens run in which forward call; pure, so every rank can count every rank's calls."""
    long_rows, pools = [], {}
    for i, req in enumerate(requests):
        if len(req.ctx) + max(len(c) for c in req.conts) - 1 > max_length:
            long_rows += [(i, k, _cut((req.ctx + c)[:-1], max_length, keep_head)) for k, c in enumerate(req.conts)]
            continue
        common = _common_length(req.prefix_ids, req.ctx)
        reuse = req.prefix_ids and common >= max(1, len(req.prefix_ids) - BOUNDARY_SLACK)
        pools.setdefault(req.prefix if reuse else "", []).append((i, common))
    groups = []
    plain = pools.pop("", [])
    for members in pools.values():
        if len(members) == 1:  # reuse would cost a call and save nothing
            plain += members
            continue
        shared = min(min(common, len(requests[i].ctx) - 1) for i, common in members)
        groups.append(_group(requests, [i for i, _ in members], requests[members[0][0]].ctx[:shared], batch_size,
                             batch_tokens))
    if plain:
        groups.append(_group(requests, [i for i, _ in plain], [], batch_size, batch_tokens))
    plan = Plan(requests, groups, long_rows, batch_size, 0, batch_tokens)
    plan.n_calls = len(plan.chunks([len(row[2]) for row in long_rows]))
    for group in groups:
        plan.n_calls += bool(group.shared) + len(group.batches)
        plan.n_calls += sum(len(plan.chunks(_tail_widths(requests, batch))) for batch in group.batches)
    return plan


def _group(requests, members: list[int], shared: list[int], batch_size: int, batch_tokens: int) -> Group:
    # Longest first (as lm-eval), so that a batch's rows have similar lengths and little padding.
    order = sorted(members, key=lambda i: (-len(requests[i].ctx), i))
    return Group(shared, [order[r.start:r.stop] for r in
                          chunks([len(requests[i].ctx) for i in order], batch_size, batch_tokens)])


def _tail_widths(requests, batch: list[int]) -> list[int]:
    """The width of each `_cont_rows` row of a batch: its context plus the continuation's tokens after the first."""
    return [len(requests[batch[b]].ctx) + len(requests[batch[b]].conts[k]) - 1 for b, k in _cont_rows(requests, batch)]


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _cut(ids: list[int], max_length: int, keep_head: int | None) -> list[int]:
    """The last max_length tokens, keeping a leading `keep_head` token (BOS) when the input starts with it."""
    if len(ids) <= max_length:
        return ids
    head = ids[:1] if keep_head is not None and ids[0] == keep_head else []
    return head + ids[len(ids) - (max_length - len(head)):]


def _cont_rows(requests, batch: list[int]) -> list[tuple[int, int]]:
    """(position in batch, continuation) of the continuations with tokens after their first."""
    return [(b, k) for b, i in enumerate(batch) for k, c in enumerate(requests[i].conts) if len(c) > 1]


def run(model, plan: Plan, pad_id: int, device: Any, answer_sets, n_calls: int) -> list[tuple]:
    """Per request: (log-probs, greedy flags, answer summary or None); then dummy calls up to `n_calls`."""
    with fp32_head(model):
        return _run(model, plan, pad_id, device, answer_sets, n_calls, keeps_logits(model))


def _run(model, plan: Plan, pad_id: int, device: Any, answer_sets, n_calls: int, keep: bool) -> list[tuple]:
    reqs = plan.requests
    logprobs = [[0.0] * len(r.conts) for r in reqs]
    greedy = [[True] * len(r.conts) for r in reqs]
    answers: list[Any] = [None] * len(reqs)
    calls = 0
    for group in plan.groups:
        shared_kv = None
        if group.shared:
            out = model(input_ids=torch.tensor([group.shared], device=device),
                        attention_mask=torch.ones((1, len(group.shared)), dtype=torch.long, device=device),
                        use_cache=True, **({"logits_to_keep": 1} if keep else {}))  # only its cache is read
            shared_kv, calls = _layers(out.past_key_values), calls + 1
        for batch in group.batches:
            calls += _context_batch(model, plan, batch, group.shared, shared_kv, pad_id, device, answer_sets, keep,
                                    logprobs, greedy, answers)
    for part in plan.chunks([len(row[2]) for row in plan.long_rows]):
        chunk = plan.long_rows[part.start:part.stop]
        ids, mask = pad_right([row[2] for row in chunk], pad_id)
        conts = [reqs[i].conts[k] for i, k, _ in chunk]
        positions = [[len(row[2]) - len(c) + j for j in range(len(c))] for row, c in zip(chunk, conts)]
        kwargs: dict[str, Any] = {"use_cache": False}
        if keep:  # the scored positions only, padded to the widest row by repeating its last one
            width = max(len(p) for p in positions)
            kwargs["logits_to_keep"] = torch.tensor([p + p[-1:] * (width - len(p)) for p in positions], device=device)
            positions = [list(range(len(p))) for p in positions]
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
        sums, hits = _gather(logits, positions, conts)
        for (i, k, _), s, h in zip(chunk, sums, hits):
            logprobs[i][k], greedy[i][k] = s, h
        if answer_sets is not None:
            first = [j for j, (_, k, _) in enumerate(chunk) if k == 0]
            at = logits[first, [positions[j][0] for j in first]]
            for j, summary in zip(first, _summaries(at, answer_sets)):
                answers[chunk[j][0]] = summary
        calls += 1
    for _ in range(n_calls - calls):  # ZeRO-3: every rank makes as many calls as the busiest one
        model(input_ids=torch.full((1, 1), pad_id, device=device),
              attention_mask=torch.ones((1, 1), dtype=torch.long, device=device), use_cache=False)
    return list(zip(logprobs, greedy, answers))


def _context_batch(model, plan, batch, shared, shared_kv, pad_id, device, answer_sets, keep, logprobs, greedy,
                   answers) -> int:
    """Contexts of one batch (on the group's shared cache), then their multi-token continuations; returns calls."""
    reqs = plan.requests
    n_shared = len(shared)
    suffixes = [reqs[i].ctx[n_shared:] for i in batch]
    ids, mask = pad_right(suffixes, pad_id)
    if shared_kv is not None:
        mask = torch.cat([torch.ones((len(batch), n_shared), dtype=torch.long), mask], dim=1)
    rows = _cont_rows(reqs, batch)
    last = torch.tensor([len(s) - 1 for s in suffixes], device=device)
    kwargs: dict[str, Any] = {"use_cache": bool(rows) or shared_kv is not None}
    if shared_kv is not None:
        kwargs["past_key_values"] = _cache([(k.expand(len(batch), -1, -1, -1), v.expand(len(batch), -1, -1, -1))
                                            for k, v in shared_kv])
    if keep:
        kwargs["logits_to_keep"] = last[:, None]  # [B, 1]: each row's last context token
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    at = out.logits[:, 0] if keep else out.logits[torch.arange(len(batch), device=out.logits.device), last]  # [B, V]
    log_p = torch.log_softmax(at.float(), dim=-1)
    top = at.argmax(dim=-1)
    # Every continuation's first token, in one gather: [B, K] with K padded by repeating continuation 0.
    width = max(len(reqs[i].conts) for i in batch)
    first = torch.tensor([[c[0] for c in reqs[i].conts] + [reqs[i].conts[0][0]] * (width - len(reqs[i].conts))
                          for i in batch], device=at.device)
    first_lp = log_p.gather(1, first).double().cpu().tolist()
    first_hit = (first == top[:, None]).cpu().tolist()
    for b, i in enumerate(batch):
        for k in range(len(reqs[i].conts)):
            logprobs[i][k], greedy[i][k] = first_lp[b][k], first_hit[b][k]
    if answer_sets is not None:
        for i, summary in zip(batch, _summaries(at, answer_sets)):
            answers[i] = summary
    calls = 1
    if not rows:
        return calls
    kv = _layers(out.past_key_values)
    for part in plan.chunks(_tail_widths(reqs, batch)):
        chunk = rows[part.start:part.stop]
        index = torch.tensor([b for b, _ in chunk], device=kv[0][0].device)
        conts = [reqs[batch[b]].conts[k] for b, k in chunk]
        tail, tail_mask = pad_right([c[:-1] for c in conts], pad_id)
        ctx_len = torch.tensor([len(reqs[batch[b]].ctx) for b, _ in chunk])
        out3 = model(input_ids=tail.to(device),
                     attention_mask=torch.cat([mask[index.cpu()], tail_mask], dim=1).to(device),
                     position_ids=(ctx_len[:, None] + torch.arange(tail.shape[1])[None, :]).to(device),
                     past_key_values=_cache([(k.index_select(0, index), v.index_select(0, index)) for k, v in kv]),
                     use_cache=True)
        sums, hits = _gather(out3.logits, [list(range(len(c) - 1)) for c in conts], [c[1:] for c in conts])
        for (b, k), s, h in zip(chunk, sums, hits):
            i = batch[b]
            logprobs[i][k] += s
            greedy[i][k] = greedy[i][k] and h
        calls += 1
    return calls


def hf_model(model) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine (`.module`) and a PEFT wrapper (`get_base_model`)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def keeps_logits(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do), so that the LM head runs on
    the scored positions only."""
    forward = getattr(hf_model(model), "forward", None)
    return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters


@contextmanager
def fp32_head(model):
    """Within: a half-precision model's LM head (a plain `nn.Linear`) computes its logits in fp32 from the rounded
    hidden states. The instance's `forward` is replaced, not the module, so hooks around the call (ZeRO-3's gathering
    of the weight) still run; an adapted head (e.g. a LoRA layer) is left alone."""
    inner = hf_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.weight.dtype not in (torch.bfloat16, torch.float16):
        yield
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        bias = None if head.bias is None else head.bias.float()
        return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def _gather(logits: torch.Tensor, positions: list[list[int]], targets: list[list[int]]) -> tuple[list, list]:
    """Per row: summed log-prob (float64) of `targets` predicted at `positions`, and whether each was the argmax."""
    width = max(len(t) for t in targets)
    pos = torch.zeros((len(targets), width), dtype=torch.long)
    tgt = torch.zeros((len(targets), width), dtype=torch.long)
    valid = torch.zeros((len(targets), width), dtype=torch.bool)
    for r, (p, t) in enumerate(zip(positions, targets)):
        pos[r, : len(p)], tgt[r, : len(t)], valid[r, : len(t)] = torch.tensor(p), torch.tensor(t), True
    dev = logits.device
    picked = logits.gather(1, pos.to(dev)[:, :, None].expand(-1, -1, logits.shape[-1]))  # [R, W, V]
    log_p = torch.log_softmax(picked.float(), dim=-1).gather(2, tgt.to(dev)[:, :, None])[:, :, 0]
    valid = valid.to(dev)
    sums = torch.where(valid, log_p.double(), torch.zeros_like(log_p, dtype=torch.float64)).sum(1)
    hits = ((picked.argmax(-1) == tgt.to(dev)) | ~valid).all(1)
    return sums.cpu().tolist(), hits.cpu().tolist()


def _summaries(at: torch.Tensor, answer_sets) -> list[tuple[list[float], float]]:
    """(summed probability of each token set, entropy of the whole vocabulary) per row of answer-position logits."""
    at = at.float()
    probs = metrics.letter_probabilities(at, answer_sets).cpu().tolist()
    entropy = metrics.entropy_vocab(at).cpu().tolist()
    return list(zip(probs, entropy))


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, [B, heads, T, dim], of a model's returned cache (Cache object or legacy tuples)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]


def _cache(kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """A fresh DynamicCache holding `kv` (the model appends to it; `kv`'s tensors are not modified)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k.contiguous(), v.contiguous()) for k, v in kv])
