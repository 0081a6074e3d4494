"""Instruction data -> token ids with the loss on response tokens only (docs/methods.md §1).

Two record formats:
- Alpaca (single turn): {"instruction", "input"?, "output"}, formatted with the Stanford Alpaca template;
- ShareGPT (multi turn): {"conversations": [{"from": "human"|"gpt", "value"}, ...]}, formatted as Vicuna v1.1
  conversations, the loss on the assistant turns (each followed by EOS) only.
A record becomes a list of (text, trained?) segments; `tokenize_segments` turns it into ids and labels.

Files are checked record by record before any compute (`check_instruction_file`, errors name file:line); the actual
loading goes through `datasets` (Arrow-cached), the same path a hub dataset takes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from forgetray.data.jsonl import iter_jsonl

IGNORE_INDEX = -100  # label value the causal-LM loss skips (prompt tokens and padding)

# The Stanford Alpaca prompt template, with and without an input field.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
REQUIRED_FIELDS = ("instruction", "output")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
HUMAN_ROLES, ASSISTANT_ROLES = ("human", "user"), ("gpt", "assistant", "chatgpt", "bard")


def alpaca_prompt(record: dict) -> str:
    if record.get("input"):
        return ALPACA_PROMPT_INPUT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_PROMPT.format(instruction=record["instruction"])


def _iter_file(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, record) for a .jsonl (one object per line) or .json (an array of objects) file."""
    if path.suffix == ".jsonl":
        for lineno, record in iter_jsonl(path):
            yield f"{path}:{lineno}", record
    elif path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON array of records")
        for index, record in enumerate(records):
            yield f"{path}: record {index}", record
    else:
        raise ValueError(f"{path}: unsupported data file type {path.suffix!r} (use .json or .jsonl)")


def record_format(record: dict) -> str:
    return "sharegpt" if "conversations" in record else "alpaca"


def check_instruction_file(path: Path) -> int:
    """Validate every record (Alpaca or ShareGPT, one format per file). Returns the record count."""
    count, first = 0, None
    for where, record in _iter_file(Path(path)):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        fmt = record_format(record)
        first = first or fmt
        if fmt != first:
            raise ValueError(f"{where}: a {fmt} record in a file of {first} records")
        (_check_sharegpt if fmt == "sharegpt" else _check_alpaca)(record, where)
        count += 1
    if count == 0:
        raise ValueError(f"{path}: no records")
    return count


def _check_alpaca(record: dict, where: str) -> None:
    for field in REQUIRED_FIELDS:
        if field not in record:
            raise ValueError(f"{where}: missing field {field!r}")
    for field in ("instruction", "input", "output"):
        if field in record and not isinstance(record[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string")
    if not record["output"].strip():
        raise ValueError(f"{where}: field 'output' is empty")


def _check_sharegpt(record: dict, where: str) -> None:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: field 'conversations' must be a non-empty list of turns")
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise ValueError(f"{where}: conversations[{i}] must be an object with string 'from' and 'value'")
        if turn["from"].lower() not in HUMAN_ROLES + ASSISTANT_ROLES + ("system",):
            raise ValueError(f"{where}: conversations[{i}] has unknown role {turn['from']!r}")
    if not any(t["from"].lower() in ASSISTANT_ROLES for t in turns):
        raise ValueError(f"{where}: the conversation has no assistant turn to train on")


def load_records(source: dict):
    """A `datasets.Dataset` of instruction records from a resolved dataset source (see resources.resolve_dataset)."""
    import datasets

    if source["kind"] == "hub":
        ds = datasets.load_dataset(source["path"], split="train")
    else:
        ds = datasets.load_dataset("json", data_files=source["path"], split="train")
    if "conversations" in ds.column_names:
        return ds.select_columns(["conversations"])
    if "query" in ds.column_names and "response" in ds.column_names and "instruction" not in ds.column_names:
        ds = ds.rename_columns({"query": "instruction", "response": "output"})  # MetaMathQA's field names
    missing = [f for f in REQUIRED_FIELDS if f not in ds.column_names]
    if missing:
        raise ValueError(f"dataset {source['name']!r} has neither 'conversations' nor the Alpaca field(s) {missing}")
    if "input" not in ds.column_names:
        ds = ds.add_column("input", [""] * len(ds))
    return ds.select_columns(["instruction", "input", "output"])


def segments(record: dict) -> list[tuple[str, bool]]:
    """A record as (text, trained?) segments; EOS is appended after each trained segment by `tokenize_segments`."""
    if record.get("conversations"):
        out: list[tuple[str, bool]] = []
        system, first_user = VICUNA_SYSTEM, True
        for turn in record["conversations"]:
            role = turn["from"].lower()
            if role == "system":
                system = turn["value"]
            elif role in HUMAN_ROLES:
                out.append(((system + " " if first_user else "") + f"USER: {turn['value']} ASSISTANT:", False))
                first_user = False
            else:
                out.append((" " + turn["value"], True))
        return out
    return [(alpaca_prompt(record), False), (record["output"], True)]


def tokenize_segments(parts: list[tuple[str, bool]], tokenizer, max_length: int) -> dict:
    """[BOS] + segments, EOS after each trained one; labels IGNORE_INDEX on BOS and untrained segments.
    Truncated on the right to max_length."""
    input_ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels = [IGNORE_INDEX] * len(input_ids)
    for text, trained in parts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if trained:
            ids = ids + [tokenizer.eos_token_id]
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels, "n_response": sum(1 for x in labels if x != IGNORE_INDEX)}


def tokenize_example(record: dict, tokenizer, max_length: int) -> dict:
    return tokenize_segments(segments(record), tokenizer, max_length)


def tokenize_dataset(source: dict, tokenizer, max_length: int):
    """Tokenized dataset (Arrow-cached by `datasets`), without examples whose response was truncated away."""
    ds = load_records(source)
    ds = ds.map(
        tokenize_example,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        remove_columns=ds.column_names,
        desc=f"tokenizing {source['name']}",
    )
    return ds.filter(_has_response, input_columns="n_response")


def _has_response(n_response: int) -> bool:
    return n_response > 0


def collate(batch: list[dict], pad_token_id: int) -> dict:
    """Right-pad a list of tokenized examples into tensors (labels padded with IGNORE_INDEX)."""
    import torch

    width = max(len(ex["input_ids"]) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"])
        labels[row, :n] = torch.tensor(ex["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_packed(batch: list[dict]) -> dict:
    """A list of tokenized examples as ONE row without padding: the examples one after another, position ids
    restarting at 0 for each (transformers then masks attention to stay within each example), each example's first
    label not scored (it would be predicted from the previous example's last token). No attention mask: Hugging
    Face models read packed rows from position ids only when there is none."""
    import torch

    input_ids, labels, positions = [], [], []
    for ex in batch:
        input_ids += ex["input_ids"]
        labels += [IGNORE_INDEX] + list(ex["labels"][1:])
        positions += range(len(ex["input_ids"]))
    return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions])}
