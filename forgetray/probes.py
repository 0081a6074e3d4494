"""Batched probes of a causal LM (METHODS.md §3): multiple-choice knowledge and probing-set perplexity.

The model may be a Hugging Face causal LM or a DeepSpeed engine wrapping one (possibly ZeRO-3 sharded), so it is only
ever called as `model(input_ids=..., attention_mask=...)` and only `.logits` of the result is read. The caller puts
it in eval mode. Everything else the probes need (tokenizer, device, lengths) comes in as arguments.

Tokenization policy, shared by every probe:
- a sequence is `[BOS] + tokenizer(text, add_special_tokens=False)` (no BOS when the tokenizer has none);
- prompts longer than `max_length` lose tokens from the left, just after BOS, so the answer position survives and
  the model still sees the BOS it was trained with;
- batches are right-padded (pad token, else EOS) with attention_mask 0 on pads, so positions stay 0, 1, 2, ...

Sharding: `shard=(rank, world)` evaluates items rank::world. ZeRO-3 needs every rank to make the same number of forward
calls, so each rank pads its share with copies of an item (run, then dropped) until every rank has the same count;
the padding is computed from the full item list, which every rank has, so no communication is needed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from forgetray import metrics

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

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


# --- questions ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question; `answer` is the index of the correct choice."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""

    def __post_init__(self):
        object.__setattr__(self, "choices", tuple(self.choices))  # lists from JSON would make the question unhashable
        if not 2 <= len(self.choices) <= len(LETTERS):
            raise ValueError(f"needs 2 to {len(LETTERS)} choices, got {len(self.choices)}")
        if not all(isinstance(c, str) and c for c in self.choices):
            raise ValueError("every choice must be a non-empty string")  # acc_norm divides by the choice's length
        if isinstance(self.answer, bool) or not isinstance(self.answer, int):
            raise ValueError(f"answer must be an int index, got {self.answer!r}")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer {self.answer} out of range for {len(self.choices)} choices")


def load_mc_jsonl(path: str | Path) -> list[MCQuestion]:
    """Read MMLU-style questions, one JSON object a line: {"id"?, "question", "choices", "answer", "subject"?}.

    `answer` is an index or a letter ("A", "B", ...); `id` defaults to the line number. Blank lines are skipped.
    A malformed line raises ValueError("{path}:{lineno}: what is wrong").
    """
    questions: list[MCQuestion] = []
    first_line_of_id: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                question = _parse_mc_record(line, default_id=str(lineno))
            except ValueError as err:
                raise ValueError(f"{path}:{lineno}: {err}") from None
            if question.id in first_line_of_id:
                # Per-question results are paired across models by id, so ids must be unique.
                raise ValueError(f"{path}:{lineno}: duplicate id {question.id!r} (first on line "
                                 f"{first_line_of_id[question.id]})")
            first_line_of_id[question.id] = lineno
            questions.append(question)
    return questions


def _parse_mc_record(line: str, default_id: str) -> MCQuestion:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"bad JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for field in ("question", "choices", "answer"):
        if field not in record:
            raise ValueError(f"missing field {field!r}")
    if not isinstance(record["question"], str):
        raise ValueError("'question' must be a string")
    choices = record["choices"]
    if not isinstance(choices, list):
        raise ValueError("'choices' must be a list of strings")
    answer = record["answer"]
    if isinstance(answer, str):
        if len(answer) != 1 or answer not in LETTERS[: len(choices)]:
            raise ValueError(f"answer {answer!r} is not one of the letters {LETTERS[:len(choices)]!r}")
        answer = LETTERS.index(answer)
    record_id = record.get("id", default_id)
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        raise ValueError(f"'id' must be a string or an int, got {record_id!r}")
    subject = record.get("subject", "")
    if not isinstance(subject, str):
        raise ValueError("'subject' must be a string")
    return MCQuestion(id=str(record_id), question=record["question"], choices=tuple(choices), answer=answer,
                      subject=subject)


# --- prompt formats (METHODS.md §3) --------------------------------------------------------------------------------


def format_letter_question(question: MCQuestion) -> str:
    """MMLU style: "Question: {q}\\nA. {c0}\\nB. {c1}\\n...\\nAnswer:" (the answer letter comes next)."""
    lines = [f"Question: {question.question}"]
    lines += [f"{LETTERS[k]}. {choice}" for k, choice in enumerate(question.choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def format_letter_prompt(question: MCQuestion, shots: Sequence[MCQuestion] = ()) -> str:
    """The solved examples, each ending "Answer: X\\n\\n", then the question; the first answer position follows."""
    solved = "".join(f"{format_letter_question(shot)} {LETTERS[shot.answer]}\n\n" for shot in shots)
    return solved + format_letter_question(question)


def select_shots(question: MCQuestion, shots: Sequence[MCQuestion], n_shot: int) -> list[MCQuestion]:
    """The first `n_shot` shots, those of the question's subject first (MMLU takes its shots from the same subject).

    Deterministic: list order within each group. With one subject (or none) this is simply `shots[:n_shot]`.
    """
    if n_shot > len(shots):
        raise ValueError(f"n_shot={n_shot} but only {len(shots)} shots were given")
    same = [s for s in shots if s.subject == question.subject]
    other = [s for s in shots if s.subject != question.subject]
    return (same + other)[:n_shot]


def format_option_context(question: MCQuestion) -> str:
    """Option-likelihood context (lm-eval ARC style): "Question: {q}\\nAnswer:"."""
    return f"Question: {question.question}\nAnswer:"


def format_option_continuations(question: MCQuestion) -> list[str]:
    """Option-likelihood continuations: " {choice}" for each choice."""
    return [f" {choice}" for choice in question.choices]


# --- tokenization ---------------------------------------------------------------------------------------------------


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def letter_token_ids(tokenizer, n_letters: int) -> list[list[int]]:
    """For each of the first `n_letters` letters, its single-token variants: the ids of " L" and of "L", deduplicated.

    A variant that is not a single token is skipped; a letter with neither is an error (it cannot be scored).
    """
    owner: dict[int, str] = {}
    out = []
    for letter in LETTERS[:n_letters]:
        variants: list[int] = []
        for text in (f" {letter}", letter):
            ids = encode(tokenizer, [text])[0]
            if len(ids) == 1 and ids[0] not in variants:
                variants.append(ids[0])
        if not variants:
            raise ValueError(f"neither ' {letter}' nor '{letter}' is a single token for this tokenizer, "
                             f"so the letter-scored probe cannot score option {letter}")
        for token_id in variants:
            if owner.setdefault(token_id, letter) != letter:
                raise ValueError(f"token {token_id} encodes both letter {owner[token_id]} and letter {letter}")
        out.append(variants)
    return out


def _bos(tokenizer) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0  # any id will do: pads are masked out and never scored


def _with_bos_truncated_left(bos: list[int], ids: list[int], max_length: int) -> list[int]:
    """BOS + ids, dropping tokens just after BOS until it fits in max_length (the end is where answers are)."""
    keep = max_length - len(bos)
    return bos + ids[max(0, len(ids) - keep):]


# --- sharding and batching ------------------------------------------------------------------------------------------


def shard_indices(n_items: int, shard: tuple[int, int]) -> tuple[list[int], int]:
    """Global indices this rank evaluates and how many of them are real.

    Items rank::world, then copies of this rank's first item (or item 0) until the share has ceil(n/world) entries,
    the same on every rank. Only the first `n_real` entries' results are kept.
    """
    rank, world = shard
    if not (isinstance(world, int) and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    mine = list(range(rank, n_items, world))
    size = math.ceil(n_items / world)
    filler = mine[0] if mine else 0
    return mine + [filler] * (size - len(mine)), len(mine)


def merge_shards(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate the frames of all ranks and put the rows back in the original order (by the `index` column)."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=list(KNOWLEDGE_COLUMNS))
    merged = pd.concat(frames, ignore_index=True)
    if merged["index"].duplicated().any():
        raise ValueError("merge_shards got the same question from two shards: were shards passed twice?")
    return merged.sort_values("index", kind="stable").reset_index(drop=True)


def _forward(model, seqs: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """One forward call on right-padded sequences; returns logits [B, L, V]."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    return out.logits


