# forgetray run sweeps/iv_guided_organism.py
"""Instruction vectors on the model organism, on the CPU, in minutes: plain fine-tuning, IV-guided fine-tuning and its
degree-0 control, 3 seeds each, with the dynamics probe on every model state and every checkpoint restored, so that
the report's re-injection table puts SFT_e, SFT_e + the base vector and R_e side by side
(`scripts/iv_organism_docs.py` then answers issue 12's three questions from the run, over the seeds).

The base is `organism-icl`, the base model that also read the demonstration pages: it infers which attribute is asked
from in-context demonstrations ("Q: <name>\\nA: <value>", 5-shot: 0.98-1.00), a zero-shot prompt leaves it guessing,
and the vector of its top 6 heads (by causal indirect effect on the same queries without their demonstrations),
added after layer 1, restores the task far better than a random vector of its norm (tests/test_iv_organism.py). The
task is `organism-colour`. It is fine-tuned as the quickstart's near arm is (organism-alpaca, lr 5e-3, full
fine-tuning, 4 epochs); IV guidance keeps a frozen copy of the base as its reference (full fine-tuning), with
FvForgetting's loss weights (first-token KL 20, all-token KL 0.1, T 2, thresholds 0.1). The control (`iv_degree` 0)
is the same loss with the vector left out of the reference: what the KL anchor to the base does alone.
Needs the organism built once (`forgetray organism build`).
"""

from forgetray import Sweep

TASK = "organism-colour"

sweep = Sweep(
    "iv-guided-organism",
    model="organism-icl",
    dataset="organism-alpaca",
    replicates=3,  # seeds 0, 1, 2 of every arm: the data order and initialisation of everything seeded
    cases=[{}, {"iv_task": TASK}, {"iv_task": TASK, "iv_degree": 0.0}],  # plain, IV-guided, its control
    epochs=4,
    lr=5e-3,
    batch_size=16,
    max_length=256,
    zero_stage=0,
    workers=1,  # one DeepSpeed rank per trial: two trials run side by side on a 2-core machine
    iv_layer=1,
    iv_heads=6,
    iv_corruption="no_demonstrations",  # shuffled labels would still name the attribute
    iv_prompts=100,
    iv_corrupted=25,
    iv_probe_task=TASK,
    iv_probe_layer=1,
    iv_probe_heads=6,
    benchmarks=["organism-facts"],
    probe_set="organism-probe",
    probe_passages=200,
    restore_pool="organism-restore",
    restore_lr=1e-3,
    restore_batch_size=2,
    restore_seq_len=256,
    restore_trajectory_points=2,
    restore_max_passes=3,
    restore_group=0,  # restorations in the IFT phase's own workers, after it: one worker start-up per trial
)
