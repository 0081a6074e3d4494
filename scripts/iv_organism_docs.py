# .venv/bin/python scripts/iv_organism_docs.py [--tracking-uri URI] [--run PARENT_RUN_ID] [--print-only DIR]
# (after `forgetray run sweeps/iv_guided_organism.py`)
"""Answer issue 12's three questions from the newest `iv-guided-organism` execution, with the controls of docs/methods.md §8
(issue 17 item 4), and write them into docs/iv_organism/ (with the sweep's report and a figure) and the README's
IV-ORGANISM-RESULTS block.

Every test takes the seed as its unit (docs/methods.md §10): a per-seed summary first (the mean over the epochs, or the
last epoch), then the test across the seeds; the checkpoints of one seed are never counted as independent.
1. Does the vector's cosine to the base fall as forgetting grows? Controlled for the epoch: cosine and forgetting less
   their epoch's mean over the seeds, Pearson's r, p from every permutation of whole seeds
   (`significance.within_strata_correlation`); the plain arms.
2. Does re-injecting the base vector recover the task, and where, next to restoration training? In the plain arm's
   SFT_e: the base vector beside a random vector of its norm and another attribute's vector (the probe's controls),
   and R_e restored on a pool that never states the task's attribute; per seed the mean over the epochs, sign tests.
3. Does IV-guided training forget less than plain training, and than plain training matched on learning (the same
   final training CE)? Per seed the last epoch, sign tests; and forgetting against the final training CE, drawn.
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
ARMS = ("plain", "plain, learning-matched", "IV-guided", "control (degree 0)")
PLAIN, MATCHED, GUIDED, CONTROL = ARMS
FIGURE = "forgetting_vs_ce.png"
# probe key -> table column, per state (the probe's metrics, `registry.IV_PROBE_*`)
PROBED = {
    "base": {"acc_nshot": "nshot_base", "acc_nshot_random": "nshot_base_random", "acc_nshot_other": "nshot_base_other",
             "acc_zero_shot": "zs_base", "acc_injected": "zs_base_iv", "acc_random": "zs_base_random",
             "acc_other": "zs_base_other", "vector_norm": "base_norm", "other_norm": "other_norm",
             "other_cosine": "other_cosine"},
    "sft": {"acc_nshot": "nshot_sft", "acc_nshot_injected": "nshot_sft_iv", "acc_nshot_random": "nshot_sft_random",
            "acc_nshot_other": "nshot_sft_other", "acc_zero_shot": "zs_sft", "acc_injected": "zs_sft_iv",
            "acc_random": "zs_sft_random", "acc_other": "zs_sft_other", "cosine": "cosine_sft",
            "head_overlap": "overlap_sft"},
    "restored": {"acc_nshot": "nshot_restored"},
}


def arm(settings: dict, guided_lr: float | None) -> str:
    """The trial's arm: IV-guided or its control by iv_degree; a plain trial at the IV arms' rate is "plain", at
    another rate the learning-matched plain arm."""
    if settings.get("iv_task"):
        return CONTROL if float(settings.get("iv_degree", 1.0)) == 0 else GUIDED
    return PLAIN if guided_lr is None or float(settings.get("lr", guided_lr)) == guided_lr else MATCHED


def rows(trials) -> pd.DataFrame:
    """One row per trial x checkpoint: the dynamics probe's accuracies and vector, knowledge, the training CE."""
    from forgetray.metrics import registry

    guided = {float(t.settings["lr"]) for t in trials if t.settings.get("iv_task") and "lr" in t.settings}
    guided_lr = guided.pop() if len(guided) == 1 else None
    out = []
    for trial in trials:
        ce = registry.TRAIN_IV.name(key="ce") if trial.settings.get("iv_task") else registry.TRAIN_LOSS.name()
        for epoch in trial.epochs:
            row = {"arm": arm(trial.settings, guided_lr), "seed": int(trial.settings["seed"]), "epoch": epoch,
                   "lr": float(trial.settings.get("lr", math.nan))}
            for state, keys in PROBED.items():
                for key, column in keys.items():
                    row[column] = trial.at(registry.iv_probe_metric(key).name(state=state, key=key),
                                           0 if state == "base" else epoch)
            row.update(facts_base=trial.knowledge("base", trial.primary, epoch),
                       facts_sft=trial.knowledge("sft", trial.primary, epoch),
                       facts_restored=trial.knowledge("restored", trial.primary, epoch),
                       ce=trial.at(ce, epoch), stage=trial.stage(epoch))
            row["task_forgot"] = row["nshot_base"] - row["nshot_sft"]
            row["facts_forgot"] = row["facts_base"] - row["facts_sft"]
            out.append(row)
    order = {a: i for i, a in enumerate(ARMS)}
    table = pd.DataFrame(out)
    return table.sort_values(["arm", "seed", "epoch"], key=lambda c: c.map(order) if c.name == "arm" else c
                             ).reset_index(drop=True)


def per_seed(frame: pd.DataFrame, column: str, last: bool = False) -> pd.Series:
    """The per-seed summary the tests take: the mean over the epochs, or (`last`) the last epoch's value."""
    if last:
        frame = frame[frame["epoch"] == frame["epoch"].max()]
    return frame.groupby("seed")[column].mean()


