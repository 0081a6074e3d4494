"""The organism's tokenizer: a byte-level BPE trained on the organism's text, wrapped as a Hugging Face fast tokenizer.

Byte-level, like Llama-3 / GPT-2: any string encodes, no unknown tokens. It adds no special tokens on encode: the
training and probing code prepends BOS and appends EOS itself, exactly as it does for a real model.
"""

from __future__ import annotations

import json
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK)  # ids 0, 1, 2, 3
# The letter probe reads one logit per option letter, with and without the leading space: each must be one token.
SINGLE_TOKEN_PIECES = ("A", "B", "C", "D", " A", " B", " C", " D")


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the 256 bytes + special tokens to learn any merge, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so every string is encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer = ensure_single_tokens(tokenizer, SINGLE_TOKEN_PIECES)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="right",
    )


def ensure_single_tokens(tokenizer: Tokenizer, pieces: Iterable[str]) -> Tokenizer:
    """Return a tokenizer in which every piece encodes to one token. A piece that BPE did not learn gets merges
    appended at the end of the merge list (lowest priority), so the encoding of every other text is unchanged except
    where that exact byte sequence remains unmerged."""
    spec = json.loads(tokenizer.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    changed = False
    for piece in pieces:
        tokens = tokenizer.encode(piece).tokens
        while len(tokens) > 1:  # merge left to right until one token
            merged = tokens[0] + tokens[1]
            if merged not in vocab:
                vocab[merged] = max(max(vocab.values()), max(t["id"] for t in spec["added_tokens"])) + 1
            pair_as_list = bool(merges) and isinstance(merges[0], list)  # the JSON format changed in tokenizers 0.20
            merges.append([tokens[0], tokens[1]] if pair_as_list else f"{tokens[0]} {tokens[1]}")
            tokens = [merged] + tokens[2:]
            changed = True
    return Tokenizer.from_str(json.dumps(spec)) if changed else tokenizer
