"""Instruction data (response-only labels), data-file checks naming the line, lr schedule, DeepSpeed config."""

import json
import math
import re

import pytest

from fixtures import make_alpaca_file, make_tokenizer
from forgetray.data.instruct import (ALPACA_PROMPT, IGNORE_INDEX, alpaca_prompt, check_instruction_file, collate,
                                     tokenize_dataset, tokenize_example)
from forgetray.spec import TrialConfig
from forgetray.plan import ift_phase
from forgetray.train.deepspeed_config import deepspeed_config
from forgetray.train.schedule import lr_factor, warmup_steps


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_labels_cover_response_and_eos_only(tokenizer):
    record = {"instruction": "Repeat the word cat.", "input": "", "output": "cat cat"}
    ex = tokenize_example(record, tokenizer, max_length=512)
    prompt = ALPACA_PROMPT.format(instruction="Repeat the word cat.")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer("cat cat", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == [tokenizer.bos_token_id] + prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * (1 + len(prompt_ids)) + response_ids + [tokenizer.eos_token_id]
    assert ex["n_response"] == len(response_ids) + 1


def test_input_field_selects_the_input_template():
    assert "### Input:\nx y" in alpaca_prompt({"instruction": "Join.", "input": "x y"})
    assert "### Input" not in alpaca_prompt({"instruction": "Join.", "input": ""})


def test_truncation_and_dropping_examples_without_response(tokenizer, tmp_path):
    record = {"instruction": "Repeat the word cat.", "output": "cat " * 50}
    ex = tokenize_example(record, tokenizer, max_length=200)
    assert len(ex["input_ids"]) == len(ex["labels"]) == 200
    path = make_alpaca_file(tmp_path / "d.jsonl", n=6)
    n_prompt = len(tokenizer(ALPACA_PROMPT.format(instruction="Repeat the word the twice."),
                             add_special_tokens=False)["input_ids"])
    # With max_length at the prompt length, no response token survives: every example is dropped.
    ds = tokenize_dataset({"kind": "local", "name": "d", "path": str(path)}, tokenizer, max_length=n_prompt // 2)
    assert len(ds) == 0
    ds = tokenize_dataset({"kind": "local", "name": "d", "path": str(path)}, tokenizer, max_length=512)
    assert len(ds) == 6


def test_collate_pads_right_with_ignored_labels():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("lines, message", [
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a"}'], ":2: missing field 'output'"),
    (['{"instruction": "a", "output": "b"}', "", '{not json'], ":3: invalid JSON"),
    (['["a", "b"]'], ":1: expected a JSON object"),
    (['{"instruction": "a", "output": 3}'], ":1: field 'output' must be a string"),
    (['{"instruction": "a", "output": "  "}'], ":1: field 'output' is empty"),
])
def test_check_alpaca_jsonl_names_the_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl{message}"):
        check_instruction_file(path)


def test_check_alpaca_json_array(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 3))
    assert check_instruction_file(good) == 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"output": "b"}]))
    with pytest.raises(ValueError, match="bad.json: record 1: missing field 'instruction'"):
        check_instruction_file(bad)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"instruction": "a",\n "output": }\n]')
    with pytest.raises(ValueError, match="broken.json:3: invalid JSON"):
        check_instruction_file(broken)


def test_lr_schedule_by_hand():
    assert warmup_steps(100, 0.03) == 3 and warmup_steps(10, 0.0) == 0
    assert [lr_factor(s, 100, 3, "cosine") for s in range(3)] == [1 / 3, 2 / 3, 1.0]
    assert lr_factor(3, 100, 3, "cosine") == 1.0
    assert lr_factor(3 + 97 // 2, 100, 3, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 48 / 97)))
    assert lr_factor(100, 100, 3, "cosine") == pytest.approx(0.0)
    assert lr_factor(50, 100, 3, "constant") == 1.0


def test_deepspeed_config_follows_the_trial():
    cfg = deepspeed_config(ift_phase(TrialConfig(batch_size=32, workers=2, micro_batch_size=4)), 3, "fp32")
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (32, 4, 4)
    assert cfg["zero_optimization"]["stage"] == 3 and not cfg["bf16"]["enabled"]


def test_sharegpt_conversation_trains_on_assistant_turns_only(tokenizer):
    from forgetray.data.instruct import VICUNA_SYSTEM

    record = {"conversations": [{"from": "human", "value": "say cat"}, {"from": "gpt", "value": "cat"},
                                {"from": "human", "value": "say dog"}, {"from": "gpt", "value": "the dog"}]}
    ex = tokenize_example(record, tokenizer, max_length=512)
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    user1, user2 = enc(f"{VICUNA_SYSTEM} USER: say cat ASSISTANT:"), enc("USER: say dog ASSISTANT:")
    bot1, bot2 = enc(" cat") + [eos], enc(" the dog") + [eos]
    assert ex["input_ids"] == [tokenizer.bos_token_id] + user1 + bot1 + user2 + bot2
    ignore = lambda ids: [IGNORE_INDEX] * len(ids)  # noqa: E731
    assert ex["labels"] == [IGNORE_INDEX] + ignore(user1) + bot1 + ignore(user2) + bot2


@pytest.mark.parametrize("record, message", [
    ({"conversations": []}, "non-empty list of turns"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "no assistant turn"),
    ({"conversations": [{"from": "robot", "value": "hi"}]}, "unknown role 'robot'"),
    ({"conversations": [{"from": "gpt"}]}, "conversations[0] must be an object"),
])
def test_check_sharegpt_records(tmp_path, record, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]})
                    + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=f"chat.jsonl:2: .*{re.escape(message)}"):
        check_instruction_file(path)


def test_mixed_formats_are_refused(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n"
                    + json.dumps({"conversations": [{"from": "gpt", "value": "b"}]}) + "\n")
    with pytest.raises(ValueError, match="mixed.jsonl:2: a sharegpt record in a file of alpaca records"):
        check_instruction_file(path)


def test_sharegpt_file_loads_through_datasets(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    turns = [{"from": "human", "value": "say cat"}, {"from": "gpt", "value": "cat cat"}]
    path.write_text("".join(json.dumps({"id": str(i), "conversations": turns}) + "\n" for i in range(3)))
    ds = tokenize_dataset({"kind": "local", "name": "chat", "path": str(path)}, tokenizer, max_length=512)
    assert len(ds) == 3 and ds[0]["labels"][-1] == tokenizer.eos_token_id
