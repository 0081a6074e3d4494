"""The training loss of a batch: the model's own causal-LM loss, or the same loss computed in chunks of the scored
positions without the full logits (`Speed.chunked_loss`).

The model's loss materialises logits for every position, (batch x length x vocab) floats: at a 128k vocabulary
and 8k tokens a row that is 4 GB in fp32 before the backward pass keeps it. The chunked loss runs the decoder,
keeps only the positions whose next token is scored (an instruction's response; every token of packed text),
and for each chunk of them computes the LM head, an fp32 log-softmax and the summed cross-entropy under
activation checkpointing: at most one chunk's logits exist at a time, forward or backward. The mean over the
scored tokens is the model's loss up to float rounding (tests/test_speed.py checks both and their gradients).

It calls the decoder and the head as submodules, not through the engine's forward: ZeRO stages 0-2 keep whole
weights on every rank, so that is the same computation; ZeRO-3 gathers weights in the engine's forward hooks,
and the spec refuses `chunked_loss` with `zero_stage=3`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def lm_loss(model, batch: dict, chunk: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy over the scored labels of `batch` (`model`: a DeepSpeed engine or a Hugging
    Face causal LM; labels -100 are not scored). `chunk` > 0: computed `chunk` positions at a time."""
    # No KV cache in training: with one, transformers also ignores a packed row's position ids (attention would
    # cross the examples).
    if not chunk:
        return model(**batch, use_cache=False).loss
    module = getattr(model, "module", model)  # the engine's model
    module = module.get_base_model() if hasattr(module, "get_base_model") else module  # peft: adapters stay on
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = module.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (B, S, H), final norm applied
    labels = batch["labels"][:, 1:]  # the token each position predicts
    scored = labels != IGNORE_INDEX
    states, targets = hidden[:, :-1][scored], labels[scored]  # (N, H), (N,)
    head = module.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk):
        total = total + checkpoint(_chunk_loss, head, states[start:start + chunk], targets[start:start + chunk],
                                   use_reentrant=False)
    return total / max(1, len(targets))


def _chunk_loss(head, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(states).float(), targets, reduction="sum")
