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


def test_task_metrics_places_every_summary_key_by_hand():
    # probes.summarize_task's keys for MMLU (acc, letter, per category, macro) and for the lm-eval tasks.
    summary = {"acc": 0.5, "letter": 0.25, "acc_stem": 0.75, "letter_social_sciences": 1, "acc_macro": 0.4,
               "letter_macro": 0.3}
    assert registry.task_metrics("sft", "mmlu", summary) == {
        "sft/mmlu/acc": 0.5, "sft/mmlu/letter_acc": 0.25, "sft/mmlu/group/stem/acc": 0.75,
        "sft/mmlu/group/social_sciences/letter_acc": 1.0, "sft/mmlu/macro/acc": 0.4,
        "sft/mmlu/macro/letter_acc": 0.3}
    got = registry.task_metrics("restored", "arc", {"acc": 1, "acc_norm": 0.125, "mc1": 0.5, "mc2": 0.75})
    assert got == {"restored/arc/acc": 1.0, "restored/arc/acc_norm": 0.125, "restored/arc/mc1": 0.5,
                   "restored/arc/mc2": 0.75}
    assert all(type(v) is float for v in got.values())  # numpy or int scores are logged as floats
    for bad in ("accuracy", "mc1_stem", "mc2_macro", "p_fmt_stem"):
        with pytest.raises(KeyError, match=f"{bad!r} of 'b' is not a declared metric"):
            registry.task_metrics("base", "b", {bad: 0.5})


def test_iv_probe_metric_finds_each_quantity_in_its_own_declaration():
    for metric in (registry.IV_PROBE_BEHAVIOUR, registry.IV_PROBE_VECTOR, registry.IV_PROBE_EXTRACTION,
                   registry.IV_PROBE_OTHER):
        for key in metric.keys:
            assert registry.iv_probe_metric(key) is metric, key
    assert registry.iv_probe_metric("cosine").name(state="sft", key="cosine") == "sft/iv_probe/cosine"
    with pytest.raises(KeyError, match="'ce' is not a quantity of the IV dynamics probe"):
        registry.iv_probe_metric("ce")


def test_declaration_and_naming_errors_by_message():
    with pytest.raises(ValueError, match="^metric 'x/{bench}': unknown step meaning 'lap'$"):
        registry.Metric("x/{bench}", "lap", None, "a bad declaration")
    assert registry.Metric("x/{bench}", "epoch", None, "fine").name(bench="b") == "x/b"
    with pytest.raises(KeyError, match=r"metric '\{state\}/\{bench\}/knowledge' takes fields \('state', 'bench'\), "
                                       r"got \['state'\]"):
        registry.KNOWLEDGE.name(state="sft")
    with pytest.raises(ValueError, match=r"^'nope/b/knowledge' does not fit metric pattern '\{state\}/\{bench\}/"
                                         r"knowledge' \(an unknown state, or a field holding '/'\)$"):
        registry.KNOWLEDGE.name(state="nope", bench="b")
