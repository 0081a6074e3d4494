# .venv/bin/python scripts/iv_organism_docs.py [--tracking-uri URI] [--run PARENT_RUN_ID] [--print-only DIR]
# (after `forgetray run sweeps/iv_guided_organism.py`)
"""Answer issue 12's three questions from the newest `iv-guided-organism` execution, over its seeds, and write them
into docs/iv_organism/ (with the sweep's report) and the README's IV-ORGANISM-RESULTS block.

1. Does the vector's cosine to the base fall as forgetting grows? Spearman's rho between SFT_e's cosine and the task
   forgotten (base - SFT_e, 5-shot accuracy), over the plain arm's seed x epoch checkpoints, permutation p.
2. Does re-injecting the base vector recover the task, and where, next to restoration training? Per plain checkpoint:
   SFT_e, SFT_e + base IV, R_e (5-shot accuracy); sign tests over the checkpoints.
3. Does IV-guided training forget less than plain training at the same epochs? Sign tests paired by (seed, epoch);
   and against its degree-0 control (the same KL anchor without the vector).
Nothing is typed by hand: the numbers come from MLflow, the tests from `forgetray.metrics.significance`.
"""

from __future__ import annotations

import argparse
import datetime
import math
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "iv_organism"
EXPERIMENT = "iv-guided-organism"
START, END = "<!-- IV-ORGANISM-RESULTS:START (scripts/iv_organism_docs.py writes this block) -->", \
    "<!-- IV-ORGANISM-RESULTS:END -->"
ARMS = ("plain", "IV-guided", "control (degree 0)")


def arm(settings: dict) -> str:
    if not settings.get("iv_task"):
        return ARMS[0]
    return ARMS[2] if float(settings.get("iv_degree", 1.0)) == 0 else ARMS[1]


def rows(trials) -> pd.DataFrame:
    """One row per trial x checkpoint: the dynamics probe's accuracies and vector, knowledge, the training CE."""
    from forgetray.metrics import registry

    def probe(trial, state: str, key: str, epoch: int) -> float:
        return trial.at(registry.iv_probe_metric(key).name(state=state, key=key), 0 if state == "base" else epoch)

    out = []
    for trial in trials:
        ce = registry.TRAIN_IV.name(key="ce") if trial.settings.get("iv_task") else registry.TRAIN_LOSS.name()
        for epoch in trial.epochs:
            out.append({
                "arm": arm(trial.settings), "seed": int(trial.settings["seed"]), "epoch": epoch,
                "nshot_base": probe(trial, "base", "acc_nshot", epoch),
                "nshot_sft": probe(trial, "sft", "acc_nshot", epoch),
                "nshot_sft_iv": probe(trial, "sft", "acc_nshot_injected", epoch),
                "nshot_restored": probe(trial, "restored", "acc_nshot", epoch),
                "zs_base": probe(trial, "base", "acc_zero_shot", epoch),
                "zs_base_iv": probe(trial, "base", "acc_injected", epoch),
                "zs_base_random": probe(trial, "base", "acc_random", epoch),
                "zs_sft": probe(trial, "sft", "acc_zero_shot", epoch),
                "zs_sft_iv": probe(trial, "sft", "acc_injected", epoch),
                "cosine_sft": probe(trial, "sft", "cosine", epoch),
                "overlap_sft": probe(trial, "sft", "head_overlap", epoch),
                "facts_base": trial.knowledge("base", trial.primary, epoch),
                "facts_sft": trial.knowledge("sft", trial.primary, epoch),
                "facts_restored": trial.knowledge("restored", trial.primary, epoch),
                "ce": trial.at(ce, epoch), "stage": trial.stage(epoch),
            })
    return pd.DataFrame(out).sort_values(["arm", "seed", "epoch"]).reset_index(drop=True)


def _test(a, b, seeds=None) -> str:
    """The paired difference b - a: its mean, the sign test over the pairs and, with `seeds` (each pair's), how many
    seeds' mean differences share the overall sign (the epochs of one seed are not independent draws; the seeds are)."""
    from forgetray.metrics.significance import sign_test

    r = sign_test(a, b)
    text = f"mean {r.mean_delta:+.3f}, {r.positive} up / {r.negative} down of {len(a)}, sign test p = {r.p_value:.3g}"
    if seeds is not None:
        deltas = pd.Series(list(b), dtype=float) - pd.Series(list(a), dtype=float)
        means = deltas.groupby(list(seeds)).mean()
        same = int(((means > 0) if r.mean_delta > 0 else (means < 0)).sum()) if r.mean_delta else 0
        text += f" ({same}/{len(means)} seeds {'up' if r.mean_delta > 0 else 'down'})"
    return text


