"""Load a model and its tokenizer from a resolved source (organism dir, local HF dir, or hub id).

The organism's base models are ordinary Hugging Face model directories, so every model takes this one code path.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_tokenizer(source: dict):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source["path"])
    if tokenizer.eos_token_id is None:
        raise ValueError(f"model {source['name']!r}: the tokenizer has no EOS token (needed to end responses)")
    if tokenizer.pad_token_id is None:
        # Llama-2's tokenizer has no pad token; padded positions are masked out everywhere, so EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: dict, precision: str = "fp32"):
    """An `AutoModelForCausalLM` in train mode. Under ZeRO-3 call it inside an `HfDeepSpeedConfig` scope so
    transformers partitions the weights while loading instead of materialising the whole model on every rank."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source["path"], dtype=DTYPES[precision])
    model.config.use_cache = False  # no KV cache while training/probing full sequences
    return model
