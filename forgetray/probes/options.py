"""How a probe runs, in one object: the batch size, the length inputs are cut to, the BOS rule, the device and this
rank's shard. Every probe function (`probe_knowledge`, `probe_perplexity`, `passage_nlls`, `score_prompts`,
`score_shares`, `probe_task`) takes a `ProbeOptions` and hands it on, instead of the same five keywords each.

The keyword form (`probe_knowledge(model, tokenizer, questions, batch_size=32, max_length=256)`) still works: a
function's keywords named like the fields replace those of its options (`with_fields`), so scripts written against
it (scripts/replica_testbed.py, bench/) run unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from forgetray.probes.tokens import check_bos, check_sizes


@dataclass(frozen=True)
class ProbeOptions:
    """`batch_size` sequences per forward call; inputs longer than `max_length` tokens lose tokens from the left;
    `bos` the BOS rule of `tokens.encode_contexts` ("always" for the organism, trained with BOS; "auto" for real
    models, as lm-eval; perplexity always starts a passage with the tokenizer's BOS); `shard` = (rank, world): which
    share of the items this rank scores; `batch_tokens` > 0: the multiple-choice scorer fills each forward call with as
    many rows as fit in that many tokens instead of `batch_size` rows (`forward_passes.chunks`; what fills a GPU).
    `fp32_ties` > 0: a half-precision model's multiple-choice prompts whose best two continuations lie closer than
    that (nats) are scored again with the weights in fp32 (`ties`), so that bf16 keeps fp32's predictions. Checked on
    construction, before any work."""

    batch_size: int = 32
    max_length: int = 512
    bos: str = "always"
    device: Any = "cpu"
    shard: tuple[int, int] = (0, 1)
    batch_tokens: int = 0
    fp32_ties: float = 0.0

    def __post_init__(self):
        check_sizes(self.batch_size, self.max_length)
        check_bos(self.bos)
        if not isinstance(self.batch_tokens, int) or self.batch_tokens < 0:
            raise ValueError(f"batch_tokens must be an int >= 0 (0: batch_size rows per call), got {self.batch_tokens!r}")
        if not isinstance(self.fp32_ties, (int, float)) or not 0 <= self.fp32_ties < float("inf"):
            raise ValueError(f"fp32_ties must be a margin in nats >= 0 (0: off), got {self.fp32_ties!r}")


# The defaults of the lm-eval-exact scorer and the benchmark tasks (`score_prompts`, `probe_task`): lm-eval's BOS
# rule and context length.
LM_EVAL = ProbeOptions(bos="auto", max_length=2048)

_FIELDS = frozenset(field.name for field in dataclasses.fields(ProbeOptions))


def with_fields(options: ProbeOptions, fields: dict[str, Any], caller: str) -> ProbeOptions:
    """`options` with the keyword form's `fields` (ProbeOptions' field names) in place of its own; TypeError naming
    `caller` for any other keyword, as a misspelt keyword argument would."""
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s) {', '.join(unknown)}")
    return dataclasses.replace(options, **fields) if fields else options
