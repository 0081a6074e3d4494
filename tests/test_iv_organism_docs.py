"""scripts/iv_organism_docs.py: the three questions' numbers come from the trials' logged metrics, paired by seed and
epoch, and the tests are the ones their text names (checked here on hand-made trials whose answers are known)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _module():
    sys.path.insert(0, str(SCRIPTS))  # it imports quickstart_docs for the machine line
    spec = importlib.util.spec_from_file_location("iv_organism_docs", SCRIPTS / "iv_organism_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trial(arm: dict, seed: int, nshot: dict, cosine: dict, facts: dict, ce: dict):
    from forgetray.report.runs import TrialData

    history = {"base/iv_probe/acc_nshot": {0: 1.0}, "base/iv_probe/acc_zero_shot": {0: 0.2},
               "base/iv_probe/acc_injected": {0: 0.9}, "base/iv_probe/acc_random": {0: 0.15},
               "sft/iv_probe/acc_nshot": nshot, "sft/iv_probe/cosine": cosine,
               "sft/iv_probe/acc_nshot_injected": {e: v + 0.1 for e, v in nshot.items()},
               "restored/iv_probe/acc_nshot": {e: 1.0 for e in nshot},
               "sft/iv_probe/acc_zero_shot": {e: 0.2 for e in nshot},
               "sft/iv_probe/acc_injected": {e: 0.5 for e in nshot},
               "base/b/acc": {0: 1.0}, "sft/b/acc": facts, "restored/b/acc": {e: 1.0 for e in nshot},
               ("train/iv/ce" if arm.get("iv_task") else "train/loss"): ce,
               "sft/b/knowledge": facts, "base/b/knowledge": {0: 1.0}, "restored/b/knowledge": {e: 1.0 for e in nshot}}
    settings = {"seed": str(seed), "iv_task": arm.get("iv_task", ""), "iv_degree": str(arm.get("iv_degree", 1.0))}
    return TrialData(f"t{seed}{arm}", "r", "FINISHED", settings, ["b"], {"b": "acc"}, history, {})


def test_the_three_questions_on_trials_with_known_answers():
    docs = _module()
    plain, guided, control = {}, {"iv_task": "organism-colour"}, {"iv_task": "organism-colour", "iv_degree": 0.0}
    trials = []
    for seed in (0, 1, 2):
        # plain: the task falls as the cosine falls (rho = -1 over the 6 checkpoints by construction)
        trials.append(_trial(plain, seed, {1: 0.9 - 0.1 * seed, 2: 0.6 - 0.1 * seed},
                             {1: 0.9 - 0.05 * seed, 2: 0.6 - 0.05 * seed}, {1: 0.9, 2: 0.8}, {1: 3.0, 2: 2.0}))
        # IV-guided keeps more of the task at every (seed, epoch), and learns less (higher CE)
        trials.append(_trial(guided, seed, {1: 0.95, 2: 0.9}, {1: 0.95, 2: 0.9}, {1: 0.95, 2: 0.9}, {1: 4.0, 2: 3.5}))
        trials.append(_trial(control, seed, {1: 0.95, 2: 0.9}, {1: 0.9, 2: 0.9}, {1: 0.95, 2: 0.9}, {1: 4.0, 2: 3.5}))
    table = docs.rows(trials)
    assert len(table) == 18 and set(table["arm"]) == set(docs.ARMS)
    row = table[(table["arm"] == "plain") & (table["seed"] == 1) & (table["epoch"] == 2)].iloc[0]
    assert (row["nshot_sft"], row["nshot_sft_iv"], row["cosine_sft"], row["facts_sft"], row["ce"]) == pytest.approx(
        (0.5, 0.6, 0.55, 0.8, 2.0))
    text = docs.answers(table)
    # 1: the forgotten share rises exactly as the cosine falls
    assert "Spearman rho(cosine, task forgotten) = -1.00" in text
    # 2: the injected vector adds 0.1 at all 6 plain checkpoints: 6 up of 6, exact p = 2 / 2^6
    assert "SFT_e + base IV vs SFT_e: mean +0.100, 6 up / 0 down of 6, sign test p = 0.0312 (3/3 seeds up)" in text
    # 3: IV-guided above plain on the task at all 6 pairs (0.925 vs 0.65 on average); the control equal to it
    assert "- IV-guided vs plain: 5-shot task mean +0.275, 6 up / 0 down of 6, sign test p = 0.0312 (3/3 seeds " \
           "up)" in text
    assert "control vs IV-guided (the vector's own part): 5-shot task mean +0.000, 0 up / 0 down of 6, sign test " \
           "p = 1" in text
    assert "| plain | 1 |" in docs.per_checkpoint(table)
