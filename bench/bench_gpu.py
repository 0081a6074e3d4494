# python3 bench/bench_gpu.py [--peak-flops 989e12] [--seq 2048] [--micro-batch 4] [--steps 5] [--rounds 2]
# python3 bench/bench_gpu.py --smoke        # CPU: tiny model, fp32, gloo, the same rows, a couple of steps
"""forgetray's training phase on one GPU next to a plain PyTorch loop: tokens/s and MFU, side by side in one run.

Model: a random-init Llama of TinyLlama's shape with 16 layers (hidden 2048, 32 heads, 4 KV heads, intermediate 5632,
vocab 32000, untied head; ~0.84 B parameters), bf16, SDPA attention (`attn_implementation="sdpa"`). Data: random
token ids, every sequence `--seq` tokens long (no padding), labels = inputs.

Sides, all run in one process on one GPU (DeepSpeed world size 1 over an NCCL group of one):
- forgetray: `forgetray.train.engine.train_epoch` on the engine from `build_engine` (torch AdamW, constant lr,
  gradient clipping 1.0) with `deepspeed_config(ift_phase(TrialConfig(...)), zero_stage, "bf16")`: DeepSpeed's
  bf16 mode, which keeps fp32 master weights and fp32 AdamW states.
- plain: the same bf16 model, `collate`, forward, `loss.backward()`, `torch.optim.AdamW.step()` on the bf16 weights
  (no fp32 master copy, no clipping, no schedule), `zero_grad()`: the house's plain loop (bench/throughput_training.py).
- SAM: forgetray's `train_epoch` with sam_rho 0.05 on the ZeRO-2 engine (two forward/backward passes per step).
Gradient checkpointing (`gradient_checkpointing_enable(use_reentrant=False)`) is switched on and off on the same
models between calls.

Two groups, because one GPU cannot hold every engine at once: the ZeRO-2 engine + the plain model (rows: plain and
forgetray ZeRO-2 with checkpointing off/on, SAM), then the ZeRO-2 engine is destroyed and a ZeRO-3 engine is built
from the same initial weights (rows: plain again and forgetray ZeRO-3, checkpointing off/on). Within a group the sides
take turns: every round runs each side once for `--steps` optimizer steps, the order reversed every other round;
`--warmup` untimed steps per side come first. Each row's ratio is against the baseline measured in the same group
and rounds. The first warm-up step of every forgetray engine and of the plain loop starts from the same weights on the
same batch: their losses are printed as a check that all sides compute the same model.

FLOPs (model FLOPs, PaLM-style MFU): per trained token 6 x N, N = the parameters used in matmuls (all but the input
embedding, whose lookup is no matmul; the untied LM head is counted), plus causal attention 6 x L x s x h (QK^T and
AV: 4 x s x h per layer forward at full s x s, halved for the causal mask, x3 for forward + backward). Recomputation
under gradient checkpointing is NOT counted (it is hardware work, not model work), so checkpointing lowers MFU.
SAM is counted at 2 forward+backward passes per trained token. MFU = FLOPs/s / `--peak-flops` (default 989e12:
H100 SXM bf16 dense).

`--smoke`: the same rows on the CPU (DeepSpeed's CPU accelerator, gloo, fp32, a 2-layer 64-wide Llama, the same ZeRO
stages 2 and 3, which DeepSpeed runs on its CPU accelerator too, one step per round): for tests/test_bench_gpu.py, so
that the code path the GPU run takes is exercised before it; its numbers mean nothing.

Imports only torch, transformers, deepspeed, forgetray's training primitives (which load no Ray, MLflow or
`datasets`) and bench/machine.py (stdlib): the GPU machine has no Ray, MLflow or `datasets`.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import socket
import statistics
import sys
import time

from machine import cpu_name, usable_cores  # bench/ is on sys.path when a script here runs (stdlib only)

HEAVY = ("ray", "mlflow", "datasets", "pyarrow")  # not on the GPU machine: must not be imported
FULL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=4)
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="forgetray's training phase vs a plain PyTorch loop on one GPU: "
                                            "tokens/s and MFU under ZeRO-2/3, gradient checkpointing off/on, SAM.")
    p.add_argument("--smoke", action="store_true", help="CPU check: tiny fp32 model, gloo, few steps")
    p.add_argument("--peak-flops", type=float, default=989e12,
                   help="the GPU's peak dense bf16 FLOP/s (default 989e12, H100 SXM)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 2048; smoke 32)")
    p.add_argument("--micro-batch", type=int, help="sequences per forward pass (default 4; smoke 2)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--warmup", type=int, help="untimed optimizer steps per side (default 3; smoke 1)")
    p.add_argument("--steps", type=int, help="timed optimizer steps per side per round (default 5; smoke 1)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--layers", type=int, help="hidden layers (default 16; smoke 2)")
    p.add_argument("--stages", default="2,3", help="the two ZeRO stages compared (default 2,3)")
    p.add_argument("--rho", type=float, default=0.05, help="SAM radius (default 0.05)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    smoke = args.smoke
    for name, full, small in (("seq", 2048, 32), ("micro_batch", 4, 2), ("warmup", 3, 1), ("steps", 5, 1),
                              ("layers", 16, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if smoke else full)
    args.stages = tuple(int(s) for s in args.stages.split(","))
    for name in ("seq", "micro_batch", "grad_accum", "warmup", "steps", "rounds", "layers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(s not in (0, 1, 2, 3) for s in args.stages) or len(args.stages) != 2:
        p.error("--stages takes two ZeRO stages, e.g. 2,3")
    return args


def init_process_group(backend: str) -> None:
    """A group of one on a free local port, set up the way a launcher would (DeepSpeed expects torch.distributed)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    dist.init_process_group(backend, rank=0, world_size=1)