def seed_test(a: pd.Series, b: pd.Series) -> str:
    """b - a over the seeds (per-seed summaries, by seed): its mean, and the exact two-sided sign test across the
    seeds; seeds where either is missing are left out."""
    from forgetray.metrics.significance import sign_test

    pair = pd.concat([a, b], axis=1, keys=["a", "b"]).dropna()
    if pair.empty:
        return "not measured"
    r = sign_test(pair["a"], pair["b"])
    return (f"{r.mean_delta:+.3f} ({r.positive} up / {r.negative} down of {len(pair)} seeds, sign test "
            f"p = {r.p_value:.3g})")


def _floor(n: int) -> str:
    """What n seeds can show at best, for the text: the smallest two-sided sign-test p, and with one seed against."""
    if n < 2:
        return f"{n} seed: no test across seeds can find anything"
    best, one_off = 2 * 0.5**n, min(1.0, 2 * (n + 1) * 0.5**n)
    return f"with {n} seeds the smallest two-sided p is 2 x 0.5^{n} = {best:.3g}, {n - 1} of {n} gives {one_off:.3g}"


def correlation_line(frame: pd.DataFrame, label: str) -> str:
    """Q1 for one arm: cosine vs forgetting (task, held-out facts), controlled for the epoch, seeds as units."""
    from forgetray.metrics.significance import spearman, within_strata_correlation

    complete = frame.groupby("seed").filter(lambda f: f[["cosine_sft", "task_forgot", "facts_forgot"]].notna().all()
                                            .all())
    seeds = complete["seed"].nunique()
    if seeds < 3:
        return f"- {label}: fewer than 3 seeds with a vector at every checkpoint; not tested"
    parts = []
    for column, what in (("task_forgot", "task forgotten"), ("facts_forgot", "held-out facts forgotten")):
        c = within_strata_correlation(complete["cosine_sft"], complete[column], complete["epoch"], complete["seed"])
        rho, p = spearman(complete["cosine_sft"], complete[column])
        found = (f"r(cosine, {what}) = {c.r:+.2f} (p = {c.p_value:.3g}" if not math.isnan(c.r) else
                 f"r(cosine, {what}) undefined (one side does not vary within an epoch")
        parts.append(f"{found}; uncontrolled Spearman over the {len(complete)} checkpoints "
                     + ("undefined)" if math.isnan(rho) else f"{rho:+.2f}, p = {p:.3g})"))
    return (f"- {label} ({seeds} seeds x {complete['epoch'].nunique()} epochs; cosine "
            f"{complete['cosine_sft'].min():.2f}-{complete['cosine_sft'].max():.2f}): " + "; ".join(parts))


