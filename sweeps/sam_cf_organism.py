# forgetray run sweeps/sam_cf_organism.py
"""The SAM / Wise-FT / rehearsal study (CF; docs/methods.md §5-7) on the built-in model organism, on the CPU, in minutes.

Like the paper: a prior phase teaches instructions (organism-alpaca), then the IFT phase fine-tunes on a far
task (organism-math); forgetting is the organism's knowledge (held-out facts, option likelihood) lost against the
IFT phase's start. Rows: plain fine-tuning vs SAM, alone and with Wise-FT (alpha 0.5 against the phase's start) and
rehearsal (10% of the alpaca data replayed: 1% of 320 examples would be 3). Every checkpoint also gets its 21 x 21
loss surface on 16 probing passages (SC / AG / MAG, the contour plot). The report ends with the Table-2-shaped table.
Needs the organism built once (`forgetray organism build`, part of `make quickstart`).
"""

from forgetray import Sweep, grid

sweep = Sweep(
    "sam-cf-organism",
    model="organism-tiny",
    prior_phases=[{"dataset": "organism-alpaca", "epochs": 1}],
    dataset="organism-math",
    epochs=3,
    lr=5e-3,  # as the quickstart: at lower rates fine-tuning barely moves organism-tiny
    batch_size=16,
    max_length=256,
    workers=1,  # one DeepSpeed rank per trial: two trials run side by side on a 2-core machine
    zero_stage=0,
    benchmarks=["organism-facts"],
    probe_set="organism-probe",
    probe_passages=200,
    sam_rho=grid([0.0, 0.05]),
    wiseft_alpha=grid([1.0, 0.5]),
    rehearsal_ratio=grid([0.0, 0.1]),
    flatness_grid=21,
    flatness_batch=16,
)
