"""How every probe turns text into model input (METHODS.md §3), and the one model call they all make.

- a sequence is `[BOS] + tokenizer(text, add_special_tokens=False)` (no BOS when the tokenizer has none);
- prompts longer than `max_length` lose tokens from the left, just after BOS, so the answer position survives and
  the model still sees the BOS it was trained with;
- batches are right-padded (`padding_id`) with attention_mask 0 on pads, so positions stay 0, 1, 2, ...

The model may be a Hugging Face causal LM or a DeepSpeed engine wrapping one (possibly ZeRO-3 sharded), so it is only
ever called as `model(input_ids=..., attention_mask=...)` and only `.logits` of the result is read.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from forgetray.data.questions import LETTERS


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def bos_prefix(tokenizer) -> list[int]:
    """What every probed sequence starts with: [BOS], or nothing when the tokenizer has no BOS."""
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def padding_id(tokenizer) -> int:
    """The id batches are right-padded with, in probes and in training: pad, else EOS, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0  # any id will do: pads are masked out and never scored


def truncate_left(bos: list[int], ids: list[int], max_length: int) -> list[int]:
    """BOS + ids, dropping tokens just after BOS until it fits in max_length (the end is where answers are)."""
    keep = max_length - len(bos)
    return bos + ids[max(0, len(ids) - keep):]


def letter_token_ids(tokenizer, n_letters: int) -> list[list[int]]:
    """For each of the first `n_letters` letters, its single-token variants: the ids of " L" and of "L", deduplicated.

    A variant that is not a single token is skipped; a letter with neither is an error (it cannot be scored).
    """
    owner: dict[int, str] = {}
    out = []
    for letter in LETTERS[:n_letters]:
        variants: list[int] = []
        for text in (f" {letter}", letter):
            ids = encode(tokenizer, [text])[0]
            if len(ids) == 1 and ids[0] not in variants:
                variants.append(ids[0])
        if not variants:
            raise ValueError(f"neither ' {letter}' nor '{letter}' is a single token for this tokenizer, "
                             f"so the letter-scored probe cannot score option {letter}")
        for token_id in variants:
            if owner.setdefault(token_id, letter) != letter:
                raise ValueError(f"token {token_id} encodes both letter {owner[token_id]} and letter {letter}")
        out.append(variants)
    return out


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of right-padded sequences, both [B, L] on the CPU."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def forward(model, seqs: Sequence[Sequence[int]], pad_id: int, device: Any) -> torch.Tensor:
    """One forward call on right-padded sequences; returns logits [B, L, V]."""
    input_ids, attention_mask = pad_right(seqs, pad_id)
    return model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits


def check_sizes(batch_size: int, max_length: int) -> None:
    """The size arguments every probe takes, checked before any work."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a token and its prediction), got {max_length}")
