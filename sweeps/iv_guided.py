# forgetray run sweeps/iv_guided.py --tracking-uri http://MLFLOW:5000 --storage /shared/forgetray
"""IV-guided training against forgetting (Jiang et al., arXiv 2406.12227; docs/methods.md §8) with the released settings
of the authors' sibling code (FvForgetting): Llama-2-7b-chat, LoRA on q_proj and v_proj, lr 1e-4 constant, 10
epochs, ZeRO-2; the instruction vector from the top 10 heads by causal indirect effect, injected at layer 9 at the
last prompt token; loss = CE + 20 x KL(T=2) on the first answer token + 0.1 x KL(T=2) on all positions (each counted
above 0.1). For a GPU cluster:

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        forgetray run sweeps/iv_guided.py --tracking-uri http://MLFLOW:5000 --storage /shared/forgetray

Grid: IV-guided vs plain LoRA fine-tuning (iv_task "" = off) x two instruction sets. Every trial also runs the
dynamics probe (iv_probe_*: the same task, layer and heads) on the base, every SFT_e and every R_e, and every
checkpoint is restored on Common Crawl text, so the report's re-injection table puts SFT_e, SFT_e + the base vector
and R_e side by side. The vector's task is `sweeps/tasks/country_capital.jsonl` (60 country -> capital pairs, 10-shot
with an instruction, one of Todd et al.'s task kinds, written for this sweep; FvForgetting's own vectors come from
its training tasks, whose data is not public here): the base vector is extracted once per sweep and shared by all
trials (the IV-guided and the probe's extraction are the same folder). The extraction's prompt counts are Todd et
al.'s (100 clean, 25 corrupted); a state's extraction is 1 + 32 x 32 forwards of the 25 corrupted prompts.

Not reproduced: FvForgetting trains 1000 examples per task of its continual task sequence; forgetray trains on the
whole instruction set named here (no example cap). Settings the papers do not state are docs/methods.md's choices
(max length 512, the restoration's as sweeps/pattern_shift.py); LoRA rank 8 and alpha 16 are our choice (docs/methods.md
does not state the released rank).
"""

from pathlib import Path

from forgetray import Sweep, grid

CC = "hf:HuggingFaceFW/fineweb:CC-MAIN-2023-40"  # Common Crawl dump CC-MAIN-2023-40, streamed
TASK = str(Path(__file__).resolve().parent / "tasks" / "country_capital.jsonl")

sweep = Sweep(
    "iv-guided",
    model="meta-llama/Llama-2-7b-chat-hf",
    dataset=grid(["garage-bAInd/Open-Platypus", "meta-math/MetaMathQA"]),
    epochs=10,
    lr=1e-4,
    lr_schedule="constant",
    warmup_ratio=0.0,
    batch_size=128,  # global: 8 GPUs x micro-batch 4 x 4 accumulation steps
    micro_batch_size=4,
    workers=8,
    gpus_per_worker=1,
    cpus_per_worker=8,
    precision="bf16",
    zero_stage=2,
    max_length=512,
    lora_rank=8,
    lora_alpha=16,
    lora_targets=["q_proj", "v_proj"],
    iv_task=grid(["", TASK]),  # "" = plain LoRA fine-tuning, the comparison
    iv_layer=9,
    iv_heads=10,
    iv_site="layer",
    iv_kl_first=20.0,
    iv_kl_all=0.1,
    iv_temperature=2.0,
    iv_kl_first_threshold=0.1,
    iv_kl_all_threshold=0.1,
    iv_prompts=100,
    iv_corrupted=25,
    iv_probe_task=TASK,  # the dynamics per checkpoint and the re-injection table, for both arms
    iv_probe_layer=9,
    iv_probe_heads=10,
    iv_probe_degree=1.0,
    benchmarks=["mmlu", "arc_challenge"],
    probe_set=CC,
    probe_passages=10_000,
    probe_max_length=2048,
    probe_batch_size=8,
    restore_pool=CC,
    restore_lr=3e-5,
    restore_batch_size=256,
    restore_seq_len=2048,
    max_failures=3,
)
