# .venv/bin/python bench/bench_sam.py [--steps 2] [--repeats 7] [--batch 16] [--seq 256] [--threads 1]
"""What one SAM optimizer step costs next to a plain one, in forgetray's real DeepSpeed training loop.

Both sides are `forgetray.train.engine.train_epoch` on one engine from `build_engine` (ZeRO stage 0, fp32, one process
over gloo, DeepSpeed's CPU accelerator), fed the same list of `batch * steps` examples, so every call is exactly
`steps` optimizer steps. The two sides differ only in the IFT phase handed to `train_epoch`: sam_rho = 0 (plain
AdamW: one forward/backward per step) or sam_rho = 0.05 (every step is a `sam_step`: two). Their DeepSpeed configs
are identical (checked), so one engine serves both and both see the same weights, the same batches and the same
optimizer. The ideal ratio SAM / plain is 2.0x.

Model: a random `LlamaForCausalLM` of 4 layers, hidden 192, 6 heads, intermediate 512, vocab
1500, tied embeddings, fp32); data: random token ids, labels = inputs, all sequences `--seq` long (no padding).

The machine may be shared, so the two sides are interleaved: each repeat runs `steps` plain steps and `steps` SAM
steps (the order flips every repeat, which cancels slow drift), and the report gives per-step medians over repeats,
by wall clock (`perf_counter`) and by this process's CPU time (`process_time`, which other processes disturb less).

Breakdown, measured in the same repeats on the same first batch: one forward+backward by plain autograd on the bare
module (what SAM's first pass is, `torch.autograd.grad` as `sam_step` does it), the perturbation maths
(`forgetray.methods.sam.perturbation`), and the weight save / add e / restore copies. With one rank the extra
gradient all-reduce of `sam_step` is skipped, so SAM ~= plain + fwd/bwd + perturbation + copies; the remainder is
what the report calls "unexplained".
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time

from machine import cpu_name, init_single_process_group, usable_cores  # bench/ is on sys.path when a script here runs


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time per optimizer step: forgetray's DeepSpeed step with SAM vs "
                                                 "without, side by side.")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per mode per repeat (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats; medians over these (default 7)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per optimizer step (default 16)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--rho", type=float, default=0.05, help="SAM radius of the SAM side (default 0.05)")
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "batch", "seq", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.rho <= 0:
        parser.error("--rho must be > 0 (0 is the plain side)")
    return args


def machine(threads: int) -> str:
    import torch

    cpu, usable = cpu_name(), usable_cores()
    try:
        import deepspeed

        ds = deepspeed.__version__
    except Exception:  # noqa: BLE001 (a version string only)
        ds = "?"
    return (f"machine: {platform.platform()} | cpu: {cpu or '?'} | cpus: {os.cpu_count()} (usable {usable}) | "
            f"python {platform.python_version()} | torch {torch.__version__} | deepspeed {ds} | "
            f"threads {torch.get_num_threads()} (asked {threads}) | "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")


def build_model(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1500, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).float()


def make_examples(n: int, seq: int, vocab: int, seed: int = 1) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g).tolist()
    return [{"input_ids": row, "labels": list(row)} for row in ids]


def timed(fn):
    """(wall seconds, CPU seconds, result) of fn()."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def main(argv=None) -> int:
    args = parse_args(argv)
    # Before torch/deepspeed are imported: one thread, and DeepSpeed on its CPU accelerator even where a GPU exists.
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))
    os.environ["DS_ACCELERATOR"] = "cpu"

    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    from forgetray.data.instruct import collate
    from forgetray.methods.sam import perturbation
    from forgetray.spec import TrialConfig
    from forgetray.train.deepspeed_config import deepspeed_config
    from forgetray.plan import ift_phase
    from forgetray.train.engine import build_engine, epoch_order, train_epoch

    init_single_process_group()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    device = torch.device("cpu")
    pad_id = 0

    common = dict(batch_size=args.batch, workers=1, zero_stage=0, precision="fp32", lr=1e-3, warmup_ratio=0.0,
                  lr_schedule="constant", max_length=args.seq, epochs=1)
    plain_trial = TrialConfig(sam_rho=0.0, **common)
    plain_phase = ift_phase(plain_trial)
    sam_phase = ift_phase(TrialConfig(sam_rho=args.rho, sam_adaptive=False, sam_every=1, **common))
    ds_config = deepspeed_config(plain_phase, 0, "fp32")
    assert ds_config == deepspeed_config(sam_phase, 0, "fp32"), "SAM changes the DeepSpeed config: one engine cannot serve both"

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    total_steps = (args.repeats + 1) * args.steps * 2
    engine, _ = build_engine(model, plain_phase, ds_config, total_steps=total_steps)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    data = make_examples(args.batch * args.steps, args.seq, model.config.vocab_size)

    # The breakdown's batch: train_epoch's first global batch (same order, same collate).
    first = epoch_order(len(data), plain_trial.seed, 1)[: args.batch].tolist()
    batch = {k: v.to(device) for k, v in collate([data[i] for i in first], pad_id).items()}
    params = [p for p in engine.module.parameters() if p.requires_grad]

    def run(phase) -> dict:
        stats = train_epoch(engine, data, phase, epoch=1, seed=plain_trial.seed, rank=0, world=1, pad_id=pad_id,
                            device=device)
        assert stats["steps"] == args.steps, stats
        return stats

    def fwd_bwd():  # SAM's first pass: plain autograd on the bare module, no DeepSpeed hooks
        loss = engine.module(**batch).loss
        return torch.autograd.grad(loss, params, allow_unused=True)

    def sam_extras(grads):  # the rest of sam_step's own work: e, save w, w += e, restore w
        def work():
            e = perturbation(params, grads, args.rho, False)
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, step in zip(params, e):
                    p.add_(step.to(p.dtype))
                for p, w in zip(params, saved):
                    p.copy_(w)
        return work

    def perturb_only(grads):
        return lambda: perturbation(params, grads, args.rho, False)

    print(machine(args.threads))
    print(f"model: random Llama (4 layers, hidden 192, 6 heads, intermediate 512, vocab 1500, "
          f"tied, fp32), {n_params / 1e6:.2f}M parameters")
    print(f"batch: {args.batch} x {args.seq} tokens = {args.batch * args.seq} tokens per optimizer step; "
          f"{args.steps} steps per mode per repeat, {args.repeats} repeats (+1 warm-up), SAM rho {args.rho}")
    print("engine: forgetray build_engine (DeepSpeed ZeRO 0, CPU accelerator, gloo world 1), timed through train_epoch")
    print(flush=True)

    # Warm-up (not timed): Adam state, allocator, DeepSpeed's first-step set-up, both code paths.
    run(plain_phase)
    run(sam_phase)
    fwd_bwd()

    rows = {"plain": [], "sam": [], "fwd_bwd": [], "perturb": [], "extras": []}  # (wall, cpu) per step / per call
    ratios, cpu_ratios = [], []
    print(f"{'repeat':>6} {'order':>11} {'plain s/step':>13} {'SAM s/step':>11} {'ratio':>6} {'CPU ratio':>9} "
          f"{'fwd+bwd s':>10}", flush=True)
    for r in range(args.repeats):
        order = ("plain", "sam") if r % 2 == 0 else ("sam", "plain")
        got = {}
        for mode in order:
            wall, cpu, _ = timed(lambda: run(plain_phase if mode == "plain" else sam_phase))
            got[mode] = (wall / args.steps, cpu / args.steps)
            rows[mode].append(got[mode])
        wall, cpu, grads = timed(fwd_bwd)
        rows["fwd_bwd"].append((wall, cpu))
        wall, cpu, _ = timed(perturb_only(grads))
        rows["perturb"].append((wall, cpu))
        wall, cpu, _ = timed(sam_extras(grads))
        rows["extras"].append((wall, cpu))
        del grads
        ratio = got["sam"][0] / got["plain"][0]
        ratios.append(ratio)
        cpu_ratios.append(got["sam"][1] / got["plain"][1])
        print(f"{r + 1:>6} {'/'.join(order):>11} {got['plain'][0]:>13.3f} {got['sam'][0]:>11.3f} {ratio:>5.2f}x "
              f"{cpu_ratios[-1]:>8.2f}x {rows['fwd_bwd'][-1][0]:>10.3f}", flush=True)

    def med(key: str, i: int) -> float:
        return statistics.median(v[i] for v in rows[key])

    plain_w, plain_c, sam_w, sam_c = med("plain", 0), med("plain", 1), med("sam", 0), med("sam", 1)
    fb_w, fb_c = med("fwd_bwd", 0), med("fwd_bwd", 1)
    pe_w, pe_c = med("perturb", 0), med("perturb", 1)
    ex_w, ex_c = med("extras", 0), med("extras", 1)
    print()
    print(f"{'per optimizer step (median)':<40} {'wall s':>9} {'CPU s':>9}")
    print(f"{'plain (sam_rho=0)':<40} {plain_w:>9.3f} {plain_c:>9.3f}")
    print(f"{f'SAM (sam_rho={args.rho})':<40} {sam_w:>9.3f} {sam_c:>9.3f}")
    print(f"{'ratio of medians SAM / plain (ideal 2x)':<40} {sam_w / plain_w:>8.2f}x {sam_c / plain_c:>8.2f}x")
    print(f"{'median of per-repeat ratios':<40} {statistics.median(ratios):>8.2f}x "
          f"{statistics.median(cpu_ratios):>8.2f}x")
    print(f"per-repeat wall ratios: {' '.join(f'{x:.2f}' for x in ratios)} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    print()
    print("breakdown of a SAM step (medians over repeats; the one-off calls on the first batch):")
    print(f"  {'':<48} {'wall s':>8} {'CPU s':>8}")
    lines = [
        ("plain step (engine fwd+bwd, clip, AdamW)", plain_w, plain_c),
        ("+ fwd+bwd, plain autograd on the module", fb_w, fb_c),
        ("+ e + save w + (w += e) + restore w", ex_w, ex_c),
        ("    of which the perturbation maths (e)", pe_w, pe_c),
        ("+ gradient all-reduce (world 1: skipped)", 0.0, 0.0),
    ]
    for name, w, c in lines:
        print(f"  {name:<48} {w:>8.3f} {c:>8.3f}")
    pred_w, pred_c = plain_w + fb_w + ex_w, plain_c + fb_c + ex_c
    print(f"  {'= predicted SAM step':<48} {pred_w:>8.3f} {pred_c:>8.3f}  "
          f"({pred_w / plain_w:.2f}x / {pred_c / plain_c:.2f}x plain)")
    print(f"  {'measured SAM step':<48} {sam_w:>8.3f} {sam_c:>8.3f}  "
          f"({sam_w / plain_w:.2f}x / {sam_c / plain_c:.2f}x plain)")
    print(f"  {'unexplained (measured - predicted)':<48} {sam_w - pred_w:>+8.3f} {sam_c - pred_c:>+8.3f}")
    print(f"  {'engine + optimizer share of a plain step':<48} {plain_w - fb_w:>+8.3f} {plain_c - fb_c:>+8.3f}  "
          f"(plain step - module fwd+bwd; SAM pays it once, so below 2x)")

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
