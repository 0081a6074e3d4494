# forgetray run sweeps/llama2_alpaca.py --tracking-uri http://MLFLOW:5000 --storage /shared/forgetray
"""Instruction fine-tuning of Llama-2 7B/13B on Alpaca with the Pattern-Shifting paper's settings (METHODS.md §1),
a checkpoint after every epoch, probed on MMLU and ARC-Challenge. For a GPU cluster: submit with

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        forgetray run sweeps/llama2_alpaca.py --tracking-uri http://MLFLOW:5000 --storage /shared/forgetray

The data paths are files on the cluster's shared storage: `alpaca_data.json` is Stanford Alpaca's release, and the
benchmarks are MMLU / ARC-Challenge exported to forgetray's MMLU-style JSONL ({"question", "choices", "answer"}).
"""

from forgetray import Sweep, grid

sweep = Sweep(
    "llama2-alpaca",
    model=grid(["meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf"]),
    dataset="/shared/data/alpaca_data.json",
    epochs=10,
    lr=2e-5,
    batch_size=256,  # global batch (PS): 8 GPUs x micro-batch 4 x 8 accumulation steps
    micro_batch_size=4,
    workers=8,
    gpus_per_worker=1,
    cpus_per_worker=8,
    precision="bf16",
    zero_stage=3,
    max_length=512,
    warmup_ratio=0.03,
    lr_schedule="cosine",
    benchmarks=["/shared/data/mmlu_test.jsonl", "/shared/data/arc_challenge_test.jsonl"],
    n_shot=5,  # MMLU's standard 5-shot letter protocol (PS)
    probe_set="/shared/data/cc_probe.jsonl",
    probe_passages=10_000,
    probe_max_length=2048,
    probe_batch_size=8,
    max_failures=3,
)
