# forgetray run sweeps/iv_guided_organism.py
"""Instruction vectors on the model organism, on the CPU, with the controls of docs/methods.md §8 (issue 17 item 4): plain
fine-tuning, plain fine-tuning matched on learning, IV-guided fine-tuning and its degree-0 control, 6 seeds each, with
the dynamics probe on every model state and every checkpoint restored, so that the report's re-injection table puts
SFT_e, SFT_e + the base vector, SFT_e + the controls and R_e side by side (`scripts/iv_organism_docs.py` then answers
issue 12's three questions from the run, each with the seed as the unit of its test).

The base is `organism-icl`, the base model that also read the demonstration pages: it infers which attribute is asked
from in-context demonstrations ("Q: <name>\\nA: <value>", 5-shot: 0.98-1.00), a zero-shot prompt leaves it guessing,
and the vector of its top 6 heads (by causal indirect effect on the same queries without their demonstrations),
added after layer 1, restores the task far better than a random vector of its norm (tests/test_iv_organism.py). The
task is `organism-colour`. It is fine-tuned as the quickstart's near arm is (organism-alpaca, lr 5e-3, full
fine-tuning, 4 epochs); IV guidance keeps a frozen copy of the base as its reference (full fine-tuning), with
FvForgetting's loss weights (first-token KL 20, all-token KL 0.1, T 2, thresholds 0.1). The control (`iv_degree` 0)
is the same loss with the vector left out of the reference: what the KL anchor to the base does alone.

The controls (else the answers are confounded):
- re-injection: beside the base vector, random vectors of its norm and another attribute's base vector
  (`organism-profession`, extracted from the same base with the same settings), injected into every state;
- restoration on `organism-restore-no-colour`, the pool with every colour statement taken out, so that R_e cannot
  recover the colour task by being taught the colour facts again;
- a plain arm matched on learning: the guided arms barely learn (training CE 3.7-3.9 at epoch 4 against 1.8 for
  plain training at 5e-3) and an anchor that learns less also forgets less. MATCHED_LR was measured for it (one
  seed, this sweep's plain arm with only the rate changed, epoch-4 train/loss): 3e-4 4.99, 6e-4 3.98, 7e-4 3.71,
  8e-4 3.53, 1e-3 3.23, against 3.69 (IV-guided) and 3.86 (control), the 3-seed means of the sweep's earlier run;
- 6 seeds: a sign test across seeds can then reach p = 0.031 (3 seeds: 0.25 at best).
Needs the organism built once (`forgetray organism build`).
"""

from forgetray import Sweep

TASK = "organism-colour"
OTHER_TASK = "organism-profession"  # the control vector's attribute (its vector restores its own task: 0.93)
LR = 5e-3
MATCHED_LR = 7e-4  # plain training whose epoch-4 training CE is the IV-guided arm's (measured: see above)

sweep = Sweep(
    "iv-guided-organism",
    model="organism-icl",
    dataset="organism-alpaca",
    replicates=6,  # seeds 0-5 of every arm: the data order and initialisation of everything seeded
    cases=[{"lr": LR}, {"lr": MATCHED_LR},  # plain; plain matched on learning
           {"lr": LR, "iv_task": TASK}, {"lr": LR, "iv_task": TASK, "iv_degree": 0.0}],  # IV-guided, its control
    epochs=4,
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
    iv_probe_other_task=OTHER_TASK,
    iv_probe_layer=1,
    iv_probe_heads=6,
    benchmarks=["organism-facts"],
    probe_set="organism-probe",
    probe_passages=200,
    restore_pool="organism-restore-no-colour",  # never states a colour: R_e cannot re-teach the task's facts
    restore_lr=1e-3,
    restore_batch_size=2,
    restore_seq_len=256,
    restore_trajectory_points=2,
    restore_max_passes=3,
    restore_group=0,  # restorations in the IFT phase's own workers, after it: one worker start-up per trial
)
