# forgetray run sweeps/quickstart.py
"""The quick start: the Pattern-Shifting testbed on the built-in model organism, on the CPU, in minutes, replicated.

Two base sizes (organism-tiny, 2 layers; organism-small, 3 layers; both hold every held-out fact: option-likelihood
accuracy 1.000) x two instruction sets (organism-alpaca, near the pre-training text; organism-math, far from it) x 3
seeds (`replicates=3`: the IFT data order and initialisation of everything seeded), 4 epochs with a checkpoint after
each. Every checkpoint SFT_e is probed on the organism's knowledge benchmark (option likelihood is its primary score:
tiny models know facts but cannot answer by letter) and on plain-text probing perplexity, then restored into R_e on
the organism's plain-text pool (ranked by base-model perplexity, one IFT epoch of tokens a pass, again while the
probing perplexity is above R_0's x 1.05, at most 5 passes) and probed again; each checkpoint is classified no /
pseudo / actual forgetting (or not restored), per seed and pooled over the seeds, and the run ends with the report.
Needs the organism built once (`forgetray organism build`, part of `make quickstart`: it installs the shipped weights).

The rates were chosen by measurement (README, "The model organism"): on organism-alpaca, lr 5e-3 shifts the text
pattern (probing PPL x4-x10) and the held-out facts first come back on restoring, then stop (at 4-4.5e-3 organism-small
shows only the recoverable stage within the epochs); organism-math at 5e-3 destabilises organism-small, hence 4e-3
there. Restoring takes small batches (2 x 256 tokens: 43 steps a pass) at 1e-3.
"""

from forgetray import Sweep, grid, per

sweep = Sweep(
    "quickstart",
    model=grid(["organism-tiny", "organism-small"]),
    dataset=grid(["organism-alpaca", "organism-math"]),
    replicates=3,  # seeds 0, 1, 2 of every grid point, pooled in the report
    epochs=4,
    # IFT lr per dataset: at 5e-3 organism-math destabilises organism-small (probing PPL in the thousands after epoch 2
    # on 2 of 3 seeds; restoring then loses facts the SFT model still had); 4e-3 is the highest rate measured stable.
    lr=per("dataset", {"organism-alpaca": 5e-3, "organism-math": 4e-3}),
    batch_size=16,
    max_length=256,
    seed=0,
    zero_stage=0,
    workers=1,  # one DeepSpeed rank per trial: two trials run side by side on a 2-core machine
    benchmarks=["organism-facts"],
    probe_set="organism-probe",
    probe_passages=200,
    early_checkpoints=2,
    restore_pool="organism-restore",
    restore_lr=1e-3,
    restore_batch_size=2,
    restore_seq_len=256,
    restore_trajectory_points=2,
    # restore again while the pattern is not back: R_0 (the base restored) lands at PPL 2.4-2.6, and with 3 passes
    # 9 of 48 checkpoints of seeds 0-2 stayed above R_0 x 1.05 (README, "The model organism")
    restore_max_passes=5,
    restore_group=0,  # restorations in the IFT phase's own workers, after it: one worker start-up per trial
)
