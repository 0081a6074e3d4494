"""The report's re-injection table (issue 12 item 3; docs/methods.md §8, "our choice"): re-injecting the base
model's instruction vector as a training-free restoration, beside restoration training, checkpoint by checkpoint.
Built from `TrialData` alone, from the dynamics probe's metrics (`{state}/iv_probe/<key>`, setting iv_probe_task).

Per trial x checkpoint x prompt kind (`BASES`: the probe task's zero-shot queries, and its n-shot prompts, where a
task the demonstrations define is done; first-answer-token accuracy): the base, SFT_e, SFT_e
with the base vector injected, R_e (and R_e injected), the gap base - SFT_e, the share of the gap each restoration
recovers ((acc - acc_sft) / gap), and which of them recovers at least RECOVERED_SHARE of it: "both", "IV only",
"R only", "neither" ("no loss" where SFT_e lost nothing). Where both recover, the two restorations agree that the
forgetting was of the instruction pattern (pseudo); where only R_e does, the vector does not carry what was lost.
The vector's cosine to the base and the head overlap of SFT_e and R_e, and the checkpoint's stage (judged on the
primary benchmark, not on this task), are shown beside them; and SFT_e with the controls injected instead (random
vectors of the base vector's norm; with iv_probe_other_task, another task's base vector): a recovery they match is
not the task's vector.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from forgetray.metrics import registry
from forgetray.report.runs import TrialData, short

REINJECTION_CSV = "reinjection_table.csv"
RECOVERED_SHARE = 0.5  # a restoration "recovers" a checkpoint when it brings back at least this share of the gap
# prompt kind -> (accuracy, with the base vector injected, with random vectors of its norm, with the other task's
# vector): the probe's keys
BASES = {"zero-shot": ("acc_zero_shot", "acc_injected", "acc_random", "acc_other"),
         "n-shot": ("acc_nshot", "acc_nshot_injected", "acc_nshot_random", "acc_nshot_other")}
COLUMNS = ["prompts", "epoch", "acc_base", "acc_sft", "acc_sft_iv", "acc_sft_random", "acc_sft_other", "acc_restored",
           "acc_restored_iv", "gap", "share_iv", "share_restored", "recovers", "cosine_sft", "cosine_restored",
           "overlap_sft", "overlap_restored", "p_knowledge_sft", "p_instruction_sft", "stage"]
TEXT = {"prompts": ("prompts", None), "epoch": ("epoch", "{:d}"), "acc_base": ("base", "{:.3f}"), "acc_sft": ("sft", "{:.3f}"),
        "acc_sft_iv": ("sft+IV", "{:.3f}"), "acc_sft_random": ("sft+rand", "{:.3f}"),
        "acc_sft_other": ("sft+other", "{:.3f}"), "acc_restored": ("R", "{:.3f}"), "share_iv": ("IV share", "{:+.2f}"),
        "share_restored": ("R share", "{:+.2f}"), "recovers": ("recovers", None), "cosine_sft": ("cos sft", "{:.3f}"),
        "overlap_sft": ("heads sft", "{:.2f}"), "p_knowledge_sft": ("P(y|x)", "{:.3f}"),
        "p_instruction_sft": ("P(y_c|c,x)", "{:.3f}"), "stage": ("stage", None)}


def _value(trial: TrialData, state: str, key: str, epoch: int) -> float:
    name = registry.iv_probe_metric(key).name(state=state, key=key)
    return trial.at(name, 0 if state == "base" else epoch)


def share(recovered: float, sft: float, gap: float) -> float:
    """The share of the gap (base - sft) that a restoration's accuracy `recovered` brings back; nan without a gap."""
    if not (gap > 0) or math.isnan(recovered):
        return math.nan
    return (recovered - sft) / gap