def _check_sizes(batch_size: int, max_length: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a token and its prediction), got {max_length}")


# --- knowledge probe ------------------------------------------------------------------------------------------------


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
    _check_sizes(batch_size, max_length)
    questions = list(questions)
    if n_shot < 0:
        raise ValueError(f"n_shot must be >= 0, got {n_shot}")
    shots = list(shots)
    indices, n_real = shard_indices(len(questions), shard)
    mine = [questions[i] for i in indices]
    if not mine:
        return pd.DataFrame(columns=list(KNOWLEDGE_COLUMNS))
    bos, pad_id = _bos(tokenizer), _pad_id(tokenizer)

    # Checks that look at all questions, not just this rank's, so that every rank fails alike before any forward
    # call (a rank failing alone would leave the others waiting in ZeRO-3's collectives).
    letter_ids = letter_token_ids(tokenizer, max(len(q.choices) for q in questions))
    continuations = _encode_continuations(tokenizer, questions, max_length)

    letters = _letter_scores(model, tokenizer, mine, shots, n_shot, letter_ids, batch_size, max_length, bos, pad_id,
                             device)
    # Every rank must run as many option batches as the rank with the most option sequences.
    world = shard[1]
    most_sequences = max(sum(len(questions[i].choices) for i in shard_indices(len(questions), (r, world))[0])
                         for r in range(world))
    logprobs = _option_logprobs(model, tokenizer, mine, [continuations[i] for i in indices], most_sequences,
                                batch_size, max_length, bos, pad_id, device)

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


