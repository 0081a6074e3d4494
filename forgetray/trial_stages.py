"""Classify every checkpoint of a trial as no / pseudo / actual forgetting, inconclusive or not restored
(docs/methods.md §4's margin rule) and log it.

Inputs are the trial's own files: per-question probe results of the base model, of every SFT_e checkpoint, of every
restored R_e and of the control R_0 (the start through the same restoration), and their probing perplexities. The
rule itself is pure (`metrics.margin`; the reported variants in `metrics.stage`); this module only lines the
questions up, picks the primary benchmark and score, and writes the outcome to MLflow: `stage/*` metrics at step =
epoch (the headline `stage/code` at `stage_margin`, the verdicts at the reported margins, the drop, residual and
recoverable share with their intervals, the test and fixed-threshold variants), a `forgetray.stage.epoch_NNN` tag per
checkpoint, `forgetray.transition_epoch` (the margin rule's), `forgetray.replicate_group`
(`grids.replicate_group`), and `stages/per_question_<bench>.parquet` + `stages/stages.csv` artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from forgetray.grids import TAG_REPLICATE_GROUP, replicate_group
from forgetray.metrics import margin, registry
from forgetray.metrics.stage import STAGE_CODES, classify_checkpoint, classify_fixed, transition_epoch
from forgetray.plan import checkpoint_name, restore_phase
from forgetray.tracking import TAG_STAGE_BENCHMARK, TAG_TRANSITION, stage_tag

# The per-question correctness the stage rule pairs, by primary score (question files and tasks alike; mc2 has none).
CORRECT_COLUMN = {"letter": "letter_correct", "acc": "acc_correct", "acc_norm": "acc_norm_correct",
                  "mc1": "mc1_correct"}
def classify_trial(tracker, run_id: str, trial, resolved: dict, dirs: dict, checkpoints: list[Path]) -> pd.DataFrame:
    bench, info = next(iter(resolved["benchmarks"].items()))  # the first benchmark is the stage's primary one
    column = CORRECT_COLUMN[info["score"]]
    base_dir, control_dir = Path(dirs["base_eval_dir"]), Path(dirs["control_dir"])
    base = pd.read_parquet(base_dir / f"{bench}.parquet").set_index("index")[column]
    control = pd.read_parquet(control_dir / f"{bench}.parquet").set_index("index")[column]
    base_ppl = json.loads((base_dir / "summary.json").read_text())[registry.PROBE_PPL.name(state="base")]
    control_ppl = json.loads((control_dir / "summary.json").read_text())[registry.PROBE_PPL.name(state="control")]
    level = margin.epoch_level(trial.stage_alpha, len(checkpoints))  # Bonferroni over the trial's epochs

    rows, per_question = [], []
    for checkpoint in checkpoints:
        epoch = int(checkpoint.name.split("_")[1])
        restored_name = checkpoint_name(restore_phase(trial, epoch), epoch)
        restored_dir = restored_checkpoint(Path(dirs["trial_dir"]), restored_name)
        sft = pd.read_parquet(checkpoint / "probes" / f"{bench}.parquet").set_index("index")[column]
        restored = pd.read_parquet(restored_dir / "probes" / f"{bench}.parquet").set_index("index")[column]
        sft_ppl = _state_metric(checkpoint, registry.PROBE_PPL.name(state="sft"))
        restored_ppl = _state_metric(restored_dir, registry.PROBE_PPL.name(state="restored"))
        b, s, r, c = (x.loc[base.index].to_numpy(dtype=bool) for x in (base, sft, restored, control))
        found = margin.deltas(b, s, r, c, level=level, seed=margin.epoch_seed(trial.seed, epoch))
        restored_ok = margin.within_control(control_ppl, restored_ppl, trial.ppl_tolerance)
        tested = classify_checkpoint(b, s, r, base_ppl, restored_ppl, test=trial.stage_test, alpha=trial.stage_alpha,
                                     ppl_tolerance=trial.ppl_tolerance)
        fixed = classify_fixed(b.mean(), s.mean(), r.mean(), base_ppl, restored_ppl, tau=trial.stage_tau,
                               ppl_tolerance=trial.ppl_tolerance)
        rows.append({"epoch": epoch, **margin.verdicts(found, trial.stage_margin, restored_ok),
                     "restored_ok": restored_ok, "margin": trial.stage_margin,
                     **margin.interval_columns(found),
                     "stage_test": tested.stage, "stage_fixed": fixed.stage, "acc_base": b.mean(),
                     "acc_control": c.mean(), "acc_sft": s.mean(), "acc_restored": r.mean(), "d_sft": tested.d_sft,
                     "d_restored": tested.d_restored, "p_sft": tested.p_sft, "p_restored": tested.p_restored,
                     "ppl_base": base_ppl, "ppl_control": control_ppl, "ppl_sft": sft_ppl,
                     "ppl_restored": restored_ppl})
        per_question.append(pd.DataFrame({"epoch": epoch, "index": base.index, "base_correct": b,
                                          "sft_correct": s, "restored_correct": r, "control_correct": c}))
    table = pd.DataFrame(rows)
    # The grid point without its seed: what the report pools the replicates of a `replicates=n` sweep by.
    tracker.set_tag(run_id, TAG_REPLICATE_GROUP, replicate_group(trial))
    _log(tracker, run_id, bench, table, pd.concat(per_question, ignore_index=True) if per_question else None)
    return table


def restored_checkpoint(trial_dir: Path, name: str) -> Path:
    """Where R_e's checkpoint `name` is: inside whichever restoring group's Ray Train run restored it."""
    # a restoring group's Ray Train run, or the IFT phase's own (restore_group=0)
    found = sorted(trial_dir.glob(f"restore_*/{name}")) + sorted(trial_dir.glob(f"ift/{name}"))
    if not found:
        raise FileNotFoundError(f"no restored checkpoint {name} under {trial_dir}")
    return found[-1]


def _state_metric(checkpoint_dir: Path, name: str) -> float:
    return float(json.loads((checkpoint_dir / "state.json").read_text())["metrics"][name])


def _log(tracker, run_id: str, bench: str, table: pd.DataFrame, per_question: pd.DataFrame | None) -> None:
    for row in table.to_dict("records"):
        values = {registry.STAGE_CODE.name(): STAGE_CODES[row["stage"]],
                  registry.STAGE_TEST_CODE.name(): STAGE_CODES[row["stage_test"]],
                  registry.STAGE_FIXED_CODE.name(): STAGE_CODES[row["stage_fixed"]],
                  registry.STAGE_D_SFT.name(): row["d_sft"], registry.STAGE_D_RESTORED.name(): row["d_restored"]}
        values.update({registry.STAGE_AT_MARGIN.name(key=f"{m:.2f}"): STAGE_CODES[row[f"stage_at_{m:g}"]]
                       for m in margin.REPORTED_MARGINS})
        values.update({registry.STAGE_INTERVAL.name(key=key): row[key] for key in registry.INTERVAL_KEYS
                       if pd.notna(row[key])})  # an undefined share is not logged
        if row["p_sft"] is not None and row["p_restored"] is not None and pd.notna(row["p_sft"]):
            values.update({registry.STAGE_P_SFT.name(): row["p_sft"],
                           registry.STAGE_P_RESTORED.name(): row["p_restored"]})
        tracker.log_metrics(run_id, values, step=int(row["epoch"]))
        tracker.set_tag(run_id, stage_tag(int(row["epoch"])), row["stage"])
    transition = transition_epoch(dict(zip(table["epoch"], table["stage"]))) if len(table) else None
    tracker.set_tag(run_id, TAG_TRANSITION, "none" if transition is None else transition)
    tracker.set_tag(run_id, TAG_STAGE_BENCHMARK, bench)
    tracker.log_table(run_id, table, "stages/stages.csv")
    if per_question is not None:
        tracker.log_table(run_id, per_question, f"stages/per_question_{bench}.parquet")
