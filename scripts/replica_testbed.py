# .venv/bin/python scripts/replica_testbed.py --dataset organism-alpaca --lr 5e-3 --epochs 8 --restore-lr 1e-3 --restore-batch 2
"""A plain-PyTorch replica of the quickstart's testbed on the built organism, for tuning the organism in seconds.

No Ray, no DeepSpeed, no MLflow: one process fine-tunes a base model (AdamW, 3% warm-up + cosine, clipping 1.0, loss
on response tokens, seeded batches) and, after each epoch, probes it (option-likelihood accuracy on organism-facts,
probing perplexity), restores a copy on the lowest-base-PPL pool passages worth one IFT epoch of tokens and probes
that. Also restores the untouched base (R_0), the control for restoring's own effect. It reuses forgetray's probes,
tokenization and packing, so its numbers track the real sweep's closely (not bit for bit: the engine's batching of
restoration differs). This is how the quickstart's rates were chosen; the sweep is the measurement.

It also does the arithmetic a forgetray trial does besides (bench/bench_trial.py compares the two): extra restoring
passes while the probing PPL is above the target (R_0: the base's x 1.05; R_e: R_0's x 1.05), checked 8 times
within each extra pass as `forgetray.train.restore` does; `--early-probes` knowledge probes inside epoch 1,
`--trajectory-points` probing-PPL points along each restoration, exact memorization of the IFT data on SFT_e and R_e.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgetray import organism, probes
    from forgetray.data.instruct import collate, tokenize_example
    from forgetray.data.jsonl import read_jsonl
    from forgetray.data.questions import load_mc_jsonl
    from forgetray.train.evaluate import memorization
    from forgetray.train.restore import EXTRA_PASS_CHECKS, pack

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="organism-tiny")
    p.add_argument("--dataset", default="organism-alpaca")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--restore-lr", type=float, default=1e-3)
    p.add_argument("--restore-batch", type=int, default=2)
    p.add_argument("--restore-every", type=int, default=1, help="restore every k-th checkpoint")
    p.add_argument("--pool", default=None, help="a .jsonl pool instead of organism-restore")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="the IFT data order's seed (the sweep's `seed`)")
    p.add_argument("--restore-passes", type=int, default=1,
                   help="restore again (a fresh one-pass restoration of the result) while probing PPL is above base "
                        "x 1.05, at most this many passes in all (the sweep's `restore_max_passes`)")
    p.add_argument("--early-probes", type=int, default=0, help="knowledge probes inside epoch 1 (early_checkpoints)")
    p.add_argument("--trajectory-points", type=int, default=1,
                   help="restore_trajectory_points: probing PPL at its interior points of each first pass")
    p.add_argument("--tolerance", type=float, default=0.05, help="ppl_tolerance")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as forgetray's workers do (subnormals are slow on x86 CPUs)
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(organism.model_path(args.model))
    base = AutoModelForCausalLM.from_pretrained(organism.model_path(args.model)).float()
    questions = load_mc_jsonl(organism.data_path("organism-facts"))
    probe_texts = [r["text"] for r in read_jsonl(organism.data_path("organism-probe"))][:200]
    pool = [r["text"] for r in read_jsonl(Path(args.pool) if args.pool else organism.data_path("organism-restore"))]
    ift = [tokenize_example(r, tokenizer, 256) for r in read_jsonl(organism.data_path(args.dataset))]
    ift = [x for x in ift if x["n_response"] > 0]
    budget = sum(len(x["input_ids"]) for x in ift)

    def measure(model, knowledge=True, em=False) -> tuple[float, float]:
        model.eval()
        acc = float("nan")
        with torch.no_grad():
            if knowledge:
                frame = probes.probe_knowledge(model, tokenizer, questions, batch_size=32, max_length=256)
                acc = float((frame["acc_pred"] == frame["answer"]).mean())
            nll, n = probes.probe_perplexity(model, tokenizer, probe_texts, batch_size=32, max_length=256)
            if em:
                memorization(model, ift, tokenizer.pad_token_id, 32, "cpu")
        model.train()
        return acc, math.exp(nll / n)

    def early_knowledge(model) -> None:
        model.eval()
        with torch.no_grad():
            probes.probe_knowledge(model, tokenizer, questions, batch_size=32, max_length=256)
        model.train()

    # The restoring set: pool passages by ascending base-model PPL until one IFT epoch of tokens.
    base.eval()
    with torch.no_grad():
        nlls = probes.passage_nlls(base, tokenizer, pool, batch_size=64, max_length=256)
    chosen, used = [], 0
    for i in sorted(range(len(pool)), key=lambda i: nlls[i][0] / max(1, nlls[i][1])):
        ids = tokenizer(pool[i], add_special_tokens=False)["input_ids"]
        if used + len(ids) > budget:
            break
        chosen.append(ids)
        used += len(ids)
    chunks = pack(chosen, tokenizer.eos_token_id, 256)
    print(f"{args.dataset}: {len(ift)} examples, {budget} tokens an epoch; restoring set {len(chosen)} passages, "
          f"{len(chunks)} sequences", flush=True)

    def train(model, data, lr, batch, epochs, seed, after_epoch=None, after_step=None) -> None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        steps = max(1, len(data) // batch)
        total, warmup = steps * epochs, math.ceil(steps * epochs * 0.03)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else
                                                     0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
        model.train()
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
            for s in range(steps):
                b = collate([data[i] for i in order[s * batch:(s + 1) * batch]], tokenizer.pad_token_id)
                loss = model(**b).loss
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                if after_step and after_step(epoch, s + 1, steps):
                    return
            if after_epoch:
                after_epoch(epoch, model)

    def restored(model, limit: float, em: bool = True) -> tuple[float, float, int]:
        """forgetray's restoration rule: one pass, then passes while the probing PPL is above `limit`, each extra
        pass checked EXTRA_PASS_CHECKS times and ended once under it; then the probes (knowledge, PPL, EM)."""
        copy_ = copy.deepcopy(model)
        steps = max(1, len(chunks) // args.restore_batch)
        points = {round(i * steps / args.trajectory_points) for i in range(args.trajectory_points + 1)} - {0, steps}
        check = max(1, steps // EXTRA_PASS_CHECKS)

        def first_pass(epoch, step, steps_) -> bool:  # the trajectory's interior points
            if step in points:
                measure(copy_, knowledge=False)
            return False

        def extra_pass(epoch, step, steps_) -> bool:
            return step % check == 0 and step < steps_ and measure(copy_, knowledge=False)[1] <= limit

        train(copy_, chunks, args.restore_lr, args.restore_batch, 1, seed=7, after_step=first_pass)
        n = 1
        while n < args.restore_passes and measure(copy_, knowledge=False)[1] > limit:
            n += 1
            train(copy_, chunks, args.restore_lr, args.restore_batch, 1, seed=7 + n - 1, after_step=extra_pass)
        r_acc, r_ppl = measure(copy_, em=em)
        return r_acc, r_ppl, n

    start = time.perf_counter()
    acc, base_ppl = measure(base, em=True)
    r_acc, control_ppl, n = restored(base, base_ppl * (1 + args.tolerance), em=False)
    print(f"base: acc {acc:.3f} ppl {base_ppl:.2f} | R_0: acc {r_acc:.3f} ppl {control_ppl:.2f} ({n} passes)",
          flush=True)
    early = {round(i * (len(ift) // args.batch) / (args.early_probes + 1)) for i in range(1, args.early_probes + 1)}

    def early_step(epoch, step, steps) -> bool:  # forgetray's early_checkpoints: knowledge probes inside epoch 1
        if epoch == 1 and step in early and step < steps:
            early_knowledge(model)
        return False

    def after_epoch(epoch, model) -> None:
        s_acc, s_ppl = measure(model, em=True)
        line = f"epoch {epoch}: SFT acc {s_acc:.3f} ppl {s_ppl:.2f}"
        if epoch % args.restore_every == 0:
            r_acc, r_ppl, n = restored(model, control_ppl * (1 + args.tolerance))
            line += f" | R acc {r_acc:.3f} ppl {r_ppl:.2f} ({n} passes)"
        print(f"{line}  ({time.perf_counter() - start:.0f} s)", flush=True)

    model = copy.deepcopy(base)
    train(model, ift, args.lr, args.batch, args.epochs, seed=args.seed, after_epoch=after_epoch, after_step=early_step)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
