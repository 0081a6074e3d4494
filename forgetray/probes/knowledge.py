"""The knowledge probe (METHODS.md §3): each multiple-choice question scored two ways in one pass over the model.

- Letter scoring (MMLU): at the first answer position of the letter prompt, the option letters' probabilities
  (" A" and "A" variants merged) give the prediction, P_fmt and the two entropies.
- Option likelihood (lm-eval's acc / acc_norm): each choice scored as a continuation of the question.

One row per question (KNOWLEDGE_COLUMNS); `summarize_knowledge` averages them and `merge_shards` puts the frames of
all ranks back together.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd
import torch

from forgetray import metrics
from forgetray.data.questions import MCQuestion
from forgetray.probes.prompts import (format_letter_prompt, format_option_context, format_option_continuations,
                                      select_shots)
from forgetray.probes.shards import shard_indices
from forgetray.probes.tokens import (bos_prefix, check_sizes, encode, forward, letter_token_ids, padding_id,
                                     truncate_left)

# Columns of probe_knowledge's frame: `index` is the question's position in the full list (merge_shards sorts by it).
KNOWLEDGE_COLUMNS = (
    "index",
    "id",
    "subject",
    "answer",
    "letter_pred",
    "letter_correct",
    "p_fmt",
    "entropy_vocab",
    "entropy_options",
    "acc_pred",
    "acc_correct",
    "acc_norm_pred",
    "acc_norm_correct",
    "option_logprobs",
)


@torch.no_grad()
def probe_knowledge(
    model,
    tokenizer,
    questions: Sequence[MCQuestion],
    *,
    batch_size: int = 32,
    max_length: int = 512,
    n_shot: int = 0,
    shots: Sequence[MCQuestion] = (),
    device: Any = "cpu",
    shard: tuple[int, int] = (0, 1),
) -> pd.DataFrame:
    """Score this rank's share of `questions` both ways; one row per question, columns KNOWLEDGE_COLUMNS.

    Letter scoring: at the first answer position of the letter prompt, the option letters' probabilities (variants
    merged) give letter_pred, p_fmt, entropy_vocab (whole vocabulary) and entropy_options (options renormalised).
    Option likelihood: each choice is scored as a continuation of the question (summed token log-probs in
    option_logprobs); acc_pred is their argmax, acc_norm_pred the argmax after dividing by the choice's length in
    characters (the choice text without the leading space, as lm-eval).
    """
    check_sizes(batch_size, max_length)
    questions = list(questions)
    if n_shot < 0:
        raise ValueError(f"n_shot must be >= 0, got {n_shot}")
    shots = list(shots)
    indices, n_real = shard_indices(len(questions), shard)
    mine = [questions[i] for i in indices]
    if not mine:
        return pd.DataFrame(columns=list(KNOWLEDGE_COLUMNS))
    pad_id = padding_id(tokenizer)

    # Checks that look at all questions, not just this rank's, so that every rank fails alike before any forward
    # call (a rank failing alone would leave the others waiting in ZeRO-3's collectives).
    letter_ids = letter_token_ids(tokenizer, max(len(q.choices) for q in questions))
    continuations = encode_continuations(tokenizer, questions, max_length)

    prompts = letter_prompts(tokenizer, mine, shots, n_shot, max_length)
    letters = _letter_scores(model, prompts, mine, letter_ids, batch_size, pad_id, device)
    # Every rank must run as many option batches as the rank with the most option sequences.
    world = shard[1]
    most_sequences = max(sum(len(questions[i].choices) for i in shard_indices(len(questions), (r, world))[0])
                         for r in range(world))
    seqs, cont_lengths = option_sequences(tokenizer, mine, [continuations[i] for i in indices], max_length)
    logprobs = _option_logprobs(model, seqs, cont_lengths, most_sequences, batch_size, pad_id, device)

    rows = []
    start = 0
    for pos in range(n_real):
        question, count = mine[pos], len(mine[pos].choices)
        option_logprobs = logprobs[start : start + count]
        start += count
        acc_pred, acc_norm_pred = metrics.option_likelihood_predictions(
            [option_logprobs], [[len(choice) for choice in question.choices]]
        )
        rows.append({
            "index": indices[pos],
            "id": question.id,
            "subject": question.subject,
            "answer": question.answer,
            **letters[pos],
            "letter_correct": letters[pos]["letter_pred"] == question.answer,
            "acc_pred": int(acc_pred[0]),
            "acc_correct": int(acc_pred[0]) == question.answer,
            "acc_norm_pred": int(acc_norm_pred[0]),
            "acc_norm_correct": int(acc_norm_pred[0]) == question.answer,
            "option_logprobs": option_logprobs,
        })
    return pd.DataFrame(rows, columns=list(KNOWLEDGE_COLUMNS))


def letter_prompts(tokenizer, questions: Sequence[MCQuestion], shots: Sequence[MCQuestion], n_shot: int,
                   max_length: int) -> list[list[int]]:
    """The token ids of each question's letter prompt (with its shots), BOS kept and truncated on the left."""
    bos = bos_prefix(tokenizer)
    texts = [format_letter_prompt(q, select_shots(q, shots, n_shot)) for q in questions]
    return [truncate_left(bos, ids, max_length) for ids in encode(tokenizer, texts)]


