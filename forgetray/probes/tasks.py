"""The task probe: a benchmark's prompts (`forgetray.tasks.Task.load`) scored, and each of the task's scores computed
per question exactly as lm-eval 0.4.13 computes it from the same log-likelihoods.

    frame = probe_task(model, tokenizer, task, task.load(source), bos="auto", shard=(rank, world))
    summary = summarize_task(merge_shards(frames), task)     # {"acc": .., "acc_norm": .., "acc_stem": .., ...}

Per question (lm_eval/api/task.py, ConfigurableTask.process_results for `multiple_choice`, and
lm_eval/tasks/truthfulqa/utils.py):
  * acc (and mc1, which is lm-eval's `acc` of truthfulqa_mc1): np.argmax of the continuations' summed
    log-likelihoods; ties go to the first (numpy's argmax);
  * acc_norm: np.argmax of log-likelihood / len(choice), where `choice` is lm-eval's doc_to_choice string, i.e. the
    continuation WITHOUT the task's target delimiter, its length in characters (code points, as Python's `len`);
  * mc2: the true answers' share of the probability mass of all answers (process_results_mc2), computed with the
    maximum subtracted before exp: the same value wherever lm-eval's exp(ll) / sum(exp(ll)) is finite, a number
    instead of lm-eval's nan where every answer's exp underflows (log-likelihoods below about -745);
  * letter (forgetray's, docs/methods.md §3; MMLU and CSL): at the first answer position, the probability of each option
    letter with every vocabulary piece of it merged (" A", "A", ...: `tokens.letter_token_ids`); the prediction is
    their argmax. On MMLU lm-eval's `acc` is the " A"-only version of this (its continuations are " A".." D").

Sharding is `score_prompts`'s (items rank::world, every rank making the same number of forward calls for ZeRO-3);
the frame's `index` is each question's position in the full prompt list, so `knowledge.merge_shards` puts the
ranks' frames back together. Pure of Ray, MLflow and DeepSpeed.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from forgetray import metrics
from forgetray.data.questions import MCPrompt
from forgetray.probes.options import LM_EVAL, ProbeOptions, with_fields
from forgetray.probes.scoring import score_prompts
from forgetray.probes.shards import shard_indices
from forgetray.probes.tokens import letter_token_ids
from forgetray.tasks import mmlu
from forgetray.tasks.base import Task

# Scores a task may report (Task.scores) that probe_task knows how to compute.
ARGMAX_SCORES = ("acc", "acc_norm", "letter", "mc1")  # each a prediction per question: <score>_pred, <score>_correct
TASK_SCORES = ARGMAX_SCORES + ("mc2",)  # mc2 is a value per question: column `mc2`


def task_columns(task: Task) -> tuple[str, ...]:
    """The columns of `probe_task`'s frame for `task`, in order: index, id, subject, gold, then per score of the
    task `<score>_pred` and `<score>_correct` (or `mc2`), then option_logprobs (the continuations' summed
    log-likelihoods, lm-eval's `resps`), and for letter-scored tasks letter_probs (each letter's merged probability)."""
    unknown = [s for s in task.scores if s not in TASK_SCORES]
    if unknown:
        raise ValueError(f"task {task.name!r}: probe_task cannot compute scores {unknown} (known: {TASK_SCORES})")
    columns = ["index", "id", "subject", "gold"]
    for score in task.scores:
        columns += ["mc2"] if score == "mc2" else [f"{score}_pred", f"{score}_correct"]
    columns.append("option_logprobs")
    if "letter" in task.scores:
        columns.append("letter_probs")
    return tuple(columns)


@torch.no_grad()
def probe_task(
    model,
    tokenizer,
    task: Task,
    prompts: Sequence[MCPrompt],
    options: ProbeOptions = LM_EVAL,
    **fields: Any,
) -> pd.DataFrame:
    """Score this rank's share (`options.shard`) of `task`'s `prompts`; one row per prompt, columns
    `task_columns(task)`. `fields`: the keyword form of `options` (`probes.options`).

    `options.bos` is the BOS rule of `tokens.encode_contexts` ("auto": lm-eval's, the tokenizer's own). Every prompt
    is checked on every rank before any forward call, so that all ranks fail alike (a rank failing alone would leave
    the others waiting in ZeRO-3's collectives).
    """
    options = with_fields(options, fields, "probe_task")
    columns = task_columns(task)
    prompts = list(prompts)
    lengths = [choice_lengths(task, p) for p in prompts]
    if "mc2" in task.scores:
        empty = [p.id for p in prompts if not p.true_set]
        if empty:
            raise ValueError(f"task {task.name!r}: mc2 needs each prompt's true_set; prompts {empty[:3]} have none")
    if not prompts:
        return pd.DataFrame(columns=list(columns))
    letters = "letter" in task.scores
    answer_sets = letter_token_ids(tokenizer, max(len(p.continuations) for p in prompts)) if letters else None
    scores = score_prompts(model, tokenizer, prompts, options, answer_sets=answer_sets)
    indices, n_real = shard_indices(len(prompts), options.shard)
    rows = []
    for i, score in zip(indices[:n_real], scores):
        prompt = prompts[i]
        row = {"index": i, "id": prompt.id, "subject": prompt.subject, "gold": prompt.gold}
        for name in task.scores:
            if name == "mc2":
                row["mc2"] = mc2(score.logprobs, prompt.true_set)
                continue
            if name == "letter":
                pred = int(np.argmax(score.answer_probs[: len(prompt.continuations)]))
            elif name == "acc_norm":
                pred = acc_norm_prediction(score.logprobs, lengths[i])
            else:  # acc, mc1
                pred = acc_prediction(score.logprobs)
            row[f"{name}_pred"], row[f"{name}_correct"] = pred, pred == prompt.gold
        row["option_logprobs"] = list(score.logprobs)
        if letters:
            row["letter_probs"] = list(score.answer_probs[: len(prompt.continuations)])
        rows.append(row)
    return pd.DataFrame(rows, columns=list(columns))


def choice_lengths(task: Task, prompt: MCPrompt) -> list[int]:
    """lm-eval's `completion_len` of each choice: the continuation without the task's target delimiter, in
    characters. A continuation that does not start with the delimiter cannot be the task's: an error."""
    delimiter = task.target_delimiter
    bad = [c for c in prompt.continuations if not c.startswith(delimiter)]
    if bad:
        raise ValueError(f"task {task.name!r}, prompt {prompt.id!r}: continuations {bad[:2]!r} do not start with the "
                         f"task's target delimiter {delimiter!r}")
    return [len(c) - len(delimiter) for c in prompt.continuations]


def acc_prediction(logprobs: Sequence[float]) -> int:
    """lm-eval's `pred = np.argmax(lls)`: the first of the most likely continuations."""
    return int(np.argmax(logprobs))


def acc_norm_prediction(logprobs: Sequence[float], lengths: Sequence[int]) -> int:
    """lm-eval's `pred_norm = np.argmax(lls / completion_len)`, in float64 as lm-eval's arrays are (an empty choice
    divides by zero there too: -inf, never chosen over a finite score)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return int(np.argmax(np.asarray(logprobs, dtype=np.float64) / np.asarray(lengths, dtype=np.float64)))


def mc2(logprobs: Sequence[float], true_set: Sequence[int]) -> float:
    """TruthfulQA MC2 of one question (truthfulqa/utils.py:process_results_mc2): the normalised probability mass of
    the true answers, a softmax over the answers' summed log-likelihoods (maximum subtracted: module docstring)."""
    lls = np.asarray(logprobs, dtype=np.float64)
    probs = np.exp(lls - lls.max())
    return float(probs[list(true_set)].sum() / probs.sum())


def summarize_task(frame: pd.DataFrame, task: Task) -> dict[str, float]:
    """The task's scores over the frame's questions: per score of `task.scores` its mean (accuracies as fractions,
    mc2 the mean of the per-question values; nan for an empty frame). MMLU adds, per accuracy score, its accuracy in
    each lm-eval category present (`<score>_<category>`: stem, humanities, social_sciences, other; micro within the
    category, as lm-eval's group) and its macro accuracy over subjects (`<score>_macro`); `<score>` itself is the
    micro accuracy, lm-eval's `mmlu` number."""
    task_columns(task)  # the same error for an unknown score as probe_task
    out: dict[str, float] = {}
    for score in task.scores:
        if score == "mc2":
            out["mc2"] = float(frame["mc2"].astype(float).mean()) if len(frame) else math.nan
        else:
            out[score] = metrics.accuracy(frame[f"{score}_correct"].tolist())
    if task.name == "mmlu" and len(frame):
        subjects = frame["subject"].tolist()
        for score in task.scores:
            correct = frame[f"{score}_correct"].tolist()
            out.update({f"{score}_{cat}": acc for cat, acc in mmlu.per_category(subjects, correct).items()})
            out[f"{score}_macro"] = mmlu.macro(subjects, correct)
    return out
