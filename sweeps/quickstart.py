# forgetray run sweeps/quickstart.py
"""The quick start: a small forgetting study on the built-in model organism, on the CPU, in minutes.

Two base-model sizes x two instruction datasets (one near the pre-training text, one far from it), fine-tuned for
several epochs with a checkpoint after each; every checkpoint is probed on the organism's knowledge benchmark
(option likelihood is its primary score: tiny models know facts but cannot answer by letter) and on plain-text
probing perplexity. Needs the organism built once (`forgetray organism build`, part of `make quickstart`).
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
    probe_passages=300,
)
