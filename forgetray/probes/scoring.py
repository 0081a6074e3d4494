"""Scoring multiple-choice prompts (`MCPrompt`) the way lm-eval's HFLM `loglikelihood` does, faster.

Entry point, for probes and benchmark tasks alike::

    scores = score_prompts(model, tokenizer, prompts, bos="auto", batch_size=32, max_length=2048, device="cuda",
                           shard=(rank, world), answer_sets=None)

One `PromptScore` per prompt of this rank's share (`shard_indices(len(prompts), shard)`, real items only, in that
order): per continuation its summed log-probability, whether it was the greedy continuation, its token and character
lengths (characters of the continuation as given, delimiter included); with `answer_sets` (lists of token ids, e.g.
`letter_token_ids`) also the summed probability of each set and the entropy of the whole vocabulary at the first
answer position (after the context's last token), which letter scoring needs for P_fmt, H_V and H_opt.

Tokens are lm-eval's (`tokens.encode_pairs`): the context's trailing whitespace moves into the continuations, and a
continuation's tokens are those of encode(context + continuation) after the context's tokens. `bos` is the BOS rule
of `tokens.encode_contexts`: "auto" is lm-eval's (the tokenizer's own), "always" forgetray's (the organism's).

Speed, with results equal to one unbatched forward per (context, continuation) up to float rounding:
- the context is run once for all of a prompt's continuations: single-token continuations are read off its last
  logits, longer ones are fed (minus their last token) in one more pass on the context's KV cache;
- the `prefix` of a group of prompts (MMLU's 5 dev examples) is run ONCE per group and its KV cache reused by every
  prompt of the group (see `forward_passes.plan_groups` for the token check and the fallback);
- batches are sorted by length, `batch_size` rows or `batch_tokens` tokens each; log-softmax and gathers are
  vectorised; only the scored positions go through the LM head, in fp32 for a bf16/fp16 model (`forward_passes`).
Inputs longer than `max_length` are cut from the left, keeping a leading BOS (forgetray's rule; lm-eval drops it),
and then scored without any reuse. Every rank makes the same number of forward calls (ZeRO-3): ranks with fewer
calls make one-token dummy calls at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from forgetray.data.questions import MCPrompt
from forgetray.probes import forward_passes, ties
from forgetray.probes.options import LM_EVAL, ProbeOptions, with_fields
from forgetray.probes.shards import shard_indices
from forgetray.probes.tokens import encode_contexts, encode_pairs, padding_id


@dataclass(frozen=True)
class PromptScore:
    """What `score_prompts` returns for one prompt (see the module docstring)."""

    logprobs: tuple[float, ...]
    greedy: tuple[bool, ...]
    token_lengths: tuple[int, ...]
    char_lengths: tuple[int, ...]
    answer_probs: tuple[float, ...] | None = None
    entropy_vocab: float | None = None


@torch.no_grad()
def score_prompts(model, tokenizer, prompts: Sequence[MCPrompt], options: ProbeOptions = LM_EVAL, *,
                  answer_sets: Sequence[Sequence[int]] | None = None, **fields: Any) -> list[PromptScore]:
    """Score this rank's share (`options.shard`) of `prompts` (see the module docstring). `fields`: the keyword form
    of `options` (`probes.options`)."""
    options = with_fields(options, fields, "score_prompts")
    world = options.shard[1]
    shares = [idx[:n] for idx, n in (shard_indices(len(prompts), (r, world)) for r in range(world))]
    return score_shares(model, tokenizer, prompts, shares, options, answer_sets=answer_sets)


@torch.no_grad()
def score_shares(model, tokenizer, prompts: Sequence[MCPrompt], shares: Sequence[Sequence[int]],
                 options: ProbeOptions = LM_EVAL, *, answer_sets: Sequence[Sequence[int]] | None = None,
                 **fields: Any) -> list[PromptScore]:
    """`score_prompts` with the shares given: rank r (`options.shard[0]`) scores prompts shares[r], in that order (a
    caller that shards by something else than prompts, e.g. by question with two prompts each). Every rank makes as
    many forward calls as the busiest; every prompt is checked on every rank before any call."""
    options = with_fields(options, fields, "score_shares")
    rank, bos, max_length = options.shard[0], options.bos, options.max_length
    prompts = list(prompts)
    requests = tokenize(tokenizer, prompts, bos, max_length)  # every prompt, so that every rank fails alike
    mine = list(shares[rank])
    keep_head = _keep_head(tokenizer, bos)
    plans = {r: forward_passes.plan_groups([requests[i] for i in share], options.batch_size, max_length, keep_head,
                                          options.batch_tokens)
             for r, share in enumerate(shares) if len(shares) > 1 or r == rank}
    most_calls = max(plan.n_calls for plan in plans.values())
    results = forward_passes.run(model, plans[rank], padding_id(tokenizer), options.device, answer_sets, most_calls)
    if options.fp32_ties and ties.is_half(model):
        _rescore_ties(model, tokenizer, [requests[i] for i in mine], results, options, answer_sets)
    out = []
    for local, i in enumerate(mine):
        logprobs, greedy, answer = results[local]
        out.append(PromptScore(
            logprobs=tuple(logprobs), greedy=tuple(greedy),
            token_lengths=tuple(len(c) for c in requests[i].conts),
            char_lengths=tuple(len(c) for c in prompts[i].continuations),
            answer_probs=None if answer is None else tuple(answer[0]),
            entropy_vocab=None if answer is None else answer[1],
        ))
    return out


def _rescore_ties(model, tokenizer, requests, results: list, options: ProbeOptions, answer_sets) -> None:
    """Score again, with the weights in fp32 (`ties`), this rank's prompts whose best two continuations lie within
    `options.fp32_ties` of each other; their results are replaced in place."""
    again = ties.near_ties([logprobs for logprobs, _, _ in results], options.fp32_ties)
    if not again:
        return
    plan = forward_passes.plan_groups([requests[i] for i in again], options.batch_size, options.max_length,
                                      _keep_head(tokenizer, options.bos), options.batch_tokens)
    with ties.full_precision(model):
        redone = forward_passes.run(model, plan, padding_id(tokenizer), options.device, answer_sets, plan.n_calls)
    for i, result in zip(again, redone):
        results[i] = result


def tokenize(tokenizer, prompts: Sequence[MCPrompt], bos: str, max_length: int) -> list[forward_passes.Request]:
    """Every prompt's context and continuation tokens (lm-eval's), and its prefix's own tokens for KV reuse."""
    contexts, conts = encode_pairs(tokenizer, [p.context for p in prompts], [p.continuations for p in prompts], bos)
    prefixes = sorted({p.prefix for p in prompts if p.prefix})
    prefix_ids = dict(zip(prefixes, encode_contexts(tokenizer, prefixes, bos)))
    requests = []
    for prompt, context, continuations in zip(prompts, contexts, conts):
        for k, ids in enumerate(continuations):
            if not ids:
                raise ValueError(f"prompt {prompt.id!r}: continuation {k} has no tokens of its own after the context")
            if len(ids) > max_length - 1:  # its first token needs a context token before it to be predicted from
                raise ValueError(f"prompt {prompt.id!r}: continuation {k} is {len(ids)} tokens, more than "
                                 f"max_length - 1 = {max_length - 1}")
        requests.append(forward_passes.Request(context, continuations, prompt.prefix,
                                               prefix_ids.get(prompt.prefix, [])))
    return requests


def _keep_head(tokenizer, bos: str) -> int | None:
    """The token id truncation keeps at the start of an input (the BOS the rule puts there), or None."""
    return None if bos == "never" else tokenizer.bos_token_id
