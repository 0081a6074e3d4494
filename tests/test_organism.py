"""The model organism: deterministic world and build, the promised file formats, the splits the science relies on
(IFT data disjoint from the facts, probing set disjoint from the restoring pool, benchmark only about the held-out
half), tokenizer and models loadable as ordinary Hugging Face directories, and the build cache."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from forgetray import organism
from forgetray.data.jsonl import read_jsonl
from forgetray.organism import OrganismConfig, OrganismNotBuilt, corpus, world
from forgetray.organism.build import write_data
from forgetray.organism.config import DATA_FILES

TEST_CONFIG = OrganismConfig.for_tests()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return organism.build(TEST_CONFIG, root=tmp_path_factory.mktemp("organism") / "root", progress=lambda _: None)


@pytest.fixture(scope="module")
def default_data(tmp_path_factory) -> Path:
    """The data files of the DEFAULT config (generation only, no training: well under a second)."""
    data_dir = tmp_path_factory.mktemp("default") / "data"
    write_data(OrganismConfig(), data_dir)
    return data_dir


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- determinism ---------------------------------------------------------------------------------------------------

def test_world_generation_is_deterministic_and_seeded(tmp_path):
    write_data(TEST_CONFIG, tmp_path / "a")
    write_data(TEST_CONFIG, tmp_path / "b")
    write_data(dataclasses.replace(TEST_CONFIG, seed=1), tmp_path / "c")
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[name] != c[name] for name in a)


def test_build_twice_gives_identical_tokenizer_data_and_weights(built, tmp_path):
    import torch
    from safetensors.torch import load_file

    again = organism.build(TEST_CONFIG, root=tmp_path / "again", progress=lambda _: None)
    first, second = _files(built), _files(again)
    for name in first:
        if name.startswith(("tokenizer/", "data/")) or name.endswith(("tokenizer.json", "config.json")):
            assert first[name] == second[name], name
    for model in organism.BASE_MODELS:
        a = load_file(built / "models" / model / "model.safetensors")
        b = load_file(again / "models" / model / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{model}: {key}"
    assert organism.read_manifest(built)["fingerprint"] == organism.read_manifest(again)["fingerprint"]


# --- file formats --------------------------------------------------------------------------------------------------

def _check_formats(data_dir: Path) -> dict[str, list[dict]]:
    records = {name: read_jsonl(data_dir / file) for name, file in DATA_FILES.items()}
    for r in records["pretrain_corpus"]:
        assert set(r) == {"text"} and isinstance(r["text"], str) and r["text"]
    for r in records[organism.BENCHMARK]:
        assert set(r) == {"id", "question", "choices", "answer", "subject", "entity"}
        assert isinstance(r["question"], str) and isinstance(r["subject"], str) and isinstance(r["entity"], str)
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and all(isinstance(c, str) for c in r["choices"])
        assert isinstance(r["answer"], int) and 0 <= r["answer"] <= 3
    for name in organism.IFT_DATASETS:
        assert records[name]
        for r in records[name]:
            assert set(r) == {"instruction", "input", "output"} and all(isinstance(v, str) for v in r.values())
            assert r["instruction"] and r["output"]
        assert any(r["input"] for r in records[name]) and any(not r["input"] for r in records[name])
    for name in (organism.RESTORING_POOL, organism.PROBE_SET):
        for r in records[name]:
            assert set(r) == {"id", "text"} and isinstance(r["id"], str) and r["text"]
    for name in (organism.BENCHMARK, organism.RESTORING_POOL, organism.PROBE_SET):
        ids = [r["id"] for r in records[name]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate ids"
    return records


def test_every_file_has_the_documented_fields(built, default_data):
    _check_formats(built / "data")
    _check_formats(default_data)


# --- the splits the science relies on ------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["test", "default"])
def test_splits(which, built, default_data):
    config = TEST_CONFIG if which == "test" else OrganismConfig()
    records = _check_formats(built / "data" if which == "test" else default_data)
    w = world.make_world(config.seed, config.n_entities, config.n_values, config.n_templates)
    mentions = lambda text, entity: re.search(rf"\b{re.escape(entity)}\b", text) is not None  # noqa: E731

    # Instruction data never pairs an entity with any of its attribute values.
    for name in organism.IFT_DATASETS:
        for r in records[name]:
            text = " ".join(r.values())
            for entity in w.entities:
                if mentions(text, entity):
                    assert not any(re.search(rf"\b{re.escape(v)}\b", text) for v in w.facts[entity].values()), r

    # Probing set and restoring pool share no passage.
    pool = {r["text"] for r in records[organism.RESTORING_POOL]}
    probe = {r["text"] for r in records[organism.PROBE_SET]}
    assert len(pool) == config.restore_passages and len(probe) == config.probe_passages
    assert not pool & probe

    # The benchmark asks about every fact of the held-out half, which the pool and the probing set never mention...
    bench = records[organism.BENCHMARK]
    assert {r["entity"] for r in bench} == set(w.heldout_entities)
    assert len(bench) == len(w.heldout_entities) * len(w.attributes)
    headers = tuple(h.split("{")[0] for h in (corpus.MC_PAGE_HEADER, corpus.QA_PAGE_HEADER))
    exam_pages = [r["text"] for r in records["pretrain_corpus"] if r["text"].startswith(headers)]
    for entity in w.heldout_entities:
        assert not any(mentions(t, entity) for t in pool | probe)
    # ...while the corpus asks about both halves on its exam pages, and the pool holds pages about the exam half.
    assert config.heldout_exam_pages
    for half in (w.exam_entities, w.heldout_entities):
        assert all(any(mentions(t, entity) for t in exam_pages) for entity in half)
    pool_pages = [t for t in pool if t.startswith(headers)]
    assert len(pool_pages) == round(config.restore_passages * config.pool_page_share)
    # ...but the prose of the corpus states each of its facts.
    prose = [r["text"] for r in records["pretrain_corpus"] if not r["text"].startswith(headers)]
    for r in bench[:20]:
        value = r["choices"][r["answer"]]
        assert any(mentions(t, r["entity"]) and re.search(rf"\b{re.escape(value)}\b", t, re.I) for t in prose)

    # Answer positions are balanced over A-D.
    counts = Counter(r["answer"] for r in bench)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_default_ift_sets_are_alpaca_shaped_and_sized(default_data):
    for name in organism.IFT_DATASETS:
        records = read_jsonl(default_data / DATA_FILES[name])
        assert 200 <= len(records) <= 1000
        assert sum(bool(r["input"]) for r in records) >= len(records) // 5


# --- tokenizer and models ------------------------------------------------------------------------------------------

def test_tokenizer_letters_are_single_tokens_and_nothing_is_added(built):
    from transformers import AutoTokenizer

    for directory in [built / "tokenizer"] + [built / "models" / m for m in organism.BASE_MODELS]:
        tok = AutoTokenizer.from_pretrained(directory)
        for piece in ("A", "B", "C", "D", " A", " B", " C", " D"):
            assert len(tok.encode(piece, add_special_tokens=False)) == 1, piece
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
        ids = tok("Question: Who?\nAnswer: B")["input_ids"]
        assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
        assert tok.decode(ids) == "Question: Who?\nAnswer: B"


def test_models_load_as_hugging_face_directories(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in organism.BASE_MODELS:
        path = organism.model_path(name, root=built)
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert model.config.model_type == "llama" and model.config.max_position_embeddings >= 512
        assert model.config.vocab_size == len(tok)
        ids = torch.tensor([[tok.bos_token_id, *tok.encode("Question: What is it?\nAnswer:")]])
        with torch.no_grad():
            assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))
        info = organism.read_manifest(built)["models"][name]
        assert info["n_params"] == sum(p.numel() for p in model.parameters())


def _naive_option_accuracy(model, tok, questions: list[dict]) -> tuple[int, int]:
    """(correct, near ties), one question and one option at a time, no batching or padding: an option's score is
    the summed log-probability of the tokens of " {choice}" after "[BOS]Question: {question}\nAnswer:", the
    prediction the best-scoring option. A near tie (top two within 1e-4) may go either way under batched kernels."""
    import torch

    correct = near_ties = 0
    for q in questions:
        context = [tok.bos_token_id, *tok.encode(f"Question: {q['question']}\nAnswer:", add_special_tokens=False)]
        scores = []
        for choice in q["choices"]:
            continuation = tok.encode(f" {choice}", add_special_tokens=False)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([context + continuation])).logits[0].double()
            logprobs = torch.log_softmax(logits, dim=-1)
            scores.append(sum(logprobs[len(context) + k - 1, token].item() for k, token in enumerate(continuation)))
        best, second = sorted(scores, reverse=True)[:2]
        near_ties += best - second < 1e-4
        correct += scores.index(best) == q["answer"]
    return correct, near_ties


def test_manifest_accuracies_match_a_naive_option_likelihood_count(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    w = world.make_world(TEST_CONFIG.seed, TEST_CONFIG.n_entities, TEST_CONFIG.n_values, TEST_CONFIG.n_templates)
    question_sets = {
        "base_option_accuracy": read_jsonl(built / "data" / DATA_FILES[organism.BENCHMARK]),
        "exam_half_option_accuracy": corpus.mc_questions(w, w.exam_entities, TEST_CONFIG.seed, "manifest-check"),
    }
    manifest = organism.read_manifest(built)
    for name in organism.BASE_MODELS:
        model = AutoModelForCausalLM.from_pretrained(built / "models" / name).eval()
        tok = AutoTokenizer.from_pretrained(built / "models" / name)
        for key, questions in question_sets.items():
            correct, near_ties = _naive_option_accuracy(model, tok, questions)
            recorded = manifest["models"][name][key] * len(questions)
            assert abs(recorded - correct) <= near_ties + 1e-9, (name, key, recorded, correct, near_ties)


def test_option_likelihood_accuracy_scores_the_continuation():
    import torch

    from forgetray.organism.build import option_likelihood_accuracy
    from forgetray.organism.tokenizer import train_tokenizer

    tok = train_tokenizer(["a cat and a dog and a cow"] * 20 + ["Question: Answer:"] * 5, 300, 64)
    favoured = tok.encode(" cat", add_special_tokens=False)
    assert len(favoured) == 1

    from transformers import LlamaConfig, LlamaForCausalLM

    class AlwaysCat(torch.nn.Module):  # a model that puts all probability on " cat" at every position
        def __init__(self):
            super().__init__()
            # A real tiny Llama underneath gives the probe the KV cache it reuses; its logits are replaced.
            self.inner = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                                      num_hidden_layers=1, num_attention_heads=2,
                                                      num_key_value_heads=2, max_position_embeddings=512))

        def forward(self, input_ids, **kwargs):
            out = self.inner(input_ids=input_ids, **kwargs)
            out.logits = torch.full((*input_ids.shape, len(tok)), -30.0)
            out.logits[..., favoured[0]] = 0.0
            return out

    questions = [
        {"question": "Which?", "choices": ["cat", "dog", "cow", "dog and cow"], "answer": 0},
        {"question": "Which?", "choices": ["dog", "cat", "cow", "cat and dog"], "answer": 3},
    ]
    assert option_likelihood_accuracy(AlwaysCat(), tok, questions) == 0.5


def test_packing_keeps_every_token_in_order():
    from forgetray.organism.pretrain import pack_rows, to_tensors

    docs = [[0, 5, 6, 1], [0, 7, 1], [0, 8, 9, 10, 11, 1]]
    rows = pack_rows(docs, seq_len=5)
    assert rows == [[0, 5, 6, 1, 0], [7, 1, 0, 8, 9], [10, 11, 1]]
    input_ids, labels = to_tensors(rows, seq_len=5, pad_id=2)
    assert input_ids[2].tolist() == [10, 11, 1, 2, 2] and labels[2].tolist() == [10, 11, 1, -100, -100]


# --- the cache -----------------------------------------------------------------------------------------------------

def test_build_is_idempotent(built):
    manifest = (built / "manifest.json").stat().st_mtime_ns
    messages = []
    start = time.perf_counter()
    assert organism.build(TEST_CONFIG, root=built, progress=messages.append) == built
    assert time.perf_counter() - start < 1.0
    assert (built / "manifest.json").stat().st_mtime_ns == manifest
    assert not messages


def test_build_refuses_to_overwrite_another_organism(built, tmp_path):
    with pytest.raises(FileExistsError):
        organism.build(dataclasses.replace(TEST_CONFIG, seed=7), root=built, progress=lambda _: None)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(FileExistsError):
        organism.build(TEST_CONFIG, root=tmp_path / "junk", progress=lambda _: None)


def test_manifest_lists_the_files_with_their_hashes(built):
    import hashlib

    manifest = organism.read_manifest(built)
    assert manifest["fingerprint"] == TEST_CONFIG.fingerprint()
    assert manifest["config"] == json.loads(json.dumps(dataclasses.asdict(TEST_CONFIG)))
    assert set(manifest["models"]) == set(organism.BASE_MODELS)
    for rel, info in manifest["files"].items():
        assert hashlib.sha256((built / rel).read_bytes()).hexdigest() == info["sha256"]
    for name in organism.IFT_DATASETS:
        assert manifest["datasets"][name]["tokens_per_epoch"] > 0


def test_missing_organism_raises_organism_not_built(tmp_path):
    missing = tmp_path / "nothing-here"
    for call in (lambda: organism.model_path("organism-tiny", root=missing),
                 lambda: organism.data_path(organism.BENCHMARK, root=missing)):
        with pytest.raises(OrganismNotBuilt, match="forgetray organism build"):
            call()
    with pytest.raises(ValueError):
        organism.data_path("organism-nope", root=missing)


def test_paths_and_names(built, monkeypatch, tmp_path):
    monkeypatch.delenv("FORGETRAY_ORGANISM", raising=False)
    monkeypatch.setenv("FORGETRAY_HOME", str(tmp_path))
    assert organism.organism_dir() == tmp_path / "organism" / OrganismConfig().fingerprint()
    assert organism.organism_dir(TEST_CONFIG) == tmp_path / "organism" / TEST_CONFIG.fingerprint()
    assert OrganismConfig().fingerprint() != TEST_CONFIG.fingerprint()
    monkeypatch.setenv("FORGETRAY_ORGANISM", str(built))
    assert organism.organism_dir() == built
    assert organism.model_path("organism-small") == built / "models" / "organism-small"
    assert organism.data_path(organism.PROBE_SET) == built / "data" / "organism-probe.jsonl"
    assert organism.build(progress=lambda _: None) == built  # an explicitly named organism is taken as it is
    names = organism.BASE_MODELS + organism.IFT_DATASETS + (organism.BENCHMARK, organism.PROBE_SET,
                                                            organism.RESTORING_POOL)
    assert all(organism.is_organism_name(n) for n in names)
    assert not organism.is_organism_name("meta-llama/Llama-2-7b-hf")
    assert not organism.is_organism_name("./data/alpaca.jsonl")


def test_resolve_name_finds_the_files_or_says_what_is_known(built, tmp_path):
    assert organism.resolve_name("organism-small", "model", root=built) == built / "models" / "organism-small"
    for name, kind in ((organism.BENCHMARK, "benchmark"), (organism.PROBE_SET, "probe_set"),
                       (organism.RESTORING_POOL, "restore_pool"), ("organism-math", "dataset")):
        assert organism.resolve_name(name, kind, root=built) == built / "data" / DATA_FILES[name]
    with pytest.raises(ValueError, match=r"^'organism-facts' is not an organism dataset \(known: organism-alpaca, "
                                         r"organism-math\)$"):
        organism.resolve_name(organism.BENCHMARK, "dataset", root=built)
    with pytest.raises(ValueError, match=r"not an organism restoring pool \(known: organism-restore, "
                                         r"organism-restore-no-home_city, "):
        organism.resolve_name(organism.PROBE_SET, "restore_pool", root=built)
    with pytest.raises(ValueError, match="run `forgetray organism build`"):
        organism.resolve_name("organism-tiny", "model", root=tmp_path / "nothing-here")


def test_trial_settings_name_the_setting_in_organism_errors(built, monkeypatch, tmp_path):
    from forgetray import resources
    from forgetray.spec import SpecError

    monkeypatch.setenv("FORGETRAY_ORGANISM", str(built))
    resources.clear_cache()
    try:
        assert resources.resolve_model("organism-tiny")["path"] == str(built / "models" / "organism-tiny")
        assert resources.resolve_benchmark(organism.BENCHMARK)["default_score"] == "acc"
        with pytest.raises(SpecError, match=r"^setting 'restore_pool': 'organism-probe' is not an organism restoring"):
            resources.resolve_passages(organism.PROBE_SET, "restore_pool")
        with pytest.raises(SpecError, match=r"^setting 'model': 'organism-huge' is not an organism model \(known: "):
            resources.resolve_model("organism-huge")
        monkeypatch.setenv("FORGETRAY_ORGANISM", str(tmp_path / "nothing-here"))
        resources.clear_cache()
        with pytest.raises(SpecError, match=r"^setting 'dataset': no built organism at .*forgetray organism build"):
            resources.resolve_dataset("organism-alpaca")
    finally:
        resources.clear_cache()


# --- the demonstration pages (what organism-icl reads besides the corpus) -------------------------------------------

def test_demonstration_pages_name_no_attribute_and_state_every_fact_repeats_times(default_data):
    config = OrganismConfig()
    w = world.make_world(config.seed, config.n_entities, config.n_values, config.n_templates)
    pages = [r["text"] for r in read_jsonl(default_data / DATA_FILES["pretrain_demonstrations"])]
    owner = {v: key for key, values in w.values.items() for v in values}  # the value sets are disjoint
    assert len(owner) == sum(len(v) for v in w.values.values())
    seen: Counter = Counter()
    for page in pages:
        pairs = [block.split("\n") for block in page.split("\n\n")]
        assert len(pairs) <= config.demonstration_page_size
        keys = set()
        for q, a in pairs:
            entity, value = q.removeprefix("Q: "), a.removeprefix("A: ")
            assert q == f"Q: {entity}" and a == f"A: {value}" and entity in w.facts
            keys.add(owner[value])
            assert w.facts[entity][owner[value]] == value  # a true fact
            seen[entity, owner[value]] += 1
        assert len(keys) == 1, page  # one attribute a page...
        words = {"city", "colour", "profession", "food", "pet", "question", "answer"}
        assert not words & set(re.findall(r"[a-z]+", page.lower())), page  # ...which no word on it names
    assert set(seen.values()) == {config.demonstration_repeats}
    assert len(seen) == len(w.entities) * len(w.attributes)
    # The quickstart's sizes read the corpus alone; organism-icl reads the pages too.
    specs = {spec.name: spec for spec in config.models}
    assert [specs[name].corpus for name in organism.MODEL_SIZES] == [("pretrain_corpus",)] * 2
    assert specs[organism.ICL_MODEL].corpus == ("pretrain_corpus", "pretrain_demonstrations")
