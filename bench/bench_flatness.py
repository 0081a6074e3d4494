# .venv/bin/python bench/bench_flatness.py [--steps 21] [--forwards 5] [--threads 1]
"""Cost of one loss surface (forgetray.flatness.loss_surface) in units of one plain forward pass.

A surface is steps^2 loss evaluations (441 for 21 x 21), so the ideal is steps^2 forwards; what the surface costs on
top is the perturbation overhead: drawing the two directions, saving and restoring the parameters, and writing
theta + a*d1 + b*d2 into every parameter at each grid point. Both sides run in one process on the same model and the
same batch: a few plain forwards (loss only, under torch.no_grad(), eval mode) before the surface and as many after,
so slow drift on a shared machine hits both; the forward time is their median. Inside the surface every loss_fn call
is timed too, so the overhead is measured directly (surface time minus time spent in loss_fn) rather than inferred.

Model: a small random Llama from transformers.LlamaConfig (4 layers, hidden 192, 6 heads, intermediate 512,
vocab 1500), fp32 on the CPU, one batch of 16 x 256 random token ids; no files needed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from machine import cpu_name  # bench/ is on sys.path when a script here runs

from forgetray.flatness import loss_surface


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=21, help="grid points per axis (odd)")
    parser.add_argument("--radius", type=float, default=1.0)
    parser.add_argument("--forwards", type=int, default=5, help="plain forwards timed before and again after")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_model(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1500,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=6,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float().eval()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    loss_times: list[float] = []

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        start = time.perf_counter()
        loss = m(input_ids=ids, labels=ids).loss
        loss_times.append(time.perf_counter() - start)
        return loss

    def plain_forwards(n: int) -> list[float]:
        times = []
        with torch.no_grad():
            for _ in range(n):
                start = time.perf_counter()
                model(input_ids=ids, labels=ids).loss
                times.append(time.perf_counter() - start)
        return times

    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"torch {torch.__version__}, {cpu_name()}, threads {torch.get_num_threads()}")
    print(f"model: Llama {n_params / 1e6:.2f}M params fp32 CPU; batch {args.batch} x {args.seq} tokens")
    print(f"surface: {args.steps} x {args.steps} = {args.steps**2} loss evaluations, radius {args.radius}")

    plain_forwards(1)  # warm-up, untimed
    forwards = plain_forwards(args.forwards)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    F, h = loss_surface(model, loss_fn, steps=args.steps, radius=args.radius, seed=args.seed)
    surface_wall, surface_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    forwards += plain_forwards(args.forwards)

    forward = statistics.median(forwards)
    n = args.steps**2
    in_loss = sum(loss_times)
    overhead = surface_wall - in_loss
    print(f"plain forward: median {forward * 1e3:.1f} ms over {len(forwards)} "
          f"(min {min(forwards) * 1e3:.1f}, max {max(forwards) * 1e3:.1f})")
    print(f"loss_fn inside the surface: median {statistics.median(loss_times) * 1e3:.1f} ms over {len(loss_times)}")
    print(f"surface: {surface_wall:.2f} s wall, {surface_cpu:.2f} s CPU")
    print(f"ratio surface / forward: {surface_wall / forward:.1f} forwards (ideal {n})")
    print(f"ratio surface / ({n} x forward): {surface_wall / (n * forward):.3f}")
    print(f"perturbation overhead (surface minus loss_fn time): {overhead:.3f} s = {overhead / surface_wall:.2%} "
          f"of the surface, {overhead / n * 1e3:.2f} ms per grid point")
    print(f"centre loss {F[args.steps // 2, args.steps // 2]:.4f}, min {F.min():.4f}, max {F.max():.4f}, h {h:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
