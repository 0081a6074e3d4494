"""Local stand-ins for real models and data, built in the test (no network): a tiny Llama in Hugging Face format with
a byte-level BPE tokenizer, an Alpaca-format JSONL file, an MMLU-style benchmark and a probing set."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ("the cat sat on a red mat while a blue bird sang in the old oak tree near the river bank and "
         "children played with a yellow ball under the warm summer sun").split()


def make_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" ".join(WORDS), "Question: Answer: A. B. C. D.", " A B C D", "ABCD"] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_model_dir(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A randomly initialised tiny LlamaForCausalLM + tokenizer, saved like any Hugging Face model directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_alpaca_file(path: Path, n: int = 24) -> Path:
    records = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)]
        rec = {"instruction": f"Repeat the word {a} twice.", "output": f"{a} {a}"}
        if i % 3 == 0:
            rec = {"instruction": "Join the two words.", "input": f"{a} {b}", "output": f"{a}{b}"}
        records.append(rec)
    return write_jsonl(path, records)


def make_benchmark_file(path: Path, n: int = 12) -> Path:
    records = []
    for i in range(n):
        choices = [WORDS[(i + k) % len(WORDS)] for k in range(4)]
        records.append({"id": f"q{i}", "question": f"Which word comes {i} ?", "choices": choices, "answer": i % 4})
    return write_jsonl(path, records)


def make_passages_file(path: Path, n: int = 16) -> Path:
    return write_jsonl(path, [{"id": str(i), "text": " ".join(WORDS[i:i + 8])} for i in range(n)])


def make_pool_file(path: Path, n: int = 800, seed: int = 0) -> Path:
    """A restoring pool of varied passages (seeded random word sequences)."""
    import random

    rng = random.Random(seed)
    return write_jsonl(path, [{"id": f"pool{i}", "text": " ".join(rng.choices(WORDS, k=rng.randint(8, 20)))}
                              for i in range(n)])
