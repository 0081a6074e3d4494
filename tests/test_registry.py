"""The metric registry: the README's table is the registry's, names built by a metric parse back to it (and to no
other), and a name nobody declared cannot be logged."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from forgetray.metrics import registry

README = Path(__file__).resolve().parents[1] / "README.md"
SAMPLE = {"state": "sft", "bench": "mmlu_test", "k": 2, "epoch": 7, "key": None, "group": "stem"}


def test_readme_metric_table_is_the_registry():
    text = README.read_text()
    block = re.search(r"<!-- metrics:begin[^>]*-->\n(.*?)\n<!-- metrics:end -->", text, re.S)
    assert block, "README has no generated metric table between the metrics:begin/end markers"
    assert block.group(1).strip() == registry.markdown_table(), \
        "README's metric table differs from the registry: run `python -m forgetray.metrics.registry` and paste it"


@pytest.mark.parametrize("metric", registry.METRICS, ids=lambda m: m.pattern)
def test_every_declared_name_parses_back_to_its_own_declaration(metric):
    states = metric.states if "state" in metric.fields else (None,)
    keys = metric.keys if "key" in metric.fields else (None,)
    for state in states:
        for key in keys:
            fields = {f: SAMPLE[f] for f in metric.fields}
            if state:
                fields["state"] = state
            if key:
                fields["key"] = key
            name = metric.name(**fields)
            found = registry.parse(name)
            assert found is not None and found[0] is metric, (name, found)
            report = {"epoch": 3, "global_step": 40, "restore_step": 5, "phase_epoch": 2, "ft_step": 1}
            assert registry.step_of(name, report) == \
                {"epoch": 3, "optimizer step": 40, "restoring step": 5, "phase epoch": 2,
                 "fine-tuning step": 1}[metric.step]


def test_names_by_hand():
    assert registry.KNOWLEDGE.name(state="restored", bench="organism-facts") == "restored/organism-facts/knowledge"
    assert registry.RESTORE_TRAJECTORY.name(epoch=3) == "restore/probe_ppl/epoch_003"
    assert registry.PRIOR_LOSS.name(k=1) == "prior/1/train/loss"
    assert registry.STEPS_FORMAT.name(bench="b", key="p_fmt") == "steps/b/p_fmt"


def test_undeclared_or_malformed_names_are_refused():
    for name in ("sft/b/accuracy", "steps/b/sc", "base/flatness/sc", "restore/probe_ppl/epoch_3", "train/los"):
        assert registry.parse(name) is None, name
        with pytest.raises(KeyError, match="not declared"):
            registry.step_of(name, {"epoch": 1})
    with pytest.raises(ValueError):
        registry.KNOWLEDGE.name(state="sft", bench="a/b")  # a benchmark name may not hold '/'
    with pytest.raises(KeyError):
        registry.KNOWLEDGE.name(state="sft")  # a field missing
    with pytest.raises(KeyError, match="no 'restore_step'"):
        registry.step_of("restore/probe_ppl/epoch_001", {"epoch": 1})
