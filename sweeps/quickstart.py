# forgetray run sweeps/quickstart.py
"""The quick start: the Pattern-Shifting testbed on the built-in model organism, on the CPU, in minutes.

organism-tiny (which holds every held-out fact: option-likelihood accuracy 1.000) fine-tuned on two instruction
sets, one near the pre-training text and one far from it, for 8 epochs with a checkpoint after each. Every checkpoint
SFT_e is probed on the organism's knowledge benchmark (option likelihood is its primary score: tiny models know facts
but cannot answer by letter) and on plain-text probing perplexity, then restored into R_e on the organism's
plain-text pool (ranked by base-model perplexity, one IFT epoch of tokens) and probed again; each checkpoint is
classified no / pseudo / actual forgetting (or not restored) and the run ends with the report.
Needs the organism built once (`forgetray organism build`, part of `make quickstart`).

The rates were chosen by measurement (README, "The model organism"): at lr 1e-3 IFT barely moves this model; at 5e-3
it shifts the text pattern (probing PPL x6-x30) and the held-out facts first come back on restoring, then stop.
Restoring takes small batches (2 x 256 tokens: 43 steps for one IFT epoch of tokens) at 1e-3.
"""

from forgetray import Sweep, grid

sweep = Sweep(
    "quickstart",
    model="organism-tiny",
    dataset=grid(["organism-alpaca", "organism-math"]),
    epochs=8,
    lr=5e-3,
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
    restore_trajectory_points=4,
    restore_group=0,  # restorations in the IFT phase's own workers, after it: one worker start-up per trial
)
