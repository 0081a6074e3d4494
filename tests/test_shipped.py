"""The shipped base weights: a default build installs them (only onto the data and tokenizer they were trained on),
they hold their facts, they are the bytes the project measured, and on the kind of machine that made them, pre-training
again gives them bit for bit (its first steps here: `forgetray organism verify --full` repeats the whole run); on any
other CPU its first steps train the same model within floating-point noise (a wrong data order or learning rate
would not)."""

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


# The first CHECK_STEPS steps of pre-training on any CPU: their update (weights after them minus the initial weights)
# projected on PROJECTIONS seeded Gaussian vectors, per size, as the shipped weights' machine kind computes it (made
# with `update_fingerprints` on an Intel Xeon, AVX512, torch 2.13.0+cpu, where the digests of those weights are
# shipped.json's: the bit-for-bit test below passes there). For random projections ||P(x)|| / sqrt(PROJECTIONS)
# estimates ||x||, so the relative distance of two fingerprints estimates ||update - reference|| / ||reference||.
PROJECTIONS = 8
UPDATE_REFERENCE = {"fingerprint": "99ac8b235f8d738e", "steps": 50, "projections": {
    "organism-tiny": [
        32.85723979525415, -3.7639260035113793, -10.045168504927158, 27.577443528024943,
        50.1021513531244, -83.22518114747847, 32.192316507732144, -35.191052521079406],
    "organism-small": [
        37.27140850486219, -28.68750058473384, -23.978339592648613, -32.00644315559558,
        -14.164450446615591, 23.23271567457288, 43.19543991393049, -2.0714236641028325],
    "organism-icl": [
        27.735442063681372, -12.108073858729554, -7.75008860795308, -24.68666051097302,
        -29.433461146416573, 18.458380086265322, 44.83897886798837, 13.670692740047038],
}}
# The relative distance allowed. Measured on the shipping machine kind (Intel Xeon, torch 2.13.0+cpu), per size
# tiny / small / icl: the same run on another CPU kernel level, as another CPU would dispatch (ATEN_CPU_CAPABILITY=avx2:
# 1.4e-7 / 2.6e-7 / 1.8e-7; =default, no vector kernels: 1.2e-6 / 3.5e-7 / 1.7e-6) against two bugs: the learning
# rate x 2 (0.50 / 0.52 / 0.76) and another data order (each epoch's shuffle seeded differently: 0.16 / 0.24 / 0.37).
# 1e-3 is ~600x the largest float noise measured (room for a CPU that rounds differently again) and ~150x below the
# smallest bug.
UPDATE_TOLERANCE = 1e-3


def _projections(update: dict[str, torch.Tensor]) -> list[float]:
    """The update (name -> float64 tensor) projected on PROJECTIONS Gaussian vectors (seeds 0..PROJECTIONS-1), over
    all tensors in name order."""
    out = []
    for k in range(PROJECTIONS):
        generator = torch.Generator().manual_seed(k)
        out.append(sum(float(torch.dot(torch.randn(update[name].numel(), generator=generator, dtype=torch.float64),
                                       update[name].flatten())) for name in sorted(update)))
    return out


def update_fingerprints(root: Path, steps: int) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Pre-train every size of the default organism at `root` for `steps` steps (as `shipped.check_digests`): per
    size, the projections of the update and the digest of the weights after the steps."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from forgetray.organism.config import DATA_FILES
    from forgetray.organism.pretrain import deterministic_torch, llama_config, pretrain, read_corpus, settings_of

    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    settings = settings_of(CONFIG)
    fingerprints, digests = {}, {}
    for spec in CONFIG.models:
        with deterministic_torch(settings.num_threads):  # pretrain's initialisation, redone: the weights at step 0
            torch.manual_seed(settings.seed)
            start = LlamaForCausalLM(llama_config(spec, settings, tokenizer)).state_dict()
        texts = read_corpus([root / "data" / DATA_FILES[name] for name in spec.corpus])
        after = pretrain(spec, settings, tokenizer, texts, lambda _: None, max_steps=steps).model.state_dict()
        digests[spec.name] = shipped.weights_digest(after)
        fingerprints[spec.name] = _projections({name: after[name].double() - start[name].double() for name in after})
    return fingerprints, digests


def relative_distance(found: list[float], reference: list[float]) -> float:
    return float(torch.tensor(found, dtype=torch.float64).sub(torch.tensor(reference, dtype=torch.float64)).norm()
                 / torch.tensor(reference, dtype=torch.float64).norm())


@pytest.fixture(scope="module")
def first_steps(default_build) -> tuple[dict, dict, dict]:
    """(shipped.json, the update fingerprints, the digests) after the shipped check's steps, pre-trained here."""
    made = shipped.read_shipped(shipped.shipped_dir(CONFIG))
    fingerprints, digests = update_fingerprints(default_build, made["check_steps"])
    return made, fingerprints, digests


def test_the_first_pretraining_steps_match_the_reference_on_any_cpu(first_steps):
    """Across CPUs the bits differ (see the test below), but not the training: the first steps' update is the
    reference's within UPDATE_TOLERANCE, which a wrong data order or learning rate exceeds many times over."""
    made, fingerprints, _ = first_steps
    made_for = (UPDATE_REFERENCE["fingerprint"], UPDATE_REFERENCE["steps"])
    assert (CONFIG.fingerprint(), made["check_steps"]) == made_for, \
        "the organism's config changed: remake UPDATE_REFERENCE with update_fingerprints on the shipping machine"
    distances = {size: relative_distance(fingerprints[size], reference)
                 for size, reference in UPDATE_REFERENCE["projections"].items()}
    assert set(distances) == set(organism.BASE_MODELS)
    assert all(d < UPDATE_TOLERANCE for d in distances.values()), distances


def test_pretraining_again_gives_the_shipped_weights_bit_for_bit_on_the_machine_kind_that_made_them(first_steps):
    made, _, digests = first_steps
    here = shipped.cpu_signature()
    if not shipped.same_machine_kind(made["made_on"], here):
        pytest.skip(f"the shipped weights were made on {made['made_on']}; this machine is {here}: floating point "
                    f"may differ (run `forgetray organism verify` to see; the test above compares at a tolerance)")
    assert digests == {size: info[f"after_{made['check_steps']}_steps"] for size, info in made["models"].items()}


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
