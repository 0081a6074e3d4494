"""The shipped base weights: a default build installs them (only onto the data and tokenizer they were trained on),
they hold their facts, they are the bytes the project measured, and on the kind of machine that made them, pre-training
again gives them bit for bit (its first steps here: `forgetray organism verify --full` repeats the whole run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from forgetray import organism
from forgetray.organism import OrganismConfig, shipped

CONFIG = OrganismConfig()


@pytest.fixture(scope="module")
def default_build(default_organism) -> Path:
    return default_organism


def _naive_accuracy(model, tokenizer, questions) -> float:
    """Option likelihood by hand: for each option, the summed log-probability of its tokens after the question."""
    right = 0
    for q in questions:
        context = f"Question: {q['question']}\nAnswer:"
        scores = []
        for choice in q["choices"]:
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            full = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[tokenizer.bos_token_id, *full]])
            with torch.no_grad():
                logprobs = model(ids).logits.log_softmax(-1)[0]
            scores.append(sum(logprobs[i, ids[0, i + 1]].item() for i in range(len(ctx), len(full))))
        right += max(range(len(scores)), key=scores.__getitem__) == q["answer"]
    return right / len(questions)


def test_a_default_build_installs_the_shipped_weights_and_each_size_holds_its_facts(default_build):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgetray.data.jsonl import read_jsonl

    manifest = organism.read_manifest(default_build)
    assert manifest["weights"]["source"] == "shipped"
    made = shipped.read_shipped(shipped.shipped_dir(CONFIG))
    questions = list(read_jsonl(default_build / "data" / "organism-facts.jsonl"))
    for size in organism.BASE_MODELS:
        model = AutoModelForCausalLM.from_pretrained(default_build / "models" / size).eval()
        assert shipped.weights_digest(model.state_dict()) == made["models"][size]["weights"], size
        assert manifest["models"][size]["base_option_accuracy"] >= 0.95, size
        # an independent count on a third of the questions (the build's probe scored all of them)
        tokenizer = AutoTokenizer.from_pretrained(default_build / "models" / size)
        assert _naive_accuracy(model, tokenizer, questions[::3]) >= 0.95, size


def test_pretraining_again_gives_the_shipped_weights_bit_for_bit_on_the_machine_kind_that_made_them(default_build):
    made = shipped.read_shipped(shipped.shipped_dir(CONFIG))
    here = shipped.cpu_signature()
    if not shipped.same_machine_kind(made["made_on"], here):
        pytest.skip(f"the shipped weights were made on {made['made_on']}; this machine is {here}: floating point "
                    f"may differ (run `forgetray organism verify` to see)")
    found = shipped.check_digests(CONFIG, default_build, made["check_steps"], progress=lambda _: None)
    assert found == {size: info[f"after_{made['check_steps']}_steps"] for size, info in made["models"].items()}


def test_weights_digest_sees_one_ulp():
    weights = {"a": torch.linspace(-1, 1, 7), "b": torch.ones(2, 3)}
    same = {"b": torch.ones(2, 3), "a": torch.linspace(-1, 1, 7)}
    nudged = {"a": weights["a"].clone(), "b": weights["b"]}
    nudged["a"][3] = torch.nextafter(nudged["a"][3], torch.tensor(1.0))
    assert shipped.weights_digest(weights) == shipped.weights_digest(same)
    assert shipped.weights_digest(weights) != shipped.weights_digest(nudged)
    assert shipped.weights_digest(weights) != shipped.weights_digest({"a": weights["a"].double(), "b": weights["b"]})


def test_weights_are_installed_only_onto_the_inputs_they_were_trained_on():
    made = {"inputs": {"data/a.jsonl": "1", "tokenizer/tokenizer.json": "2"}}
    assert shipped.input_mismatches(made, {"data/a.jsonl": {"sha256": "1"}, "tokenizer/tokenizer.json": {"sha256": "2"},
                                           "manifest.json": {"sha256": "x"}}) == []
    assert shipped.input_mismatches(made, {"data/a.jsonl": {"sha256": "1"},
                                           "tokenizer/tokenizer.json": {"sha256": "3"}}) == ["tokenizer/tokenizer.json"]
    assert shipped.input_mismatches(made, {"data/a.jsonl": {"sha256": "1"}}) == ["tokenizer/tokenizer.json"]
    assert shipped.input_mismatches(made, {"data/a.jsonl": {"sha256": "1"}, "tokenizer/tokenizer.json": {"sha256": "2"},
                                           "data/new.jsonl": {"sha256": "4"}}) == ["data/new.jsonl"]


def test_the_shipped_folder_names_its_machine_and_inputs():
    made = json.loads((shipped.shipped_dir(CONFIG) / "shipped.json").read_text())
    assert made["fingerprint"] == CONFIG.fingerprint()
    assert {"cpu", "kernels", "torch", "build_date"} <= set(made["made_on"])
    assert any(name.startswith("tokenizer/") for name in made["inputs"])
    assert set(made["models"]) == set(organism.BASE_MODELS)
