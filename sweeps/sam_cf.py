# forgetray run sweeps/sam_cf.py --tracking-uri http://MLFLOW:5000 --storage /shared/forgetray
"""SAM against forgetting (CF, "Revisiting Catastrophic Forgetting in Large Language Model Tuning"; docs/methods.md §5-7)
for a GPU cluster. Every model first learns instructions on Alpaca (3 epochs, the prior phase); the IFT phase then
fine-tunes on one downstream set (ShareGPT, Open-Platypus or MetaMathQA), without SAM for 2 epochs or with SAM for
1 epoch (the paper's equal-compute comparison: a SAM step costs two passes), over a rho grid, alone and with Wise-FT
(alpha 0.5 against the Alpaca model) or rehearsal (1% of Alpaca replayed). Forgetting is read against the Alpaca
model (the IFT phase's start) on CF's suite (DK, Understanding, Reasoning, Exams and their AVG), next to each
checkpoint's flatness (21 x 21).

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        forgetray run sweeps/sam_cf.py --tracking-uri http://MLFLOW:5000 --storage /shared/forgetray

SAM perturbs full weights on each rank, so ZeRO-2 (ZeRO-3 is refused with SAM); bf16 on 8 GPUs per trial.
The lr schedule is CF's step decay, x0.85 per epoch, no warm-up (docs/methods.md §1 "CF settings"; the paper's text
itself states only the lrs, batch 128 and AdamW, App. A.3): the prior phase's lr is 2e-5 as the paper's
first phase. Settings the paper does not state are docs/methods.md's choices (max length 512).

Shared training (README "Training shared across trials"): the Alpaca phase is trained once per model (3 starts, not
216), and with the step schedule each 1-epoch grid point is the first epoch of its 2-epoch twin's trajectory, so
`forgetray validate` counts 225 training epochs instead of 972.
"""

from forgetray import Sweep, grid

ALPACA = "tatsu-lab/alpaca"


def cf_sweep(name: str, **rows) -> Sweep:
    """One block of the paper's Table 2: the shared settings plus this block's axes."""
    return Sweep(
        name,
        model=grid(["TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "meta-llama/Llama-2-7b-hf",
                    "meta-llama/Llama-2-13b-hf"]),
        prior_phases=[{"dataset": ALPACA, "epochs": 3, "lr": 2e-5}],  # explicit: an IFT lr grid keeps one start
        dataset=grid(["anon8231489123/ShareGPT_Vicuna_unfiltered", "garage-bAInd/Open-Platypus",
                      "meta-math/MetaMathQA"]),
        lr=2e-5,
        lr_schedule="step",  # CF: lr x 0.85 after every epoch; a shorter run is a prefix of a longer one
        lr_decay=0.85,
        warmup_ratio=0.0,
        batch_size=128,
        micro_batch_size=4,  # 8 GPUs x 4 x 4 accumulation steps
        workers=8,
        gpus_per_worker=1,
        cpus_per_worker=8,
        precision="bf16",
        zero_stage=2,
        max_length=512,
        benchmarks=["cf-suite"],  # CF's evaluation suite (docs/benchmarks.md); the report adds its categories
        probe_set="hf:HuggingFaceFW/fineweb:CC-MAIN-2023-40",
        probe_passages=2_000,
        probe_max_length=2048,
        probe_batch_size=8,
        flatness_grid=21,
        flatness_batch=16,
        max_failures=3,
        **rows,
    )


# The rows of Table 2: plain fine-tuning vs SAM over rho (2 is CF's choice, 0.05 SAM's default), Wise-FT and
# rehearsal each without and with SAM. A grid is a full product, so epochs 1 and 2 are crossed with every row: the
# paper's equal-compute pairs (plain 2 epochs vs SAM 1 epoch) and the equal-epoch ones are both in it (216 trials).
sweep = cf_sweep(
    "sam-cf",
    epochs=grid([1, 2]),
    sam_rho=grid([0.0, 0.05, 2.0]),
    wiseft_alpha=grid([1.0, 0.5]),
    rehearsal_ratio=grid([0.0, 0.01]),
)
