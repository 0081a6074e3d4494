# python3 bench/bench_speed.py [--peak-flops 989e12] [--seq 2048] [--micro-batch 8] [--steps 5] [--rounds 2]
# python3 bench/bench_speed.py --smoke        # CPU: tiny model, fp32, gloo, the same rows, a couple of steps
"""forgetray's IFT step with each speed setting (plan.Speed) alone and together, next to a plain loop with the same
numerics, on instruction data of Alpaca's shape: real (non-pad) tokens/s and MFU, side by side in one run.

Data: `--n` examples whose token lengths are drawn from a log-normal with median 200 and sigma 0.8 (Alpaca's shape:
most examples a few hundred Llama tokens, a long right tail; an assumption, the real set is not read here), capped
at `--seq`; the first 40% of each example is its prompt (labels -100). Random token ids. Batches: `--micro-batch`
examples per forward, padded to the longest (or packed into one row with `packing`).

Rows, one ZeRO-2 engine per model state, all in one process on one GPU (bf16; the smoke run fp32 on the CPU):
- same-numerics loop: what forgetray's DeepSpeed bf16 step computes, written plainly: bf16 weights for forward and
  backward, fp32 master weights and AdamW states (torch AdamW, fused on CUDA), gradients clipped to norm 1.0 in
  fp32, the bf16 weights refreshed from the masters. The row forgetray must match.
- forgetray: `train_epoch` on the engine from `build_engine`, padded, model loss; then + `packing`,
  + `chunked_loss` (1024 positions; smoke 16), + `compile` (a second engine: torch.compile changes the module),
  and all three together (the compiled engine).
Every row trains the same examples in the same batches (`epoch_order`); ratio = row / the forgetray padded row.
Real-token throughput counts the examples' tokens, never padding; MFU = 6 x N_matmul x real tokens/s / peak.

Imports only torch, transformers, deepspeed and forgetray's training primitives (no Ray, MLflow or `datasets`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import time

from bench_gpu import FULL, SMOKE, init_process_group, sync
from machine import cpu_name, usable_cores


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU check: tiny fp32 model, gloo, few steps")
    p.add_argument("--peak-flops", type=float, default=989e12, help="peak dense bf16 FLOP/s (default: H100 SXM)")
    p.add_argument("--seq", type=int, help="longest example in tokens (default 2048; smoke 256)")
    p.add_argument("--micro-batch", type=int, help="examples per forward (default 8; smoke 4)")
    p.add_argument("--steps", type=int, help="timed optimizer steps per row per round (default 5; smoke 2)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--layers", type=int, help="hidden layers (default 16; smoke 2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name, full, small in (("seq", 2048, 256), ("micro_batch", 8, 4), ("steps", 5, 2), ("layers", 16, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.smoke else full)
    return args


def alpaca_shaped(n: int, seq: int, vocab: int, seed: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    scale = seq / 2048  # the smoke run keeps the shape at its short length
    lengths = torch.exp(torch.randn(n, generator=g) * 0.8 + torch.log(torch.tensor(200.0 * scale)))
    out = []
    for length in lengths.clamp(8, seq).round().int().tolist():
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = max(1, int(0.4 * length))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def same_numerics_side(model, data, micro: int, seed: int, device):
    """bf16 forward/backward, fp32 masters and AdamW, clipping 1.0 in fp32: forgetray's DeepSpeed bf16 step."""
    import torch

    from forgetray.data.instruct import collate
    from forgetray.train.engine import epoch_order

    params = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float().clone().requires_grad_(True) for p in params]
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(masters, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **fused)

    def run(epoch: int) -> float:
        order, tokens = epoch_order(len(data), seed, epoch), 0
        for step in range(len(data) // micro):
            examples = [data[i] for i in order[step * micro:(step + 1) * micro].tolist()]
            tokens += sum(len(ex["input_ids"]) for ex in examples)
            batch = {k: v.to(device) for k, v in collate(examples, 0).items()}
            model(**batch, use_cache=False).loss.backward()
            for p, m in zip(params, masters):
                m.grad = p.grad.float()
                p.grad = None
            torch.nn.utils.clip_grad_norm_(masters, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, m in zip(params, masters):
                    p.copy_(m)
        return float(tokens)
    return run


def forgetray_side(engine, phase, data, seed: int, device):
    from forgetray.train.engine import train_epoch

    def run(epoch: int) -> float:
        return train_epoch(engine, data, phase, epoch, seed, 0, 1, 0, device)["tokens"]
    return run


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig

    from forgetray.plan import Speed, ift_phase
    from forgetray.spec import TrialConfig
    from forgetray.train.deepspeed_config import deepspeed_config
    from forgetray.train.engine import build_engine

    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU (use --smoke for the CPU check)", file=sys.stderr)
        return 2
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    smoke = args.smoke
    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    dtype, precision = (torch.float32, "fp32") if smoke else (torch.bfloat16, "bf16")
    if smoke:
        torch.set_num_threads(1)
    init_process_group("gloo" if smoke else "nccl")
    shape = dict(SMOKE if smoke else FULL, num_hidden_layers=args.layers)
    config = LlamaConfig(**shape, max_position_embeddings=max(args.seq, 2048), tie_word_embeddings=False,
                         use_cache=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    n = args.micro_batch * args.steps
    data = alpaca_shaped(n, args.seq, shape["vocab_size"], args.seed)
    torch.manual_seed(args.seed)
    with torch.device(device):
        first = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    state = {k: v.detach().clone() for k, v in first.state_dict().items()}
    n_matmul = sum(p.numel() for p in first.parameters()) - first.get_input_embeddings().weight.numel()

    def model():
        with torch.device(device):
            m = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
        m.load_state_dict(state)
        return m.train()

    trial = TrialConfig(batch_size=args.micro_batch, workers=1, gpus_per_worker=0 if smoke else 1, zero_stage=2,
                        precision=precision, lr=1e-5, warmup_ratio=0.0, lr_schedule="constant", max_length=args.seq,
                        epochs=1, seed=args.seed)
    base = ift_phase(trial)
    chunk = 16 if smoke else 1024

    def phase(**speed):
        return dataclasses.replace(base, speed=Speed(**speed))

    engines = {}
    for key, compiled in (("eager", False), ("compiled", True)):
        engines[key], _ = build_engine(model(), phase(compile=compiled), deepspeed_config(base, 2, precision),
                                       total_steps=10**6)
    sides = {
        "same-numerics loop (fp32 masters, clip 1.0)": same_numerics_side(model(), data, args.micro_batch,
                                                                             args.seed, device),
        "forgetray, padded": forgetray_side(engines["eager"], phase(), data, args.seed, device),
        "forgetray + packing": forgetray_side(engines["eager"], phase(packing=True), data, args.seed, device),
        f"forgetray + chunked_loss {chunk}": forgetray_side(engines["eager"], phase(chunked_loss=chunk), data,
                                                            args.seed, device),
        "forgetray + compile": forgetray_side(engines["compiled"], phase(compile=True), data, args.seed, device),
        "forgetray + all three": forgetray_side(engines["compiled"], phase(packing=True, compile=True,
                                                                           chunked_loss=chunk), data, args.seed,
                                                device),
    }
    real = sum(len(ex["input_ids"]) for ex in data)
    padded = sum(args.micro_batch * max(len(ex["input_ids"]) for ex in data[i:i + args.micro_batch])
                 for i in range(0, n, args.micro_batch))
    print(f"forgetray speed-settings bench{' --smoke' if smoke else ''}: ZeRO-2, {precision}, 1 process, SDPA")
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "none (CPU smoke run)"
    print(f"machine: gpu {gpu} | cpu {cpu_name()}, {usable_cores()} cores | torch {torch.__version__} | "
          f"transformers {transformers.__version__} | deepspeed {deepspeed.__version__}")
    print(f"data: {n} Alpaca-shaped examples (log-normal lengths, median {200 * args.seq / 2048:.0f}, cap {args.seq}), "
          f"{real} real tokens; padded batches of {args.micro_batch} hold {padded} ({real / padded:.0%} real)")
    for run in sides.values():  # warm-up (and the compile) untimed
        run(0)
    times = {key: [] for key in sides}
    order = list(sides.items())
    for r in range(args.rounds):
        for key, run in (order if r % 2 == 0 else order[::-1]):
            sync(device.type == "cuda")
            t0 = time.perf_counter()
            tokens = run(r + 1)
            sync(device.type == "cuda")
            times[key].append(tokens / (time.perf_counter() - t0))
    reference = statistics.median(times["forgetray, padded"])
    print(f"\n{'row':<48}{'real tok/s':>12}{'MFU':>8}{'vs padded':>11}")
    for key, rates in times.items():
        rate = statistics.median(rates)
        print(f"{key:<48}{rate:>12,.0f}{100 * 6 * n_matmul * rate / args.peak_flops:>7.1f}%{rate / reference:>11.3f}")
    for engine in engines.values():
        engine.destroy()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())
