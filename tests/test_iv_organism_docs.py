"""scripts/iv_organism_docs.py: the three questions' numbers come from the trials' logged metrics, every test takes the
seed as its unit (per-seed summaries, then the test across the seeds), and the text says what each found (checked
here on hand-made trials, 4 arms x 6 seeds x 2 epochs, whose answers are computed by hand)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SEEDS = range(6)


def _module():
    sys.path.insert(0, str(SCRIPTS))  # it imports quickstart_docs for the machine line
    spec = importlib.util.spec_from_file_location("iv_organism_docs", SCRIPTS / "iv_organism_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trial(arm: dict, seed: int, nshot: dict, cosine: dict, facts: dict, ce: dict):
    from forgetray.report.runs import TrialData

    epochs = list(nshot)
    history = {"base/iv_probe/acc_nshot": {0: 1.0}, "base/iv_probe/acc_nshot_random": {0: 0.97},
               "base/iv_probe/acc_nshot_other": {0: 0.6}, "base/iv_probe/acc_zero_shot": {0: 0.2},
               "base/iv_probe/acc_injected": {0: 0.9}, "base/iv_probe/acc_random": {0: 0.15},
               "base/iv_probe/acc_other": {0: 0.1}, "base/iv_probe/vector_norm": {0: 5.0},
               "base/iv_probe/other_norm": {0: 4.0}, "base/iv_probe/other_cosine": {0: 0.1},
               "sft/iv_probe/acc_nshot": nshot, "sft/iv_probe/cosine": cosine,
               # the base vector adds 0.1, random vectors of its norm 0.02, the other attribute's vector -0.01
               "sft/iv_probe/acc_nshot_injected": {e: v + 0.1 for e, v in nshot.items()},
               "sft/iv_probe/acc_nshot_random": {e: v + 0.02 for e, v in nshot.items()},
               "sft/iv_probe/acc_nshot_other": {e: v - 0.01 for e, v in nshot.items()},
               "restored/iv_probe/acc_nshot": {e: 0.9 for e in epochs},
               "sft/iv_probe/acc_zero_shot": {e: 0.2 for e in epochs},
               "sft/iv_probe/acc_injected": {e: 0.5 for e in epochs},
               "sft/iv_probe/acc_random": {e: 0.2 for e in epochs},  # a tie with SFT_e: not counted by the sign test
               "sft/iv_probe/acc_other": {e: 0.25 for e in epochs},
               ("train/iv/ce" if arm.get("iv_task") else "train/loss"): ce,
               "sft/b/knowledge": facts, "base/b/knowledge": {0: 1.0}, "restored/b/knowledge": {e: 1.0 for e in epochs}}
    settings = {"seed": str(seed), "iv_task": arm.get("iv_task", ""), "iv_degree": str(arm.get("iv_degree", 1.0)),
                "lr": str(arm.get("lr", 0.005))}
    return TrialData(f"t{seed}{arm}", "r", "FINISHED", settings, ["b"], {"b": "acc"}, history, {})


def _trials() -> list:
    plain, matched = {}, {"lr": 0.0007}
    guided, control = {"iv_task": "organism-colour"}, {"iv_task": "organism-colour", "iv_degree": 0.0}
    trials = []
    for k in SEEDS:
        # plain: a seed whose vector moved less (higher cosine) forgets less of the task and more of the facts, at
        # both epochs, beside a trend all seeds share (cosine 0.9 -> 0.7, task 0.5 -> 0.4)
        trials.append(_trial(plain, k, {1: 0.5 + 0.02 * k, 2: 0.4 + 0.02 * k}, {1: 0.9 + 0.01 * k, 2: 0.7 + 0.01 * k},
                             {1: 0.95 - 0.01 * k, 2: 0.9 - 0.01 * k}, {1: 3.0, 2: 1.8}))
        trials.append(_trial(matched, k, {1: 0.8, 2: 0.75}, {1: 0.95, 2: 0.9}, {1: 0.97, 2: 0.96}, {1: 4.5, 2: 3.8}))
        trials.append(_trial(guided, k, {1: 0.95, 2: 0.9}, {1: 0.95, 2: 0.95}, {1: 0.99, 2: 0.98}, {1: 4.4, 2: 3.7}))
        trials.append(_trial(control, k, {1: 0.95, 2: 0.92}, {1: 0.9, 2: 0.9}, {1: 0.99, 2: 0.985}, {1: 4.6, 2: 3.9}))
    return trials


def test_rows_read_the_metrics_and_name_the_arms():
    docs = _module()
    table = docs.rows(_trials())
    assert len(table) == 48 and list(dict.fromkeys(table["arm"])) == list(docs.ARMS)
    row = table[(table["arm"] == docs.PLAIN) & (table["seed"] == 1) & (table["epoch"] == 2)].iloc[0]
    assert (row["nshot_sft"], row["nshot_sft_iv"], row["nshot_sft_random"], row["nshot_sft_other"], row["cosine_sft"],
            row["facts_sft"], row["ce"], row["task_forgot"], row["facts_forgot"]) == pytest.approx(
        (0.42, 0.52, 0.44, 0.41, 0.71, 0.89, 1.8, 0.58, 0.11))
    assert set(table[table["lr"] == 0.0007]["arm"]) == {docs.MATCHED}


def test_every_answer_is_a_test_across_seeds():
    docs = _module()
    text = docs.answers(docs.rows(_trials()))
    assert "with 6 seeds the smallest two-sided p is 2 x 0.5^6 = 0.0312, 5 of 6 gives 0.219" in text
    # 1: within each epoch, task forgotten falls exactly as the cosine rises (r = -1) and held-out facts forgotten
    # rise with it (r = +1); of the 720 seed permutations only the identity and the reversal reach |r| = 1
    assert "- plain (6 seeds x 2 epochs; cosine 0.70-0.95): r(cosine, task forgotten) = -1.00 (p = 0.00278;" in text
    assert "r(cosine, held-out facts forgotten) = +1.00 (p = 0.00278;" in text
    # 2: per seed the mean over the 2 epochs; the base vector beats SFT_e by 0.1, random vectors by 0.08 and the
    # other attribute's vector by 0.11 in every seed: 6 of 6, p = 2 / 2^6
    assert "+ base IV vs SFT_e +0.100 (6 up / 0 down of 6 seeds, sign test p = 0.0312)" in text
    assert "+ base IV vs + random +0.080 (6 up / 0 down of 6 seeds, sign test p = 0.0312)" in text
    assert "+ base IV vs + other attribute's vector +0.110 (6 up / 0 down of 6 seeds, sign test p = 0.0312)" in text
    # R_e (0.9) vs SFT_e (per seed 0.45 + 0.02 k: 0.50 on average): +0.400
    assert "R_e (0.900) vs SFT_e +0.400 (6 up / 0 down of 6 seeds, sign test p = 0.0312)" in text
    # zero-shot: random vectors leave SFT_e's 0.2 as it is, the base vector gives 0.5, the other vector 0.25
    assert "- zero-shot (SFT_e 0.200, + base IV 0.500, + random 0.200, + other 0.250): + base IV vs SFT_e +0.300 " \
           "(6 up / 0 down of 6 seeds, sign test p = 0.0312); + base IV vs + random +0.300" in text
    # the matched arm's cosine and forgetting do not vary within an epoch: no correlation to state; and a tie in every
    # seed counts for neither side
    assert "- plain, learning-matched (6 seeds x 2 epochs; cosine 0.90-0.95): r(cosine, task forgotten) undefined" \
           in text
    assert "cosine +0.000 (0 up / 0 down of 6 seeds, sign test p = 1)" in text
    # 3: at the last epoch; the matched arm's CE 3.8 against the guided arm's 3.7
    assert "final training CE plain 1.800, plain, learning-matched (lr 0.0007) 3.800, IV-guided 3.700, control " \
           "(degree 0) 3.900; learning-matched / IV-guided = 1.03" in text
    # IV-guided forgets 0.1 of the task, plain 0.6 - 0.02 k (0.55 on average), the matched arm 0.25
    assert "- IV-guided vs plain: 5-shot task forgotten -0.450 (0 up / 6 down of 6 seeds, sign test p = 0.0312)" \
           in text
    assert "- IV-guided vs plain, learning-matched: 5-shot task forgotten -0.150 (0 up / 6 down of 6 seeds, sign " \
           "test p = 0.0312); held-out facts forgotten -0.020 (0 up / 6 down of 6 seeds, sign test p = 0.0312); " \
           "training CE -0.100" in text
    assert "- control (degree 0) vs IV-guided: 5-shot task forgotten -0.020" in text
    assert "forgetting_vs_ce.png" in text


def test_the_table_and_the_figure(tmp_path):
    docs = _module()
    table = docs.rows(_trials())
    markdown = docs.per_checkpoint(table)
    assert "| plain, learning-matched | 2 | 0.750 | 0.850 | 0.770 | 0.740 | 0.900 |" in markdown
    docs.figure(table, tmp_path / docs.FIGURE)
    assert (tmp_path / docs.FIGURE).stat().st_size > 10_000
