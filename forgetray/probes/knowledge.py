"""The knowledge probe (docs/methods.md §3): each multiple-choice question scored two ways in one pass over the model.

- Letter scoring (MMLU): at the first answer position of the letter prompt, the option letters' probabilities
  (" A" and "A" variants merged) give the prediction, P_fmt and the two entropies; lm-eval's MMLU rule (the best
  continuation among " A", " B", ...) is `letter_rule="lm_eval"`.
- Option likelihood (lm-eval's acc / acc_norm): each choice scored as a continuation of the question.

One row per question (KNOWLEDGE_COLUMNS); `summarize_knowledge` averages them and `merge_shards` puts the frames of
all ranks back together.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from forgetray import metrics
from forgetray.data.questions import LETTERS, MCPrompt, MCQuestion
from forgetray.probes.prompts import (format_letter_prompt, format_letter_question, format_option_context,
                                      format_option_continuations, select_shots)
from forgetray.probes.options import ProbeOptions, with_fields
from forgetray.probes.scoring import score_shares
from forgetray.probes.shards import shard_indices
from forgetray.probes.tokens import bos_prefix, encode, letter_token_ids, truncate_left

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


LETTER_RULES = ("merged", "lm_eval")


@torch.no_grad()
def probe_knowledge(
    model,
    tokenizer,
    questions: Sequence[MCQuestion],
    options: ProbeOptions = ProbeOptions(),
    *,
    n_shot: int = 0,
    shots: Sequence[MCQuestion] = (),
    letter_rule: str = "merged",
    **fields: Any,
) -> pd.DataFrame:
    """Score this rank's share (`options.shard`) of `questions` both ways; one row per question, columns
    KNOWLEDGE_COLUMNS. `fields`: the keyword form of `options` (`probes.options`).

    Letter scoring: at the first answer position of the letter prompt, the option letters' probabilities (every
    vocabulary piece of a letter merged, `letter_token_ids`) give p_fmt, entropy_vocab (whole vocabulary) and
    entropy_options (options renormalised); letter_pred is their argmax with `letter_rule="merged"` (forgetray's,
    docs/methods.md §3), or with "lm_eval" the argmax of the log-likelihood of the continuations " A", " B", ... (lm-eval's
    MMLU). Option likelihood: each choice is scored as the continuation " {choice}" of the question (summed token
    log-probs in option_logprobs); acc_pred is their argmax, acc_norm_pred the argmax after dividing by the
    choice's length in characters (without the leading space, as lm-eval). `options.bos` is the BOS rule (`tokens.
    encode_contexts`): "always" for the organism, trained with BOS; "auto" for real models, as lm-eval.
    Both prompts of a question go through `scoring.score_shares` in one call: the shots prefix is shared by the
    questions of a subject and computed once.
    """
    if letter_rule not in LETTER_RULES:
        raise ValueError(f"letter_rule must be one of {LETTER_RULES}, got {letter_rule!r}")
    options = with_fields(options, fields, "probe_knowledge")
    questions = list(questions)
    if n_shot < 0:
        raise ValueError(f"n_shot must be >= 0, got {n_shot}")
    shots = list(shots)
    world = options.shard[1]
    indices, n_real = shard_indices(len(questions), options.shard)
    if not questions:
        return pd.DataFrame(columns=list(KNOWLEDGE_COLUMNS))
    # Checked on all questions, not just this rank's, so that every rank fails alike before any forward call (a
    # rank failing alone would leave the others waiting in ZeRO-3's collectives).
    letter_ids = letter_token_ids(tokenizer, max(len(q.choices) for q in questions))
    prompts = mc_prompts(questions, shots, n_shot)  # question i: letter prompt 2i, option prompt 2i + 1
    shares = [[2 * i + j for i in idx[:n] for j in (0, 1)]
              for idx, n in (shard_indices(len(questions), (r, world)) for r in range(world))]
    scores = score_shares(model, tokenizer, prompts, shares, options, answer_sets=letter_ids)

    rows = []
    for pos in range(n_real):
        question, letter, option = questions[indices[pos]], scores[2 * pos], scores[2 * pos + 1]
        count = len(question.choices)
        probs = torch.tensor(letter.answer_probs[:count], dtype=torch.float64)  # letters beyond the choices: no
        option_logprobs = list(option.logprobs)
        letter_pred = int(probs.argmax()) if letter_rule == "merged" else int(np.argmax(letter.logprobs))
        acc_pred, acc_norm_pred = metrics.option_likelihood_predictions(
            [option_logprobs], [[len(choice) for choice in question.choices]]
        )
        rows.append({
            "index": indices[pos],
            "id": question.id,
            "subject": question.subject,
            "answer": question.answer,
            "letter_pred": letter_pred,
            "letter_correct": letter_pred == question.answer,
            "p_fmt": float(metrics.format_probability(probs)),
            "entropy_vocab": float(letter.entropy_vocab),
            "entropy_options": float(metrics.entropy_options(probs)),
            "acc_pred": int(acc_pred[0]),
            "acc_correct": int(acc_pred[0]) == question.answer,
            "acc_norm_pred": int(acc_norm_pred[0]),
            "acc_norm_correct": int(acc_norm_pred[0]) == question.answer,
            "option_logprobs": option_logprobs,
        })
    return pd.DataFrame(rows, columns=list(KNOWLEDGE_COLUMNS))


def mc_prompts(questions: Sequence[MCQuestion], shots: Sequence[MCQuestion], n_shot: int) -> list[MCPrompt]:
    """Each question's letter prompt (prefix: its solved shots, shared by the questions of a subject; continuations
    " A", " B", ...) then its option-likelihood prompt (no prefix; continuations " {choice}")."""
    out = []
    for q in questions:
        solved = format_letter_prompt(q, select_shots(q, shots, n_shot))[: -len(format_letter_question(q))]
        out.append(MCPrompt(f"{q.id}/letter", solved, format_letter_question(q),
                            tuple(f" {LETTERS[k]}" for k in range(len(q.choices))), q.answer, subject=q.subject))
        out.append(MCPrompt(f"{q.id}/option", "", format_option_context(q), tuple(format_option_continuations(q)),
                            q.answer, subject=q.subject))
    return out


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

    Context and continuation tokenized separately and concatenated: the bench's plain baseline
    (bench/throughput_probes.py); the probe itself tokenizes as lm-eval (`tokens.encode_pairs`), the same tokens
    for byte-level BPE with a leading space."""
    bos = bos_prefix(tokenizer)
    contexts = encode(tokenizer, [format_option_context(q) for q in questions])
    seqs, cont_lengths = [], []
    for context, question_continuations in zip(contexts, continuations):
        for cont in question_continuations:
            seqs.append(truncate_left(bos, context + cont, max_length))
            cont_lengths.append(len(cont))
    return seqs, cont_lengths


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