def answers(table: pd.DataFrame) -> str:
    from forgetray.metrics.significance import spearman
    from forgetray.report.reinjection import share, verdict

    plain = table[table["arm"] == ARMS[0]]
    n_seeds = plain["seed"].nunique()
    base = table.drop_duplicates("seed")
    lines = [f"**Sanity check, on the base** (seed 0's extraction; every arm's base is the same model): 5-shot "
             f"accuracy {base['nshot_base'].iloc[0]:.3f}; zero-shot {base['zs_base'].iloc[0]:.3f}, with the base "
             f"vector {base['zs_base_iv'].iloc[0]:.3f}, with random vectors of its norm "
             f"{base['zs_base_random'].iloc[0]:.3f} (mean of 3).", ""]
    forgot = plain["nshot_base"] - plain["nshot_sft"]
    rho, p = spearman(plain["cosine_sft"], forgot)
    rho_f, p_f = spearman(plain["cosine_sft"], plain["facts_base"] - plain["facts_sft"])
    lines += [f"**1. Cosine vs forgetting** (plain arm, {len(plain)} checkpoints = {n_seeds} seeds x "
              f"{plain['epoch'].nunique()} epochs): cosine of SFT_e's vector to the base's "
              f"{plain['cosine_sft'].min():.2f}-{plain['cosine_sft'].max():.2f}; 5-shot task forgotten "
              f"{forgot.min():+.3f} to {forgot.max():+.3f}. Spearman rho(cosine, task forgotten) = {rho:+.2f} "
              f"(permutation p = {p:.3g}); rho(cosine, held-out facts forgotten) = {rho_f:+.2f} (p = {p_f:.3g}).", ""]
    gap = plain["nshot_base"] - plain["nshot_sft"]
    verdicts = [verdict(g, share(iv, s, g), share(r, s, g))
                for g, iv, s, r in zip(gap, plain["nshot_sft_iv"], plain["nshot_sft"], plain["nshot_restored"])]
    counts = ", ".join(f"{v} {verdicts.count(v)}" for v in dict.fromkeys(verdicts))
    lines += [f"**2. Re-injection vs restoration training** (plain arm, 5-shot task accuracy per checkpoint): "
              f"SFT_e + base IV vs SFT_e: {_test(plain['nshot_sft'], plain['nshot_sft_iv'], plain['seed'])}; R_e vs "
              f"SFT_e: {_test(plain['nshot_sft'], plain['nshot_restored'], plain['seed'])}. Verdicts (>= half the "
              f"gap back): {counts}. "
              f"Zero-shot, the base vector in SFT_e gives {plain['zs_sft_iv'].mean():.3f} on average (in the base "
              f"{base['zs_base_iv'].iloc[0]:.3f}).", ""]
    lines.append("**3. IV-guided vs plain at the same epochs** (paired by seed x epoch; up = the second arm higher):")
    for other in ARMS[1:]:
        pair = plain.merge(table[table["arm"] == other], on=["seed", "epoch"], suffixes=("_a", "_b"))
        if pair.empty:
            continue
        s = pair["seed"]
        lines.append(f"- {other} vs plain: 5-shot task {_test(pair['nshot_sft_a'], pair['nshot_sft_b'], s)}; held-out "
                     f"facts {_test(pair['facts_sft_a'], pair['facts_sft_b'], s)}; training CE "
                     f"{_test(pair['ce_a'], pair['ce_b'], s)}; cosine "
                     f"{_test(pair['cosine_sft_a'], pair['cosine_sft_b'], s)}")
    guided, control = (table[table["arm"] == a] for a in ARMS[1:])
    pair = guided.merge(control, on=["seed", "epoch"], suffixes=("_a", "_b"))
    if not pair.empty:
        s = pair["seed"]
        lines.append(f"- control vs IV-guided (the vector's own part): 5-shot task "
                     f"{_test(pair['nshot_sft_a'], pair['nshot_sft_b'], s)}; held-out facts "
                     f"{_test(pair['facts_sft_a'], pair['facts_sft_b'], s)}; training CE "
                     f"{_test(pair['ce_a'], pair['ce_b'], s)}")
    return "\n".join(lines) + "\n"


def per_checkpoint(table: pd.DataFrame) -> str:
    """Means over the seeds, per arm and epoch, as a markdown table."""
    columns = {"nshot_sft": "5-shot SFT_e", "nshot_sft_iv": "+ base IV", "nshot_restored": "R_e",
               "zs_sft": "0-shot SFT_e", "zs_sft_iv": "0-shot + base IV", "cosine_sft": "cosine",
               "overlap_sft": "heads", "facts_sft": "facts SFT_e", "facts_restored": "facts R_e", "ce": "train CE"}
    means = table.groupby(["arm", "epoch"], sort=False)[list(columns)].mean().reset_index()
    lines = ["| arm | epoch | " + " | ".join(columns.values()) + " |", "|---|---|" + "---|" * len(columns)]
    for _, r in means.iterrows():
        cells = ["-" if math.isnan(r[c]) else f"{r[c]:.3f}" for c in columns]
        lines.append(f"| {r['arm']} | {int(r['epoch'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from forgetray.report.build import DEFAULT_RESULTS_DIR, run_report
    from forgetray.report.runs import load_trials, resolve_parent
    from forgetray.tracking import Tracker, default_tracking_uri

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", help="default: the sqlite store `forgetray run` uses in ./forgetray-results")
    parser.add_argument("--run", help="the sweep's parent run id (default: the newest execution)")
    parser.add_argument("--print-only", metavar="DIR", help="write the report into DIR and print; leave docs/ alone")
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri(DEFAULT_RESULTS_DIR)
    out = Path(args.print_only) if args.print_only else DOCS
    report = run_report(EXPERIMENT, uri, args.run, out_dir=out, log_to_mlflow=False)
    tracker = Tracker(uri)
    trials = load_trials(tracker, EXPERIMENT, resolve_parent(tracker, EXPERIMENT, report.parent_run_id))
    table = rows(trials)
    table.to_csv(out / "checkpoints.csv", index=False)
    from quickstart_docs import machine, replace_readme_block  # the quickstart's machine line and README writer

    block = (f"Measured by `forgetray run sweeps/iv_guided_organism.py` on {machine()}, "
             f"{datetime.date.today().isoformat()}; regenerated by `scripts/iv_organism_docs.py`. Means over "
             f"{table['seed'].nunique()} seeds:\n\n{per_checkpoint(table)}\n{answers(table)}")
    print(block)
    if args.print_only:
        return 0
    (DOCS / "results.md").write_text(f"# Instruction vectors on the organism\n\n{block}\n```\n{report.text}```\n")
    replace_readme_block(START, END, block)
    print(f"written: {DOCS}/results.md, checkpoints.csv, the README's block, the report in {DOCS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
