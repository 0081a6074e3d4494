# forgetray run sweeps/pattern_shift.py --tracking-uri http://MLFLOW:5000 --storage /shared/forgetray
"""The Pattern-Shifting testbed (PS; docs/methods.md §1-4) on Llama-2 7B/13B with Alpaca and Vicuna (ShareGPT) data:
IFT for 10 epochs with a checkpoint after every epoch and fine-grained probes inside epoch 1, every checkpoint
restored on Common Crawl text (CC-MAIN-2023-40) ranked by base-model perplexity, probes on MMLU (5-shot from each
subject's dev split, scored by the answer letter, as lm-eval's mmlu) and ARC-Challenge (lm-eval's arc_challenge:
option likelihood; PS scored ARC by letter too), each checkpoint classified no / pseudo / actual forgetting on MMLU.
For a GPU cluster:

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        forgetray run sweeps/pattern_shift.py --tracking-uri http://MLFLOW:5000 --storage /shared/forgetray

Settings the paper does not state are docs/methods.md's choices: max length 512, weight decay 0, cosine schedule with 3%
warm-up, restoring sequences packed to 2048 tokens.
"""

from forgetray import Sweep, grid

CC = "hf:HuggingFaceFW/fineweb:CC-MAIN-2023-40"  # Common Crawl dump CC-MAIN-2023-40, streamed

sweep = Sweep(
    "pattern-shift",
    model=grid(["meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf"]),
    dataset=grid(["tatsu-lab/alpaca", "anon8231489123/ShareGPT_Vicuna_unfiltered"]),
    epochs=10,
    lr=2e-5,
    batch_size=256,  # global: 8 GPUs x micro-batch 4 x 8 accumulation steps
    micro_batch_size=4,
    workers=8,
    gpus_per_worker=1,
    cpus_per_worker=8,
    precision="bf16",
    zero_stage=3,
    max_length=512,
    warmup_ratio=0.03,
    lr_schedule="cosine",
    early_checkpoints=8,  # format alignment happens within a few steps of epoch 1
    benchmarks=["mmlu", "arc_challenge"],  # forgetray.tasks: hub data (or $FORGETRAY_TASK_DATA) as lm-eval loads it
    probe_set=CC,  # the probing set: the first passages of the stream, excluded from restoring
    probe_passages=10_000,
    probe_max_length=2048,
    probe_batch_size=8,
    restore_pool=CC,
    restore_lr=3e-5,
    restore_batch_size=256,
    restore_seq_len=2048,
    max_failures=3,
)
