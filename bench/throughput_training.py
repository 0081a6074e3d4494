"""The training half of bench_throughput.py: forgetray's `train_epoch` on the DeepSpeed engine from `build_engine`
(ZeRO stage 0, one process over gloo) against `plain_epoch`, a plain PyTorch loop over the same batches.

Imported by bench_throughput.py after it has pinned DeepSpeed to its CPU accelerator.
"""

from __future__ import annotations

import torch
from timing import interleaved_rounds  # bench/ is on sys.path when a script here runs

from forgetray.data.instruct import collate, tokenize_dataset
from forgetray.models import load_model, load_tokenizer
from forgetray.spec import TrialConfig
from forgetray.train.deepspeed_config import deepspeed_config
from forgetray.plan import ift_phase
from forgetray.train.engine import build_engine, epoch_order, train_epoch

DEVICE = torch.device("cpu")  # the bench measures the CPU code path


def plain_epoch(model, optimizer, data, trial: TrialConfig, epoch: int, pad_id: int) -> dict:
    """The ideal loop: the same global batches as `train_epoch` (same seeded order, same collate), nothing else.

    No gradient clipping, no lr schedule, no engine. `train_epoch`'s batch order comes from `epoch_order`, so both
    sides call it: the batches are the same by construction, and the token counts are checked to match.
    """
    order = epoch_order(len(data), trial.seed, epoch)
    losses, tokens = [], 0
    model.train()
    for step in range(len(data) // trial.batch_size):
        idx = order[step * trial.batch_size:(step + 1) * trial.batch_size].tolist()
        batch = collate([data[i] for i in idx], pad_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        tokens += int(batch["attention_mask"].sum())
    return {"loss": float(torch.stack(losses).mean()), "tokens": float(tokens)}


def bench_training(trial: TrialConfig, resolved: dict, rounds: int) -> tuple[list[dict], str]:
    tokenizer = load_tokenizer(resolved["model"])
    pad_id = tokenizer.pad_token_id
    data = tokenize_dataset(resolved["dataset"], tokenizer, trial.max_length).to_list()
    steps = len(data) // trial.batch_size
    if steps == 0:
        raise SystemExit(f"only {len(data)} examples, fewer than --batch-size {trial.batch_size}")

    # Two copies of the same initial weights: one for each side (optimizer state must not be shared).
    ds_model = load_model(resolved["model"], trial.precision)
    plain_model = load_model(resolved["model"], trial.precision)
    # Schedule length as if the whole bench were one run: warm-up step + every timed epoch.
    phase = ift_phase(trial)
    engine, _ = build_engine(ds_model, phase, deepspeed_config(phase, trial.zero_stage, trial.precision),
                             total_steps=1 + rounds * steps)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=trial.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=trial.weight_decay)

    # Warm-up: one optimizer step each on the same first batch. The first step pays one-time costs (AdamW state
    # allocation, DeepSpeed's first-step bookkeeping, allocator growth). From identical weights and an identical
    # batch, the two losses must be equal: a check that both sides really run the same model on the same data.
    warm = data[:trial.batch_size]
    ds_loss = train_epoch(engine, warm, phase, 0, trial.seed, 0, 1, pad_id, DEVICE)["loss"]
    plain_loss = plain_epoch(plain_model, plain_opt, warm, trial, 0, pad_id)["loss"]

    # Round r trains epoch r + 1 on both sides (so both see the same batch order).
    tokens: dict[str, float] = {}

    def same_tokens(r: int, stats: dict) -> None:
        tokens.update({name: s["tokens"] for name, s in stats.items()})
        if tokens["forgetray"] != tokens["plain"]:
            raise RuntimeError(f"round {r}: the sides trained on different tokens ({tokens}); comparison invalid")

    times = interleaved_rounds(rounds, {
        "forgetray": lambda r: train_epoch(engine, data, phase, r + 1, trial.seed, 0, 1, pad_id, DEVICE),
        "plain": lambda r: plain_epoch(plain_model, plain_opt, data, trial, r + 1, pad_id),
    }, after_round=same_tokens)

    same = "identical" if ds_loss == plain_loss else "DIFFERENT: sides do not run the same computation"
    info = (f"{len(data)} examples, {steps} steps/epoch of {trial.batch_size}, {int(tokens['plain'])} non-pad "
            f"tokens/epoch; warm-up step loss forgetray {ds_loss:.6f} vs plain {plain_loss:.6f} ({same})")
    rows = [{"what": "train epoch (train_epoch vs plain loop)", "unit": "tokens/s", "items": tokens["plain"], **times}]
    return rows, info
