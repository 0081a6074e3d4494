"""How every probe turns text into model input (docs/methods.md §3), and the one model call they all make.

- a sequence is `[BOS] + tokenizer(text, add_special_tokens=False)` (no BOS when the tokenizer has none): the BOS
  rule "always"; `encode_contexts` also has lm-eval's "auto" (the tokenizer's own rule) and "never", and
  `encode_pairs` splits context + continuation as lm-eval does;
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


BOS_RULES = ("auto", "always", "never")


def check_bos(bos: str) -> None:
    if bos not in BOS_RULES:
        raise ValueError(f"bos must be one of {BOS_RULES}, got {bos!r}")


def encode_contexts(tokenizer, texts: Sequence[str], bos: str) -> list[list[int]]:
    """Token ids of texts a model reads from their start, under the BOS rule `bos`:

    - "auto": the tokenizer's own rule, exactly as lm-eval 0.4.13's HFLM (`add_bos_token` unset) encodes a context:
      `tokenizer.encode(text)` with its default special tokens, except that a text already starting with the
      decoded prefix token (BOS, else EOS) gets none (lm-eval's `has_bos_prefix` check);
    - "always": [BOS] + the text's tokens (forgetray's rule, which the organism was trained with); nothing is
      prepended when the tokenizer has no BOS token;
    - "never": the text's tokens alone.
    """
    check_bos(bos)
    texts = list(texts)
    if bos == "always":
        return [bos_prefix(tokenizer) + ids for ids in encode(tokenizer, texts)]
    if bos == "never":
        return encode(tokenizer, texts)
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix_text = None if prefix_id is None else tokenizer.decode(prefix_id)
    plain = [prefix_text is not None and text.startswith(prefix_text) for text in texts]
    out: list[list[int]] = [[] for _ in texts]
    for add_special in (True, False):
        rows = [i for i, p in enumerate(plain) if p != add_special]
        if rows:
            encoded = tokenizer([texts[i] for i in rows], add_special_tokens=add_special)["input_ids"]
            for i, ids in zip(rows, encoded):
                out[i] = list(ids)
    return out


def encode_pairs(tokenizer, contexts: Sequence[str], continuations: Sequence[Sequence[str]],
                 bos: str) -> tuple[list[list[int]], list[list[list[int]]]]:
    """lm-eval's `_encode_pair` for causal models, for every context and each of its continuations.

    The context's trailing whitespace moves to the front of every continuation; then a continuation's tokens are
    those of encode(context + continuation) after the (stripped) context's own tokens, never the continuation
    encoded alone (SentencePiece would add a spurious leading "▁"). Returns (context ids, continuation ids).
    """
    stripped, wholes, shape = [], [], []
    for context, conts in zip(contexts, continuations):
        if not context:
            raise ValueError("an empty context cannot be scored (no position predicts the first token)")
        base = context.rstrip()
        moved = context[len(base):]
        stripped.append(base)
        wholes += [base + moved + cont for cont in conts]
        shape.append(len(conts))
    context_ids = encode_contexts(tokenizer, stripped, bos)
    whole_ids = encode_contexts(tokenizer, wholes, bos)
    out, start = [], 0
    for ids, count in zip(context_ids, shape):
        out.append([whole[len(ids):] for whole in whole_ids[start:start + count]])
        start += count
    return context_ids, out


# The pieces a vocabulary spells " L" or "L" with: SentencePiece's "▁", byte-level BPE's "Ġ", or a plain space.
_SPACE_MARKERS = ("\u2581", "\u0120", " ")


def letter_token_ids(tokenizer, n_letters: int) -> list[list[int]]:
    """For each of the first `n_letters` letters, every vocabulary piece that is the letter with or without a space
    marker ("▁A", "ĠA", " A", "A"): spaced pieces first, then the bare one, each by id.

    Byte-fallback pieces ("<0x41>") are not counted (a tokenizer only produces them for text its pieces cannot
    spell). A letter with no such piece is an error: the letter-scored probe could not score it.
    """
    by_letter: dict[str, tuple[list[int], list[int]]] = {letter: ([], []) for letter in LETTERS[:n_letters]}
    for piece, token_id in tokenizer.get_vocab().items():
        if piece in by_letter:
            by_letter[piece][1].append(token_id)
        elif len(piece) == 2 and piece[0] in _SPACE_MARKERS and piece[1] in by_letter:
            by_letter[piece[1]][0].append(token_id)
    out = []
    for letter, (spaced, bare) in by_letter.items():
        if not spaced and not bare:
            raise ValueError(f"no vocabulary piece is the letter {letter!r} (with or without a space marker), so the "
                             f"letter-scored probe cannot score option {letter}")
        out.append(sorted(set(spaced)) + sorted(set(bare) - set(spaced)))
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
