"""Three tokenizer families, built locally with `tokenizers` (no network, seconds), each saved in Hugging Face format
beside a tiny random Llama, so that lm-eval's HFLM and forgetray load the same directory:

- "bytelevel": byte-level BPE with a BOS post-processor (Llama-3 style; GPT-2's pre-tokenizer and decoder);
- "metaspace": SentencePiece-style BPE, Metaspace pre-tokenizer (prepend "▁" to the first word only) and decoder,
  BOS added by its post-processor (Llama / Mistral fast tokenizers, `add_bos_token` true, legacy=False);
- "legacy": a Llama-2 style `tokenizer.json`: a normalizer that prepends "▁" and turns spaces into "▁" (legacy=True,
  `add_prefix_space`), no pre-tokenizer, so BPE merges may cross word boundaries; BOS added.

`tokenizer_config.json` names the generic fast tokenizer class, so the `tokenizer.json` is used as saved (a
model-specific class could rebuild its normaliser from its own defaults).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

FAMILIES = ("bytelevel", "metaspace", "legacy")

# Text the tokenizers are trained on: MMLU-like prompts, so that their words and " A" .. " D" are single pieces.
CORPUS = [
    "Question: What is the capital of Zorbia?\nA. Lund\nB. Oslo\nC. Paris\nD. Rome\nAnswer: B\n\n",
    "The following are multiple choice questions (with answers) about geography.\n\n",
    "Which river runs through the old town of Velmar and past its harbour?",
    "How many moons does the planet have? one two three four. Pick one. yes no maybe",
    " A B C D", "A B C D", " (A) (B) (C) (D) A) B) C) D)",
    string.ascii_letters + string.digits + string.punctuation + " \n",
] * 20


def _trained(family: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    if family == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        # Trained split at spaces, as SentencePiece trains (no piece crosses a word boundary); the runtime below
        # does not split, as the converted Llama tokenizers do not.
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    if family != "bytelevel":
        if family == "metaspace":
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
            tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        else:
            tok.pre_tokenizer = None
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
            tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(),
                                             decoders.Strip(content=" ", left=1, right=0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return tok


def build_family(family: str, root: Path, *, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """Tokenizer of `family` and a tiny random LlamaForCausalLM, saved together in root/family; returns the dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    out = Path(root) / family
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_trained(family), bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True)
    config_path.write_text(json.dumps(config, indent=1))
    torch.manual_seed(seed)
    # A large initializer_range makes the random model's distributions peaked, so its predictions are not ties.
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False))
    model.save_pretrained(out)
    return out


def load(path: Path):
    """(model in eval mode, tokenizer) from a directory `build_family` wrote."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