def verdict(gap: float, share_iv: float, share_restored: float, threshold: float = RECOVERED_SHARE) -> str | None:
    """Which restorations recover at least `threshold` of the gap; None where it cannot be said."""
    if math.isnan(gap):
        return None
    if gap <= 0:
        return "no loss"
    iv, restored = share_iv >= threshold, share_restored >= threshold  # nan compares False
    if math.isnan(share_restored):
        return "IV" if iv else "not IV"
    return {(True, True): "both", (True, False): "IV only", (False, True): "R only",
            (False, False): "neither"}[(iv, restored)]


def _rows(trial: TrialData, varying: list[str]) -> list[dict[str, Any]]:
    rows = []
    for basis, keys in BASES.items():
        for epoch in trial.epochs:
            sft = _value(trial, "sft", keys[0], epoch)
            if not math.isnan(sft):
                rows.append(_row(trial, varying, basis, keys, epoch, sft))
    return rows


def _row(trial: TrialData, varying: list[str], basis: str, keys: tuple[str, ...], epoch: int, sft: float
         ) -> dict[str, Any]:
    acc, injected, random, other = keys
    row: dict[str, Any] = {"trial": trial.name, **{key: trial.settings.get(key) for key in varying},
                           "prompts": basis, "epoch": epoch, "acc_base": _value(trial, "base", acc, epoch),
                           "acc_sft": sft, "acc_sft_iv": _value(trial, "sft", injected, epoch),
                           "acc_sft_random": _value(trial, "sft", random, epoch),
                           "acc_sft_other": _value(trial, "sft", other, epoch),
                           "acc_restored": _value(trial, "restored", acc, epoch),
                           "acc_restored_iv": _value(trial, "restored", injected, epoch)}
    row["gap"] = row["acc_base"] - sft
    row["share_iv"] = share(row["acc_sft_iv"], sft, row["gap"])
    row["share_restored"] = share(row["acc_restored"], sft, row["gap"])
    row["recovers"] = verdict(row["gap"], row["share_iv"], row["share_restored"])
    for state in ("sft", "restored"):
        row[f"cosine_{state}"] = _value(trial, state, "cosine", epoch)
        row[f"overlap_{state}"] = _value(trial, state, "head_overlap", epoch)
    row["p_knowledge_sft"] = _value(trial, "sft", "p_knowledge", epoch)
    row["p_instruction_sft"] = _value(trial, "sft", "p_instruction", epoch)
    row["stage"] = trial.stage(epoch)
    return row


def reinjection_table(trials: list[TrialData], varying: list[str]) -> pd.DataFrame:
    """One row per trial x checkpoint that the dynamics probe measured; empty when no trial ran it."""
    rows = [row for trial in trials for row in _rows(trial, varying)]
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows, columns=["trial", *varying, *COLUMNS])


def _cell(value: Any, fmt: str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt is None:
        from forgetray.report.tables import STAGE_SHORT

        return STAGE_SHORT.get(value, str(value))
    return fmt.format(int(value) if fmt == "{:d}" else float(value))


def reinjection_text(table: pd.DataFrame, varying: list[str]) -> str:
    """The table for a terminal, with the line that says how to read it."""
    shown = {"trial": table["trial"].astype(str)}
    for key in varying:
        shown[key] = table[key].map(short)
    for column, (heading, fmt) in TEXT.items():
        shown[heading] = [_cell(v, fmt) for v in table[column]]
    head = (f"re-injection as a training-free restoration (IV dynamics probe; first-answer-token accuracy on the "
            f"probe task's zero-shot queries and n-shot prompts): sft+IV = SFT_e with the base instruction vector "
            f"injected (sft+rand: random vectors of its norm instead, sft+other: another task's base vector), R = R_e "
            f"after restoration training; share = (acc - sft) / (base - sft); recovers = the restorations that bring "
            f"back >= {RECOVERED_SHARE:g} of the gap (both: they agree the forgetting was of the instruction "
            f"pattern); cos/heads = SFT_e's vector vs the base's (cosine, top-k head overlap); stage = the "
            f"checkpoint's stage on the primary benchmark:")
    return head + "\n" + pd.DataFrame(shown).to_string(index=False)
