"""scripts/quickstart_docs.py: the README's quickstart block is the pooled table read back per replicate, and the
block between the markers is what gets replaced."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quickstart_docs.py"


def _module():
    spec = importlib.util.spec_from_file_location("quickstart_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(epoch, stage, replicate_stages, agreeing, restored, sft, r):
    return {"group": "g1", "label": "model=organism-tiny, dataset=organism-alpaca (seeds 0,1,2)", "epoch": epoch,
            "stage": stage, "replicate_stages": replicate_stages, "agreeing": agreeing, "restored": restored,
            "transition_median": 2.0, "transition_low": 2.0, "transition_high": 3.0, "transition_reached": "3/3",
            "knowledge_base_mean": 1.0, "knowledge_sft_mean": sft, "knowledge_restored_mean": r}


def test_each_replicates_sequence_is_read_across_the_checkpoints():
    docs = _module()
    pooled = pd.DataFrame([
        _rows(2, "actual_forgetting", "actual,actual,pseudo", "2/3", "3/3", 0.80, 0.95),
        _rows(1, "pseudo_forgetting", "pseudo,pseudo,not restored", "2/3", "2/3", 0.90, 0.99),
    ])
    (row,) = docs.summary_rows(pooled)
    assert row["epochs"] == "1 2"
    assert row["replicates"] == ["P A", "P A", "x P"]  # seed 2: not restored at epoch 1, pseudo at 2
    assert row["pooled"] == "P A" and row["agreeing"] == "2 2" and row["restored"] == "2 3"
    assert row["transition"] == "2 (2-3; 3/3 reached actual)"
    assert row["worst sft"] == "0.800" and row["worst R"] == "0.950"
    table = docs.markdown([row], "a machine", "2026-01-01")
    assert "| model=organism-tiny, dataset=organism-alpaca | 1 2 | P A | P A | x P | P A | 2 2 |" in table
    assert "a machine" in table