class Bench:
    """The model, data and sides of one run; `group()` times a set of sides interleaved."""

    def __init__(self, args, device, dtype):
        import torch
        from transformers import LlamaConfig

        self.args, self.device, self.dtype = args, device, dtype
        shape = dict(SMOKE if args.smoke else FULL, num_hidden_layers=args.layers)
        self.config = LlamaConfig(**shape, max_position_embeddings=max(args.seq, 2048), tie_word_embeddings=False,
                                  use_cache=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        self.batch = args.micro_batch * args.grad_accum  # sequences per optimizer step (world size 1)
        g = torch.Generator().manual_seed(args.seed + 1)
        n = self.batch * max(args.steps, args.warmup)
        ids = torch.randint(3, shape["vocab_size"], (n, args.seq), generator=g).tolist()
        self.data = [{"input_ids": row, "labels": list(row)} for row in ids]
        self.timed_data = self.data[:self.batch * args.steps]
        self.warm_data = self.data[:self.batch * args.warmup]
        model = self.new_model()
        self.init_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.n_params = sum(p.numel() for p in model.parameters())
        self.n_matmul = self.n_params - model.get_input_embeddings().weight.numel()
        self.attn_implementation = model.config._attn_implementation
        del model
        h, L, s = shape["hidden_size"], shape["num_hidden_layers"], args.seq
        self.flops_per_token = 6 * self.n_matmul + 6 * L * s * h
        self.first_losses: dict[str, float] = {}

    def new_model(self):
        """The random Llama on the device in the run's dtype, SDPA attention; same weights every time after the first
        (loaded from the first one's state)."""
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(self.args.seed)
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(self.config, attn_implementation="sdpa", dtype=self.dtype)
        if hasattr(self, "init_state"):
            model.load_state_dict(self.init_state)
        model.config.use_cache = False
        return model.train()

    def phase(self, zero_stage: int, sam_rho: float = 0.0):
        from forgetray.plan import ift_phase
        from forgetray.spec import TrialConfig

        return ift_phase(TrialConfig(
            batch_size=self.batch, micro_batch_size=self.args.micro_batch, workers=1,
            gpus_per_worker=0 if self.args.smoke else 1, zero_stage=zero_stage,
            precision="fp32" if self.args.smoke else "bf16", lr=1e-4, warmup_ratio=0.0, lr_schedule="constant",
            max_length=self.args.seq, epochs=1, seed=self.args.seed, sam_rho=sam_rho))

    def engine(self, zero_stage: int):
        from forgetray.train.deepspeed_config import deepspeed_config
        from forgetray.train.engine import build_engine

        phase = self.phase(zero_stage)
        ds_config = deepspeed_config(phase, zero_stage, "fp32" if self.args.smoke else "bf16")
        engine, _ = build_engine(self.new_model(), phase, ds_config, total_steps=10**6)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        return engine, phase, ds_config

    # --- the sides: each runs len(data) / batch optimizer steps and returns the tokens it trained on ---

    def forgetray_side(self, engine, phase, checkpointing: bool, key: str):
        from forgetray.train.engine import train_epoch

        def run(data, epoch: int) -> float:
            set_checkpointing(engine.module, checkpointing)
            stats = train_epoch(engine, data, phase, epoch, self.args.seed, 0, 1, 0, self.device)
            if stats["steps"] != len(data) // self.batch:
                raise RuntimeError(f"{key}: {stats['steps']} steps, expected {len(data) // self.batch}")
            return stats["tokens"]
        return run

    def plain_side(self, model, optimizer, checkpointing: bool):
        import torch

        from forgetray.data.instruct import collate
        from forgetray.train.engine import epoch_order

        def run(data, epoch: int) -> float:
            set_checkpointing(model, checkpointing)
            order, tokens = epoch_order(len(data), self.args.seed, epoch), 0
            losses = []
            for step in range(len(data) // self.batch):
                idx = order[step * self.batch:(step + 1) * self.batch].tolist()
                for m in range(self.args.grad_accum):
                    part = idx[m * self.args.micro_batch:(m + 1) * self.args.micro_batch]
                    host = collate([data[i] for i in part], 0)
                    tokens += int(host["attention_mask"].sum())  # counted on the host: no GPU sync per micro-batch
                    batch = {k: v.to(self.device) for k, v in host.items()}
                    loss = model(**batch).loss
                    (loss / self.args.grad_accum).backward()
                    losses.append(loss.detach().float())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            float(torch.stack(losses).mean())  # like train_epoch: the losses reach the host
            return float(tokens)
        return run

    def group(self, sides: dict) -> dict:
        """Warm up every side, then `rounds` interleaved rounds; -> per side: [(seconds, tokens)], peak GiB."""
        import torch

        cuda = self.device.type == "cuda"
        for run in sides.values():
            run(self.warm_data, 0)
        sync(cuda)
        out = {key: {"times": [], "peak": 0.0} for key in sides}
        order = list(sides.items())
        for r in range(self.args.rounds):
            for key, run in (order if r % 2 == 0 else order[::-1]):
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                sync(cuda)
                t0 = time.perf_counter()
                tokens = run(self.timed_data, r + 1)
                sync(cuda)
                out[key]["times"].append((time.perf_counter() - t0, tokens))
                if cuda:
                    out[key]["peak"] = max(out[key]["peak"], torch.cuda.max_memory_allocated() / 2**30)
        return out


def set_checkpointing(model, on: bool) -> None:
    """Non-reentrant checkpointing of every decoder layer, on or off. transformers >= 5.2x names it "activation
    checkpointing" (the gradient_* names warn); older 5.x has only the gradient_* names."""
    new = hasattr(model, "activation_checkpointing_enable")
    active = model.is_activation_checkpointing if new else model.is_gradient_checkpointing
    if on and not active:
        if new:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif not on and active:
        model.activation_checkpointing_disable() if new else model.gradient_checkpointing_disable()


def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def first_loss_check(bench: Bench, key: str, engine=None, model=None) -> float:
    """The loss of one forward on the first batch from the initial weights (before any step): every engine and the
    plain model must give the same number, as they hold the same weights."""
    import torch

    from forgetray.data.instruct import collate

    batch = {k: v.to(bench.device) for k, v in collate(bench.data[:bench.args.micro_batch], 0).items()}
    with torch.no_grad():
        loss = (engine if engine is not None else model)(**batch).loss
    bench.first_losses[key] = float(loss)
    return bench.first_losses[key]


def run_groups(bench: Bench) -> tuple[list[dict], list[str]]:
    """The two groups; -> table rows, and failure notes (a failed group's rows say FAILED; the other still runs)."""
    import traceback

    import torch

    args = bench.args
    sam_stage = 2 if 2 in args.stages else args.stages[0]
    rows, failures = [], []
    for z in args.stages:
        try:
            rows += one_group(bench, z, with_sam=z == sam_stage)
        except Exception as exc:  # noqa: BLE001 (a failed group is reported; the other group still runs)
            first = str(exc).splitlines()[0] if str(exc) else ""
            failures.append(f"ZeRO-{z} group FAILED: {type(exc).__name__}: {first}")
            traceback.print_exc()
            print(failures[-1], file=sys.stderr, flush=True)
            keys = [f"plain/off/z{z}", f"fr/off/z{z}", f"plain/on/z{z}", f"fr/on/z{z}"]
            rows += [{"row": label(k), "failed": True} for k in keys + ([f"sam/off/z{z}"] if z == sam_stage else [])]
        gc.collect()  # the group's engine, model and optimizer died with one_group's frame
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows, failures


def one_group(bench: Bench, z: int, with_sam: bool) -> list[dict]:
    """A ZeRO-z engine and a plain model from the same initial weights; their sides timed interleaved."""
    import torch

    engine, phase, _ = bench.engine(z)
    try:
        first_loss_check(bench, f"forgetray ZeRO-{z}", engine=engine)
        model = bench.new_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        first_loss_check(bench, f"plain (ZeRO-{z} group)", model=model)
        sides = {
            f"plain/off/z{z}": bench.plain_side(model, optimizer, False),
            f"plain/on/z{z}": bench.plain_side(model, optimizer, True),
            f"fr/off/z{z}": bench.forgetray_side(engine, phase, False, f"ZeRO-{z}"),
            f"fr/on/z{z}": bench.forgetray_side(engine, phase, True, f"ZeRO-{z}"),
        }
        if with_sam:
            sides[f"sam/off/z{z}"] = bench.forgetray_side(engine, bench.phase(z, bench.args.rho), False, "SAM")
        resident = torch.cuda.memory_allocated() / 2**30 if bench.device.type == "cuda" else 0.0
        t0 = time.perf_counter()
        rows = make_rows(bench, z, bench.group(sides), resident, with_sam)
        print(f"ZeRO-{z} group: warm-up + {bench.args.rounds} rounds in {time.perf_counter() - t0:.0f} s; tokens/s "
              + ", ".join(f"{r['key']} {r['tok_s']:,.0f}" for r in rows), flush=True)  # progress, if killed later
        return rows
    finally:
        engine.destroy()  # DeepSpeed's hooks and buffers (ZeRO-3's above all) go with it


def label(key: str) -> str:
    side, ckpt, z = key.split("/")
    stage = z[1:]
    name = {"plain": f"plain PyTorch loop (ZeRO-{stage} group)", "fr": f"forgetray train_epoch, ZeRO-{stage}",
            "sam": f"forgetray SAM rho, ZeRO-{stage}"}[side]
    return f"{name}, ckpt {ckpt}"


def make_rows(bench: Bench, z: int, times: dict, resident: float, with_sam: bool) -> list[dict]:
    def rates(key):
        return [tok / sec for sec, tok in times[key]["times"]]

    def row(key, baseline, passes=1):
        own = rates(key)
        med = statistics.median(own)
        sec = bench.batch * bench.args.seq / med  # every sequence is full length: no padding
        out = {"row": label(key), "tok_s": med, "step_s": sec, "mfu": passes * bench.flops_per_token * med /
               bench.args.peak_flops, "peak": times[key]["peak"], "resident": resident, "key": key}
        if baseline:
            base = rates(baseline)
            out.update(vs=label(baseline), ratio=med / statistics.median(base),
                       per_round=[a / b for a, b in zip(own, base)])
        return out

    rows = [row(f"plain/off/z{z}", None), row(f"fr/off/z{z}", f"plain/off/z{z}"),
            row(f"plain/on/z{z}", None), row(f"fr/on/z{z}", f"plain/on/z{z}")]
    if with_sam:
        rows.append(row(f"sam/off/z{z}", f"fr/off/z{z}", passes=2))
    return rows


def print_table(rows: list[dict], rho: float) -> None:
    header = ("row", "tokens/s", "MFU", "s/step", "peak GiB", "ratio", "per-round", "vs")
    lines = []
    for r in rows:
        name = r["row"].replace("SAM rho", f"SAM rho {rho:g}")
        if r.get("failed"):
            lines.append((name, "FAILED", "", "", "", "", "", ""))
            continue
        per = r.get("per_round", [])
        lines.append((name, f"{r['tok_s']:,.0f}", f"{100 * r['mfu']:.1f}%", f"{r['step_s']:.3f}",
                      f"{r['peak']:.1f}", f"{r['ratio']:.3f}" if "ratio" in r else "-",
                      f"{min(per):.3f} .. {max(per):.3f}" if per else "-", r.get("vs", "-")))
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]
    for line in [header] + lines:
        print("  ".join(f"{c:{'<' if i in (0, 7) else '>'}{w}}" for i, (c, w) in enumerate(zip(line, widths))))


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.smoke:  # before deepspeed is imported: its CPU accelerator even where a GPU exists
        os.environ["DS_ACCELERATOR"] = "cpu"
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU (use --smoke for the CPU check)", file=sys.stderr)
        return 2
    import transformers

    # What the bench uses of forgetray, loaded before deepspeed so that the check below sees forgetray's own imports.
    import forgetray.data.instruct  # noqa: F401
    import forgetray.plan  # noqa: F401
    import forgetray.spec  # noqa: F401
    import forgetray.train.deepspeed_config  # noqa: F401
    import forgetray.train.engine  # noqa: F401

    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
    import deepspeed  # it tries `import mlflow` itself (deepspeed.autotuning, optional): not counted above

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if args.smoke:
        torch.set_num_threads(1)
        device, dtype, backend = torch.device("cpu"), torch.float32, "gloo"
    else:
        torch.cuda.set_device(0)
        device, dtype, backend = torch.device("cuda", 0), torch.bfloat16, "nccl"
    init_process_group(backend)

    bench = Bench(args, device, dtype)
    gpu = (f"{torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB, "
           f"CUDA {torch.version.cuda}" if device.type == "cuda" else "none (CPU smoke run)")
    print(f"forgetray GPU training bench{' --smoke' if args.smoke else ''}: ZeRO {args.stages[0]} and "
          f"{args.stages[1]}, {'fp32' if args.smoke else 'bf16'}, 1 process ({backend}), SDPA attention")
    print(f"machine: {platform.node()} | gpu: {gpu} | cpu: {cpu_name()}, {usable_cores()} usable cores | python "
          f"{platform.python_version()} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"deepspeed {deepspeed.__version__}")
    print(f"forgetray + torch + transformers imports loaded: {', '.join(heavy) if heavy else 'none'} of "
          f"{', '.join(HEAVY)}")
    c = bench.config
    print(f"model: random Llama, {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads "
          f"({c.num_key_value_heads} KV), intermediate {c.intermediate_size}, vocab {c.vocab_size}, untied head, "
          f"attention {bench.attn_implementation}; {bench.n_params:,} parameters, {bench.n_matmul:,} in matmuls (all "
          f"but the input embedding)")
    print(f"batch: {args.micro_batch} x {args.seq} tokens x {args.grad_accum} accumulation = "
          f"{bench.batch * args.seq} tokens per optimizer step; {args.warmup} warm-up steps per side, then "
          f"{args.rounds} interleaved rounds x {args.steps} timed steps per side")
    attn = 6 * c.num_hidden_layers * args.seq * c.hidden_size
    print(f"FLOPs per token: 6 x N = {6 * bench.n_matmul / 1e9:.4g} GFLOP + causal attention 6 x L x s x h = "
          f"{attn / 1e9:.4g} GFLOP = {bench.flops_per_token / 1e9:.4g} GFLOP (x2 for SAM; checkpointing recompute "
          f"not counted); MFU against peak {args.peak_flops:.4g} FLOP/s", flush=True)

    try:
        rows, failures = run_groups(bench)
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()
    print()
    losses = bench.first_losses
    same = "identical" if len(set(losses.values())) == 1 else "DIFFER"
    print("first-batch loss from the initial weights: " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()) +
          f" ({same})")
    print_table(rows, args.rho)
    print("ratio = this row's tokens/s / the 'vs' row's (medians over the rounds; per-round: each round's ratio). "
          "peak GiB: the process's peak allocation while the row ran (the group's other models included)")
    by_key = {r.get("key"): r for r in rows}
    for z in args.stages:
        sam, fr = by_key.get(f"sam/off/z{z}"), by_key.get(f"fr/off/z{z}")
        if sam and fr:
            print(f"SAM cost: one SAM step (rho {args.rho:g}) takes {sam['step_s'] / fr['step_s']:.2f}x a plain "
                  f"forgetray ZeRO-{z} step (per round {' '.join(f'{1 / x:.2f}' for x in sam['per_round'])}; "
                  f"ideal 2x: two forward+backward passes, one optimizer step)")
    for z in args.stages:
        if f"fr/off/z{z}" in by_key and device.type == "cuda":
            print(f"ZeRO-{z} group: {by_key[f'fr/off/z{z}']['resident']:.1f} GiB allocated before timing (engine, "
                  f"plain model and both optimizers' states)")
    for note in failures:
        print(note)
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
