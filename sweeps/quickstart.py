# forgetray run sweeps/quickstart.py
"""The quick start: the Pattern-Shifting testbed on the built-in model organism, on the CPU, in minutes.

Two base-model sizes x two instruction datasets (one near the pre-training text, one far from it), fine-tuned for
several epochs with a checkpoint after each. Every checkpoint SFT_e is probed on the organism's knowledge benchmark
(option likelihood is its primary score: tiny models know facts but cannot answer by letter) and on plain-text
probing perplexity, then restored into R_e on the organism's plain-text pool (ranked by base-model perplexity, one
IFT epoch of tokens) and probed again; each checkpoint is classified no / pseudo / actual forgetting and the run ends
with the report. Needs the organism built once (`forgetray organism build`, part of `make quickstart`).
"""

from forgetray import Sweep, grid

sweep = Sweep(
    "quickstart",
    model=grid(["organism-tiny", "organism-small"]),
    dataset=grid(["organism-alpaca", "organism-math"]),
    epochs=4,
    lr=1e-3,  # the organism's IFT rate: high enough to erode knowledge within a few epochs
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
    restore_lr=3e-4,  # modest: restoring the untouched base at a high rate already erodes the facts
    restore_batch_size=16,
    restore_seq_len=256,
    restore_trajectory_points=4,
    restore_group=4,  # one restoring trainer per trial (worker start-up costs more than a small restoration)
)
