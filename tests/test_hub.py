"""Hub-hosted benchmarks and passage sets: name parsing and the MMLU/ARC record normalisation (no network)."""

import pytest

from forgetray.data.hub import mc_question, parse, short_name
from forgetray.resources import benchmark_key, resolve_benchmark, resolve_passages
from forgetray.spec import SpecError


def test_names():
    assert parse("hf:cais/mmlu:all@test", "x") == {"repo": "cais/mmlu", "config": "all", "split": "test"}
    assert parse("hf:HuggingFaceFW/fineweb:CC-MAIN-2023-40", "train")["split"] == "train"
    assert short_name("hf:cais/mmlu:all@test") == "mmlu"
    assert short_name("hf:allenai/ai2_arc:ARC-Challenge@test") == "ai2_arc-ARC-Challenge"
    with pytest.raises(ValueError, match="hf:ORG/NAME"):
        parse("hf:mmlu", "test")


def test_mmlu_and_arc_records_normalise():
    mmlu = {"question": "2+2?", "subject": "math", "choices": ["1", "2", "3", "4"], "answer": 3}
    q = mc_question(mmlu, 7)
    assert (q.id, q.choices, q.answer, q.subject) == ("7", ("1", "2", "3", "4"), 3, "math")
    arc = {"id": "Mercury_1", "question": "Which?", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]},
           "answerKey": "C"}
    q = mc_question(arc, 0)
    assert (q.id, q.choices, q.answer) == ("Mercury_1", ("x", "y", "z"), 2)
    numeric = {**arc, "choices": {"text": ["x", "y"], "label": ["1", "2"]}, "answerKey": "2"}
    assert mc_question(numeric, 0).answer == 1


def test_resolution_of_hub_sources():
    bench = resolve_benchmark("hf:cais/mmlu:all@test")
    assert bench["kind"] == "hub" and bench["default_score"] == "letter"
    assert benchmark_key("hf:cais/mmlu:all@test") == "mmlu"
    assert resolve_passages("hf:HuggingFaceFW/fineweb:CC-MAIN-2023-40", "restore_pool")["kind"] == "hub"
    with pytest.raises(SpecError, match="setting 'benchmarks': 'hf:nope' is not of the form"):
        resolve_benchmark("hf:nope")
