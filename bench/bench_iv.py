# .venv/bin/python bench/bench_iv.py [--model organism-tiny] [--steps 2] [--repeats 5] [--batch 16] [--threads 1]
"""What IV-guided training costs (issue 12 item 4): per optimizer step next to a plain step, with LoRA and with full
fine-tuning; and extracting the heads + vector next to the bare forward passes the extraction needs.

Steps. Both sides are `forgetray.train.engine.train_epoch` on one DeepSpeed engine from `build_engine` (ZeRO 0, fp32,
one process over gloo, CPU accelerator) on the same `batch * steps` organism-alpaca examples, so every call is
exactly `steps` optimizer steps; the IV side passes a `Guide` (the vector extracted below; defaults of TrialConfig:
KL weights 20 / 0.1, T 2, no MSE). The reference is the adapters-disabled module with LoRA (rank 8 on q_proj,
v_proj) and a frozen copy of the start with full fine-tuning. The ideal ratio is one extra no-grad forward per step:
about 1.33x when a forward+backward costs 3 forwards (full fine-tuning); with LoRA the backward computes no weight
gradients for the frozen matrices, so a step is cheaper and the same extra forward weighs more (ideal ~1.4-1.5x).
The breakdown times that extra forward alone (the reference pass with the vector injected, `reference_pass`), and
the loss terms with their backward to the logits (`iv_guided_loss` on the step's batch: log-softmaxes and the KL
over every position x the vocabulary, work a plain step does not do; on a tiny model with a 1500-token vocabulary
it is not small next to the model's own forward).

Extraction. `forgetray.train.iv_guided.extract` on organism-qa (iv_prompts clean 5-shot prompts, iv_corrupted
label-shuffled ones, top iv_heads) against bare `model(input_ids, attention_mask)` calls on the same padded batches:
the forwards it needs are the clean batches twice (the correctness filter, then the activations of the kept rows,
as `extract` does them) and the corrupted batches 1 + n_layers x n_heads times (unpatched, then one per patched
head). Its ratio says what the hooks, patching and bookkeeping add.

The machine may be shared: sides are interleaved, the order flips every repeat, and the report gives medians by wall
clock and by this process's CPU time (with one thread, the CPU time is the work done; trust it when they differ).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

from machine import init_single_process_group  # bench/ is on sys.path when a script here runs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="IV-guided step vs plain step; IV extraction vs its bare forwards.")
    p.add_argument("--model", default="organism-tiny", help="organism model (default organism-tiny)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per side per repeat (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats; medians over these (default 5)")
    p.add_argument("--batch", type=int, default=16, help="sequences per optimizer step (default 16)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--prompts", type=int, default=100, help="clean prompts (iv_prompts, default 100)")
    p.add_argument("--corrupted", type=int, default=25, help="corrupted prompts (iv_corrupted, default 25)")
    p.add_argument("--layer", type=int, default=1, help="injection layer (default 1)")
    p.add_argument("--heads", type=int, default=0, help="top heads (iv_heads; default min(10, half the model's))")
    return p.parse_args(argv)


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def med(rows, i):
    return statistics.median(r[i] for r in rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the workers do (forgetray.train.worker)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    from bench_sam import machine
    from forgetray import probes
    from forgetray.data.instruct import collate, tokenize_dataset
    from forgetray.iv import head_layout, last_prompt_positions, n_shot_prompts
    from forgetray.iv import iv_guided_loss
    from forgetray.iv.builtin import builtin_task
    from forgetray.models import load_model, load_tokenizer
    from forgetray.plan import ift_phase
    from forgetray.resources import resolve_dataset, resolve_model
    from forgetray.spec import TrialConfig
    from forgetray.train import iv_guided, lora
    from forgetray.train.deepspeed_config import deepspeed_config
    from forgetray.train.engine import build_engine, train_epoch

    init_single_process_group()
    device = torch.device("cpu")
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    pad = probes.padding_id(tokenizer)
    task = builtin_task("organism-qa")
    print(machine(args.threads))

    # --- extraction vs its forwards -----------------------------------------------------------------------------
    model = load_model(source, "fp32").eval()
    layout = head_layout(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model}, {layout.n_layers} layers x {layout.n_heads} heads, {n_params / 1e6:.2f}M parameters")
    trial = TrialConfig(model=args.model, iv_task="organism-qa", iv_layer=args.layer, iv_prompts=args.prompts,
                        iv_corrupted=args.corrupted,
                        iv_heads=args.heads or min(10, layout.n_layers * layout.n_heads // 2), batch_size=args.batch, workers=1, lr=1e-3, warmup_ratio=0.0,
                        lr_schedule="constant", epochs=1)
    settings = ift_phase(trial).iv
    extract = lambda: iv_guided.extract(model, tokenizer, task, settings, "always", trial.max_length,  # noqa: E731
                                        trial.probe_batch_size, trial.seed, device)
    def prompt_batches(prompts):
        return iv_guided.batches(iv_guided.encode_prompts(tokenizer, prompts, "always", trial.max_length),
                                 trial.probe_batch_size, pad, device)

    clean = prompt_batches(n_shot_prompts(task, settings.prompts, trial.seed))
    corrupt = prompt_batches(n_shot_prompts(task, settings.corrupted, trial.seed + 1, corruption="shuffle_labels"))

    @torch.no_grad()
    def bare():  # the forwards extract needs, nothing else
        for _ in range(2):
            for b in clean:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        for _ in range(1 + layout.n_layers * layout.n_heads):
            for b in corrupt:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    found = extract()
    print(f"extraction: organism-qa, {found['clean_correct']}/{found['clean_prompts']} clean prompts answered "
          f"correctly, {found['corrupted_prompts']} corrupted, top heads {found['heads']} (CIE "
          f"{', '.join(f'{s:.4f}' for s in found['scores'][:3])}, ...), vector norm {found['vector'].norm():.1f}")
    bare()
    ext_rows = []
    for r in range(args.repeats):
        got = {}
        for side in (("extract", "bare") if r % 2 == 0 else ("bare", "extract")):
            wall, cpu, _ = timed(extract if side == "extract" else bare)
            got[side] = (wall, cpu)
        ext_rows.append((got["extract"][0], got["extract"][1], got["bare"][0], got["bare"][1]))
    n_fwd = 2 * len(clean) + (1 + layout.n_layers * layout.n_heads) * len(corrupt)
    print(f"  extract: {med(ext_rows, 0):.2f} s wall / {med(ext_rows, 1):.2f} s CPU; its {n_fwd} bare forwards: "
          f"{med(ext_rows, 2):.2f} s / {med(ext_rows, 3):.2f} s; ratio {med(ext_rows, 0) / med(ext_rows, 2):.2f} "
          f"wall, {med(ext_rows, 1) / med(ext_rows, 3):.2f} CPU")
    del model

    # --- steps ---------------------------------------------------------------------------------------------------
    data = tokenize_dataset(resolve_dataset("organism-alpaca"), tokenizer, trial.max_length).to_list()
    data = data[: args.batch * args.steps]
    print(f"steps: organism-alpaca, {args.batch} sequences per step ({sum(len(d['input_ids']) for d in data)} tokens "
          f"in {args.steps} steps), {args.steps} steps per side per repeat, {args.repeats} repeats (+1 warm-up)")
    print(f"{'fine-tuning':>12} {'plain s/step':>13} {'IV s/step':>10} {'ratio':>6} {'CPU ratio':>9} "
          f"{'ref fwd s':>10} {'(plain+ref)/plain':>18} {'loss s':>8} {'(plain+ref+loss)/plain':>23}")
    for mode in ("lora", "full"):
        phase = ift_phase(TrialConfig(**{**{k: getattr(trial, k) for k in ("model", "batch_size", "workers", "lr",
                                                                          "warmup_ratio", "lr_schedule", "epochs")},
                                         "lora_rank": 8 if mode == "lora" else 0, "iv_task": "organism-qa",
                                         "iv_layer": args.layer, "iv_heads": trial.iv_heads}))
        model = load_model(source, "fp32")
        reference = iv_guided.frozen_reference(model, device) if mode == "full" else None
        model = lora.wrap(model, phase.lora)
        engine, _ = build_engine(model, phase, deepspeed_config(phase, 0, "fp32"),
                                 total_steps=(args.repeats + 1) * args.steps * 2)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        guide = iv_guided.make_guide(phase.iv, found, reference, (args.repeats + 1) * args.steps, device)
        batch = collate(data[: args.batch], pad)  # one step's batch (one worker, no accumulation)
        positions = last_prompt_positions(batch["labels"])

        def run(with_guide):
            return train_epoch(engine, data, phase, epoch=1, seed=0, rank=0, world=1, pad_id=pad, device=device,
                               guide=guide if with_guide else None)

        def ref_only():
            return iv_guided.reference_pass(guide, engine.module, batch, positions, 1.0)[0]

        ref_logits = ref_only()

        def loss_only():  # the loss terms and their backward to the logits (vocab-sized work per token)
            logits = ref_logits.detach().clone().requires_grad_(True)
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
            iv_guided_loss(ce, logits, ref_logits + 0.01, positions, guide.weights)["loss"].backward()

        run(False), run(True), loss_only()  # warm-up
        rows, refs, losses = [], [], []
        for r in range(args.repeats):
            got = {}
            for side in ((False, True) if r % 2 == 0 else (True, False)):
                wall, cpu, _ = timed(lambda: run(side))
                got[side] = (wall / args.steps, cpu / args.steps)
            rows.append((*got[False], *got[True]))
            refs.append(timed(ref_only)[:2])
            losses.append(timed(loss_only)[:2])
        plain, ivs = med(rows, 0), med(rows, 2)
        ref, loss = statistics.median(w for w, _ in refs), statistics.median(w for w, _ in losses)
        print(f"{mode:>12} {plain:13.3f} {ivs:10.3f} {ivs / plain:6.2f} {med(rows, 3) / med(rows, 1):9.2f} "
              f"{ref:10.3f} {(plain + ref) / plain:18.2f} {loss:8.3f} {(plain + ref + loss) / plain:23.2f}")
        engine.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