def answers(table: pd.DataFrame) -> str:
    from forgetray.report.reinjection import share, verdict

    arms = {a: table[table["arm"] == a] for a in ARMS}
    plain, n = arms[PLAIN], table["seed"].nunique()
    base = table.sort_values("seed").drop_duplicates("seed").iloc[0]
    lines = [f"**Sanity check, on the base** (seed {int(base['seed'])}'s extraction; every arm's base is the same "
             f"model): 5-shot accuracy {base['nshot_base']:.3f}, with random vectors of the base vector's norm "
             f"{base['nshot_base_random']:.3f}, with the other attribute's vector {base['nshot_base_other']:.3f}; "
             f"zero-shot {base['zs_base']:.3f}, with the base vector {base['zs_base_iv']:.3f}, random "
             f"{base['zs_base_random']:.3f} (mean of 3), the other attribute's vector {base['zs_base_other']:.3f} "
             f"(its norm {base['other_norm']:.2f} vs the base vector's {base['base_norm']:.2f}, cosine "
             f"{base['other_cosine']:+.2f}).", "",
             f"Tests take the seed as the unit: a per-seed summary, then the test across the seeds ({_floor(n)}).", ""]
    lines.append("**1. Cosine vs forgetting, controlled for the epoch** (each checkpoint's cosine of SFT_e's vector to "
                 "the base's and its forgetting, less their epoch's mean over the seeds: do seeds whose vector moved "
                 "more forget more at the same epoch? Pearson's r; p over every permutation of whole seeds; "
                 "uncontrolled, the shared epoch trend alone can make a correlation):")
    lines += [correlation_line(arms[a], a) for a in (PLAIN, MATCHED) if not arms[a].empty]
    lines.append("")
    lines += [f"**2. Re-injection vs restoration training, with controls** (plain arm, in SFT_e; per seed the mean "
              f"over the {plain['epoch'].nunique()} epochs, then sign tests across the seeds; R_e restored on a pool "
              f"that never states a colour):"]
    for kind, prefix in (("5-shot", "nshot"), ("zero-shot", "zs")):
        s = {k: per_seed(plain, f"{prefix}_sft{k}") for k in ("", "_iv", "_random", "_other")}
        means = ", ".join(f"{label} {s[k].mean():.3f}" for k, label in
                          (("", "SFT_e"), ("_iv", "+ base IV"), ("_random", "+ random"), ("_other", "+ other")))
        text = (f"- {kind} ({means}): + base IV vs SFT_e {seed_test(s[''], s['_iv'])}; + base IV vs + random "
                f"{seed_test(s['_random'], s['_iv'])}; + base IV vs + other attribute's vector "
                f"{seed_test(s['_other'], s['_iv'])}")
        if prefix == "nshot":
            restored = per_seed(plain, "nshot_restored")
            text += (f"; R_e ({restored.mean():.3f}) vs SFT_e {seed_test(s[''], restored)}; R_e vs + base IV "
                     f"{seed_test(s['_iv'], restored)}")
        lines.append(text)
    verdicts = [verdict(g, share(iv, sft, g), share(r, sft, g)) for g, iv, sft, r in
                zip(plain["task_forgot"], plain["nshot_sft_iv"], plain["nshot_sft"], plain["nshot_restored"])]
    lines += [f"- per checkpoint (descriptive; >= half the 5-shot gap back): "
              + ", ".join(f"{v} {verdicts.count(v)}" for v in dict.fromkeys(verdicts)), ""]
    last = int(table["epoch"].max())
    ce = {a: per_seed(f, "ce", last=True) for a, f in arms.items() if not f.empty}
    matched = arms[MATCHED]
    lr = f" (lr {matched['lr'].iloc[0]:g})" if not matched.empty else ""
    ratio = (f"; learning-matched / IV-guided = {ce[MATCHED].mean() / ce[GUIDED].mean():.2f}"
             if MATCHED in ce and GUIDED in ce else "")
    lines += [f"**3. IV-guided vs plain, and vs plain matched on learning** (per seed epoch {last}, the end of "
              f"training, where the matched arm's training CE is set to the guided arm's; sign tests across the seeds; "
              f"up = the second arm higher; forgotten = base - SFT_e): final training CE "
              + ", ".join(f"{a}{lr if a == MATCHED else ''} {c.mean():.3f}" for a, c in ce.items()) + ratio
              + f". Forgetting against the final training CE, per arm and seed: `docs/iv_organism/{FIGURE}`."]
    for first, second in ((PLAIN, GUIDED), (MATCHED, GUIDED), (PLAIN, CONTROL), (MATCHED, CONTROL), (GUIDED, CONTROL)):
        a, b = arms[first], arms[second]
        if a.empty or b.empty:
            continue
        cells = "; ".join(f"{what} {seed_test(per_seed(a, col, True), per_seed(b, col, True))}" for col, what in
                          (("task_forgot", "5-shot task forgotten"), ("facts_forgot", "held-out facts forgotten"),
                           ("ce", "training CE"), ("cosine_sft", "cosine")))
        lines.append(f"- {second} vs {first}: {cells}")
    return "\n".join(lines) + "\n"


def figure(table: pd.DataFrame, path: Path) -> None:
    """Forgetting (5-shot task; held-out facts) at the last epoch against the final training CE: one point per arm
    and seed (an anchor that learns less also forgets less: the learning-matched arm is the fair comparison)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = table[table["epoch"] == table["epoch"].max()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (column, title) in zip(axes, (("task_forgot", "5-shot task forgotten (base - SFT_e)"),
                                          ("facts_forgot", "held-out facts forgotten (base - SFT_e)"))):
        for name, marker in zip(ARMS, "osD^"):
            points = final[final["arm"] == name]
            if not points.empty:
                ax.scatter(points["ce"], points[column], marker=marker, label=name, alpha=0.8)
        ax.set_xlabel(f"training CE, epoch {int(final['epoch'].max())}")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def per_checkpoint(table: pd.DataFrame) -> str:
    """Means over the seeds, per arm and epoch, as a markdown table."""
    columns = {"nshot_sft": "5-shot SFT_e", "nshot_sft_iv": "+ base IV", "nshot_sft_random": "+ random",
               "nshot_sft_other": "+ other", "nshot_restored": "R_e", "zs_sft": "0-shot SFT_e",
               "zs_sft_iv": "0-shot + base IV", "zs_sft_random": "0-shot + random", "zs_sft_other": "0-shot + other",
               "cosine_sft": "cosine", "facts_sft": "facts SFT_e", "facts_restored": "facts R_e", "ce": "train CE"}
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
    figure(table, out / FIGURE)
    from quickstart_docs import machine, replace_readme_block  # the quickstart's machine line and README writer

    block = (f"Measured by `forgetray run sweeps/iv_guided_organism.py` on {machine()}, "
             f"{datetime.date.today().isoformat()}; regenerated by `scripts/iv_organism_docs.py`. Means over "
             f"{table['seed'].nunique()} seeds:\n\n{per_checkpoint(table)}\n{answers(table)}")
    print(block)
    if args.print_only:
        return 0
    (DOCS / "results.md").write_text(f"# Instruction vectors on the organism\n\n{block}\n```\n{report.text}```\n")
    replace_readme_block(START, END, block)
    print(f"written: {DOCS}/results.md, checkpoints.csv, {FIGURE}, the README's block, the report in {DOCS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