def _encode_continuations(tokenizer, questions, max_length) -> list[list[list[int]]]:
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


def _letter_scores(model, tokenizer, questions, shots, n_shot, letter_ids, batch_size, max_length, bos, pad_id,
                   device):
    """Per question: letter_pred, p_fmt, entropy_vocab, entropy_options at the first answer position."""
    texts = [format_letter_prompt(q, select_shots(q, shots, n_shot)) for q in questions]
    prompts = [_with_bos_truncated_left(bos, ids, max_length) for ids in encode(tokenizer, texts)]
    scores = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        logits = _forward(model, batch, pad_id, device)
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


def _option_logprobs(model, tokenizer, questions, continuations, n_sequences, batch_size, max_length, bos, pad_id,
                     device):
    """Summed log-prob of every choice's continuation, flattened in question order (padding sequences dropped).

    Context and continuation are tokenized separately and concatenated, so the scored tokens are exactly the
    continuation's; padding copies of the first sequence bring the count up to `n_sequences`.
    """
    contexts = encode(tokenizer, [format_option_context(q) for q in questions])
    seqs, cont_lengths = [], []
    for context, question_continuations in zip(contexts, continuations):
        for cont in question_continuations:
            seqs.append(_with_bos_truncated_left(bos, context + cont, max_length))
            cont_lengths.append(len(cont))
    n_real = len(seqs)
    seqs += [seqs[0]] * (n_sequences - n_real)
    cont_lengths += [cont_lengths[0]] * (n_sequences - n_real)

    sums: list[float] = []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start : start + batch_size]
        logits = _forward(model, batch, pad_id, device)
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


# --- probing perplexity ---------------------------------------------------------------------------------------------


@torch.no_grad()
def probe_perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 512,
    device: Any = "cpu",
    shard: tuple[int, int] = (0, 1),
) -> tuple[float, int]:
    """Summed NLL (float64) and number of scored tokens over this rank's share of `texts`.

    Each passage is [BOS] + its tokens, cut to max_length tokens in all; every token after the first is scored (BOS
    has no prediction; without BOS the first token has none). Sum both over ranks, then `metrics.perplexity`.
    """
    _check_sizes(batch_size, max_length)
    texts = list(texts)
    indices, n_real = shard_indices(len(texts), shard)
    scored = passage_nlls(model, tokenizer, [texts[i] for i in indices], batch_size=batch_size,
                          max_length=max_length, device=device)[:n_real]  # drop the shard's padding copies
    return float(sum(nll for nll, _ in scored)), int(sum(n for _, n in scored))


def passage_nlls(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 512,
    device: Any = "cpu",
) -> list[tuple[float, int]]:
    """(summed NLL, scored tokens) of each passage, in order: [BOS] + tokens cut to max_length, every token after
    the first scored. What probing perplexity sums and what restoring-pool ranking sorts by."""
    _check_sizes(batch_size, max_length)
    bos, pad_id = _bos(tokenizer), _pad_id(tokenizer)
    seqs = [(bos + ids)[:max_length] for ids in encode(tokenizer, list(texts))]
    out: list[tuple[float, int]] = []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start : start + batch_size]
        # An empty passage (no BOS, no text) still takes its slot, as a pad token, so batch counts stay equal.
        logits = _forward(model, [seq or [pad_id] for seq in batch], pad_id, device)
        out.extend(_sequence_nlls(logits, batch, pad_id))
    return out


# Log-softmax over at most this many logits at once: vectorised over rows (per-row Python calls dominated small
# models), bounded in memory for large vocabularies and long passages.
_LOGITS_PER_CHUNK = 2**26


def _sequence_nlls(logits: torch.Tensor, seqs: list[list[int]], pad_id: int) -> list[tuple[float, int]]:
    """(summed NLL, scored tokens) per right-padded sequence: every token after the first is scored."""
    rows, width, vocab = logits.shape
    targets = torch.full((rows, max(width - 1, 1)), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, max(width - 1, 1)), dtype=torch.float64)
    for row, seq in enumerate(seqs):
        if len(seq) >= 2:
            targets[row, : len(seq) - 1] = torch.tensor(seq[1:], dtype=torch.long)
            mask[row, : len(seq) - 1] = 1.0
    if width < 2:
        return [(0.0, 0)] * rows
    nll = torch.zeros(rows, dtype=torch.float64)
    step = max(1, _LOGITS_PER_CHUNK // ((width - 1) * vocab))
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        logp = metrics.token_logprobs(logits[lo:hi, :-1].reshape(-1, vocab), targets[lo:hi].reshape(-1))
        nll[lo:hi] = -(logp.view(hi - lo, width - 1).cpu() * mask[lo:hi]).sum(1)
    return [(float(nll[row]), max(len(seq) - 1, 0)) for row, seq in enumerate(seqs)]
