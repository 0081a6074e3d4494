# forgetray run sweeps/iv_guided_organism.py
"""IV-guided vs plain LoRA fine-tuning on the model organism, on the CPU, in minutes: the design of
sweeps/iv_guided.py at the organism's size, with the instruction-vector dynamics probe on every model state and
every checkpoint restored, so the report's re-injection table puts SFT_e, SFT_e + the base vector and R_e side by
side. The task is the built-in `organism-qa` (the exam half's facts, 5-shot Question/Answer as on the pre-training
exam pages); organism-tiny has 2 layers x 4 heads, so the vector is made of 4 heads and goes in after layer 0.
Needs the organism built once (`forgetray organism build`).

Read its numbers as a check that the pieces run, not as a finding: today's organism carries no instruction vector
(README, "The model organism"; issue 12): its questions state the task, the base answers them zero-shot at ceiling,
and the top head's causal indirect effect is ~1e-3, so the vector, its cosine and the re-injected accuracy are noise.
"""

from forgetray import Sweep, grid

sweep = Sweep(
    "iv-guided-organism",
    model="organism-tiny",
    dataset="organism-math",
    epochs=3,
    lr=1e-2,
    batch_size=16,
    max_length=256,
    workers=1,  # one DeepSpeed rank per trial: the two trials run side by side on a 2-core machine
    zero_stage=2,
    lora_rank=8,
    lora_alpha=16,
    lora_targets=["q_proj", "v_proj"],
    iv_task=grid(["", "organism-qa"]),  # "" = plain LoRA fine-tuning
    iv_layer=0,
    iv_heads=4,
    iv_prompts=50,
    iv_corrupted=10,
    iv_probe_task="organism-qa",
    iv_probe_layer=0,
    iv_probe_heads=4,
    benchmarks=["organism-facts"],
    probe_set="organism-probe",
    probe_passages=200,
    restore_pool="organism-restore",
    restore_lr=1e-3,
    restore_batch_size=2,
    restore_seq_len=256,
    restore_trajectory_points=2,
    restore_group=0,  # restorations in the IFT phase's own workers: one worker start-up per trial
)