def encode_continuations(tokenizer, questions: Sequence[MCQuestion], max_length: int) -> list[list[list[int]]]:
    """Token ids of every question's continuations, checked to leave room for at least one context token."""
    out = []
    for question in questions:
        continuations = encode(tokenizer, format_option_continuations(question))
        longest = max(len(ids) for ids in continuations)
        if longest > max_length - 1:  # a continuation's first token needs a token before it to be predicted from
            raise ValueError(f"question {question.id!r}: a choice is {longest} tokens, more than max_length - 1 = "
                             f"{max_length - 1}")
        out.append(continuations)
    return out


def option_sequences(tokenizer, questions: Sequence[MCQuestion], continuations: Sequence[list[list[int]]],
                     max_length: int) -> tuple[list[list[int]], list[int]]:
    """Context + continuation for every choice, flattened in question order, and each continuation's length.

    Context and continuation are tokenized separately and concatenated, so the scored tokens are exactly the
    continuation's.
    """
    bos = bos_prefix(tokenizer)
    contexts = encode(tokenizer, [format_option_context(q) for q in questions])
    seqs, cont_lengths = [], []
    for context, question_continuations in zip(contexts, continuations):
        for cont in question_continuations:
            seqs.append(truncate_left(bos, context + cont, max_length))
            cont_lengths.append(len(cont))
    return seqs, cont_lengths


def _letter_scores(model, prompts: list[list[int]], questions: list[MCQuestion], letter_ids: list[list[int]],
                   batch_size: int, pad_id: int, device: Any) -> list[dict[str, float | int]]:
    """Per question: letter_pred, p_fmt, entropy_vocab, entropy_options at the first answer position."""
    scores: list[dict[str, float | int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        logits = forward(model, batch, pad_id, device)
        # Only the logits at each prompt's last token (which predict the answer letter) are kept.
        rows = torch.arange(len(batch), device=logits.device)
        last = torch.tensor([len(seq) - 1 for seq in batch], device=logits.device)
        at_answer = logits[rows, last].float()
        option_probs = metrics.letter_probabilities(at_answer, letter_ids).cpu()
        h_vocab = metrics.entropy_vocab(at_answer).cpu()
        for j, question in enumerate(questions[start : start + batch_size]):
            probs = option_probs[j, : len(question.choices)]  # letters beyond this question's choices do not count
            scores.append({
                "letter_pred": int(probs.argmax()),
                "p_fmt": float(metrics.format_probability(probs)),
                "entropy_vocab": float(h_vocab[j]),
                "entropy_options": float(metrics.entropy_options(probs)),
            })
    return scores


def _option_logprobs(model, seqs: list[list[int]], cont_lengths: list[int], n_sequences: int, batch_size: int,
                     pad_id: int, device: Any) -> list[float]:
    """Summed log-prob of every sequence's continuation, in order; padding copies of the first sequence bring the
    count up to `n_sequences` (run, then dropped)."""
    n_real = len(seqs)
    seqs = seqs + [seqs[0]] * (n_sequences - n_real)
    cont_lengths = cont_lengths + [cont_lengths[0]] * (n_sequences - n_real)

    sums: list[float] = []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start : start + batch_size]
        logits = forward(model, batch, pad_id, device)
        for j, seq in enumerate(batch):
            n, c = len(seq), cont_lengths[start + j]
            # Logits at position t predict token t + 1: the continuation's tokens n-c..n-1 come from n-c-1..n-2.
            sums.append(float(metrics.token_logprobs(logits[j, n - c - 1 : n - 1], seq[n - c :]).sum()))
    return sums[:n_real]


def summarize_knowledge(df: pd.DataFrame) -> dict[str, float]:
    """Means over questions: accuracies as fractions (micro), P_fmt and the two entropies in nats."""
    return {
        "letter_acc": metrics.accuracy(df["letter_correct"]),
        "acc": metrics.accuracy(df["acc_correct"]),
        "acc_norm": metrics.accuracy(df["acc_norm_correct"]),
        "p_fmt": float(df["p_fmt"].mean()) if len(df) else math.nan,
        "entropy_vocab": float(df["entropy_vocab"].mean()) if len(df) else math.nan,
        "entropy_options": float(df["entropy_options"].mean()) if len(df) else math.nan,
    }


def merge_shards(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate the frames of all ranks and put the rows back in the original order (by the `index` column).

    Here rather than in `shards` because it merges knowledge frames (KNOWLEDGE_COLUMNS, one row per question)."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=list(KNOWLEDGE_COLUMNS))
    merged = pd.concat(frames, ignore_index=True)
    if merged["index"].duplicated().any():
        raise ValueError("merge_shards got the same question from two shards: were shards passed twice?")
    return merged.sort_values("index", kind="stable").reset_index(drop=True)
