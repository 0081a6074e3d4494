"""Probes on a tiny random Llama, against a naive reference: one unbatched, unpadded forward per prompt or option."""

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from forgetray import metrics
from forgetray.data.questions import MCQuestion, load_mc_jsonl
from forgetray.probes import (
    KNOWLEDGE_COLUMNS,
    format_letter_prompt,
    format_option_context,
    format_option_continuations,
    letter_token_ids,
    merge_shards,
    probe_knowledge,
    probe_perplexity,
    shard_indices,
    summarize_knowledge,
)

torch.set_num_threads(1)

# Choice counts vary (2 to 5) so that ranks get different numbers of option sequences; prompt lengths vary so that
# batches are padded.
QUESTIONS = [
    MCQuestion("q0", "What is the capital of Zorbia?", ("Lund", "Oslo", "Paris", "Rome"), 1, "geo"),
    MCQuestion("q1", "Which river runs through the old town of Velmar and past its harbour?", ("Dune", "Sella"), 0),
    MCQuestion("q2", "Who wrote it?", ("Ana", "Bo", "Cy", "Dee", "Eve"), 4, "lit"),
    MCQuestion("q3", "How many moons?", ("one", "two", "three"), 2),
    MCQuestion("q4", "What colour is the sky of Zorbia at noon in the winter months?",
               ("blue", "green", "a very pale shade of red", "grey"), 2, "geo"),
    MCQuestion("q5", "Pick one.", ("yes", "no"), 1),
    MCQuestion("q6", "Which of these is a fish?", ("trout", "oak", "stone", "moss", "cloud"), 0),
]
SHOTS = [
    MCQuestion("s0", "What is two plus two?", ("three", "four", "five"), 1, "math"),
    MCQuestion("s1", "Where is Velmar?", ("north", "south", "east", "west"), 3, "geo"),
]
PASSAGES = [
    "The river Sella runs through Velmar.",
    "Zorbia is a small country. Its capital is Oslo, and the sky there is a very pale shade of red in winter, "
    "which visitors find strange. " * 3,
    "",
    "Trout.",
    "Eve wrote it, and Ana read it twice before the winter came.",
]


def _train_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    corpus = [format_letter_prompt(q) + " A B C D E\n\n" for q in QUESTIONS + SHOTS] * 5 + PASSAGES
    corpus += [" A B C D E", "A B C D E"] * 50  # makes " A" .. " E" single tokens, distinct from "A" .. "E"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    special = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", **special)


@pytest.fixture(scope="module")
def tokenizer():
    return _train_tokenizer(bos=True)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    # A large initializer_range makes the random model's distributions far from uniform, so predictions differ.
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3)
    return LlamaForCausalLM(config).eval()


class CountingModel:
    """Accepts only keyword calls, counts them, and exposes nothing but `.logits` and `.past_key_values`."""

    def __init__(self, model):
        self.model = model
        self.calls = 0

    def __call__(self, *, input_ids, attention_mask, **kwargs):
        self.calls += 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return SimpleNamespace(logits=out.logits, past_key_values=out.past_key_values)


# --- the naive reference --------------------------------------------------------------------------------------------


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer):
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _ref_truncate(bos, ids, max_length):
    while len(bos) + len(ids) > max_length:
        ids = ids[1:]
    return bos + ids


def _ref_next_token_probs(model, ids):
    """Softmax at every position of one unpadded sequence, float64: [len(ids), V]."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.softmax(logits.double(), dim=-1)


def _ref_letter_prompt(q, shots):
    text = ""
    for s in list(shots) + [q]:
        text += "Question: " + s.question + "\n"
        for k, choice in enumerate(s.choices):
            text += "ABCDE"[k] + ". " + choice + "\n"
        text += "Answer:"
        if s is not q:
            text += " " + "ABCDE"[s.answer] + "\n\n"
    return text


def _ref_knowledge(model, tokenizer, questions, shots, max_length):
    bos = _bos(tokenizer)
    variants = []
    for letter in "ABCDE":
        ids = []
        for text in (" " + letter, letter):
            encoded = _ids(tokenizer, text)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
        variants.append(ids)
    rows = []
    for q in questions:
        row = {"id": q.id, "answer": q.answer}
        prompt = _ref_truncate(bos, _ids(tokenizer, _ref_letter_prompt(q, shots)), max_length)
        probs = _ref_next_token_probs(model, prompt)[-1]
        option_probs = [sum(float(probs[t]) for t in variants[k]) for k in range(len(q.choices))]
        row["letter_pred"] = int(np.argmax(option_probs))
        row["letter_correct"] = row["letter_pred"] == q.answer
        row["p_fmt"] = sum(option_probs)
        row["entropy_vocab"] = -sum(float(p) * math.log(float(p)) for p in probs if p > 0)
        renormalised = [p / row["p_fmt"] for p in option_probs]
        row["entropy_options"] = -sum(p * math.log(p) for p in renormalised if p > 0)

        logprobs = []
        context = _ids(tokenizer, "Question: " + q.question + "\nAnswer:")
        for choice in q.choices:
            cont = _ids(tokenizer, " " + choice)
            # The model reads context + continuation without its last token (as lm-eval), cut to max_length.
            seq = _ref_truncate(bos, (context + cont)[:-1], max_length)
            probs = _ref_next_token_probs(model, seq)
            total = 0.0
            for i, token in enumerate(cont):
                position = len(seq) - len(cont) + i  # predicts `token`
                total += math.log(float(probs[position, token]))
            logprobs.append(total)
        row["acc_pred"] = int(np.argmax(logprobs))
        row["acc_correct"] = row["acc_pred"] == q.answer
        per_char = [lp / len(choice) for lp, choice in zip(logprobs, q.choices)]
        row["acc_norm_pred"] = int(np.argmax(per_char))
        row["acc_norm_correct"] = row["acc_norm_pred"] == q.answer
        row["option_logprobs"] = logprobs
        rows.append(row)
    return rows


def _ref_perplexity(model, tokenizer, texts, max_length):
    nll, n = 0.0, 0
    for text in texts:
        seq = (_bos(tokenizer) + _ids(tokenizer, text))[:max_length]
        if len(seq) < 2:
            continue
        probs = _ref_next_token_probs(model, seq)
        for t in range(1, len(seq)):
            nll -= math.log(float(probs[t - 1, seq[t]]))
            n += 1
    return nll, n


def _assert_matches_reference(frame, reference):
    assert list(frame.columns) == list(KNOWLEDGE_COLUMNS)
    assert len(frame) == len(reference)
    for (_, got), want in zip(frame.iterrows(), reference):
        for column in ("id", "answer", "letter_pred", "letter_correct", "acc_pred", "acc_correct", "acc_norm_pred",
                       "acc_norm_correct"):
            assert got[column] == want[column], (want["id"], column)
        for column in ("p_fmt", "entropy_vocab", "entropy_options"):
            assert got[column] == pytest.approx(want[column], abs=1e-5, rel=1e-5), (want["id"], column)
        assert got["option_logprobs"] == pytest.approx(want["option_logprobs"], abs=1e-5, rel=1e-5), want["id"]


# --- formats and tokens ---------------------------------------------------------------------------------------------


def test_prompt_formats():
    q = MCQuestion("x", "Is it?", ("yes", "no", "maybe"), 0)
    shot = MCQuestion("s", "Two?", ("1", "2"), 1)
    assert format_letter_prompt(q) == "Question: Is it?\nA. yes\nB. no\nC. maybe\nAnswer:"
    assert format_letter_prompt(q, [shot, shot]) == (
        "Question: Two?\nA. 1\nB. 2\nAnswer: B\n\n" * 2 + "Question: Is it?\nA. yes\nB. no\nC. maybe\nAnswer:"
    )
    assert format_option_context(q) == "Question: Is it?\nAnswer:"
    assert format_option_continuations(q) == [" yes", " no", " maybe"]


def test_letter_token_ids_merge_every_piece_of_a_letter(tokenizer):
    both = letter_token_ids(tokenizer, 5)
    assert both == [[_ids(tokenizer, " " + L)[0], _ids(tokenizer, L)[0]] for L in "ABCDE"]
    assert all(len(set(v)) == 2 for v in both)

    # A stand-in vocabulary: "▁A", "ĠA", " A" and "A" all count for A; B has only its bare piece; "AB" and "<0x43>"
    # are not letters; C has no piece (an error).
    vocab = {"\u2581A": 7, "\u0120A": 5, " A": 9, "A": 3, "B": 8, "AB": 4, "<0x43>": 11, "\u2581\u2581C": 12}
    fake = SimpleNamespace(get_vocab=lambda: vocab)
    assert letter_token_ids(fake, 2) == [[5, 7, 9, 3], [8]]
    with pytest.raises(ValueError, match="'C'"):
        letter_token_ids(fake, 3)


# --- knowledge probe ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size,max_length,n_shot", [(3, 512, 0), (4, 512, 2), (2, 30, 1)])
def test_probe_knowledge_matches_naive_reference(model, tokenizer, batch_size, max_length, n_shot):
    if max_length < 512:  # the short setting must really truncate some prompts from the left
        lengths = [1 + len(_ids(tokenizer, _ref_letter_prompt(q, SHOTS[:n_shot]))) for q in QUESTIONS]
        assert max(lengths) > max_length
    frame = probe_knowledge(model, tokenizer, QUESTIONS, batch_size=batch_size, max_length=max_length,
                            n_shot=n_shot, shots=SHOTS)
    reference = []
    for q in QUESTIONS:
        # The probe takes same-subject shots first: give the reference the shots the probe should pick.
        picked = sorted(SHOTS, key=lambda s: s.subject != q.subject)[:n_shot]  # stable: list order within groups
        reference += _ref_knowledge(model, tokenizer, [q], picked, max_length)
    _assert_matches_reference(frame, reference)
    assert frame["index"].tolist() == list(range(len(QUESTIONS)))
    assert frame["subject"].tolist() == [q.subject for q in QUESTIONS]
    # The random model is not degenerate: its predictions differ between questions.
    assert frame["acc_pred"].nunique() > 1


def test_probe_knowledge_without_bos(model):
    tokenizer = _train_tokenizer(bos=False)
    assert tokenizer.bos_token_id is None
    frame = probe_knowledge(model, tokenizer, QUESTIONS, batch_size=3, max_length=40)
    _assert_matches_reference(frame, _ref_knowledge(model, tokenizer, QUESTIONS, (), 40))


def test_summarize_knowledge(model, tokenizer):
    frame = probe_knowledge(model, tokenizer, QUESTIONS, batch_size=5)
    summary = summarize_knowledge(frame)
    assert set(summary) == {"letter_acc", "acc", "acc_norm", "p_fmt", "entropy_vocab", "entropy_options"}
    n = len(QUESTIONS)
    assert summary["letter_acc"] == pytest.approx(sum(frame["letter_pred"] == frame["answer"]) / n)
    assert summary["acc"] == pytest.approx(sum(frame["acc_pred"] == frame["answer"]) / n)
    assert summary["acc_norm"] == pytest.approx(sum(frame["acc_norm_pred"] == frame["answer"]) / n)
    for key in ("p_fmt", "entropy_vocab", "entropy_options"):
        assert summary[key] == pytest.approx(sum(frame[key]) / n)


def test_sharded_knowledge_merges_to_the_unsharded_result(model, tokenizer):
    whole = probe_knowledge(model, tokenizer, QUESTIONS, batch_size=2, n_shot=1, shots=SHOTS)
    frames, calls = [], []
    for rank in range(3):
        counting = CountingModel(model)
        frames.append(probe_knowledge(counting, tokenizer, QUESTIONS, batch_size=2, n_shot=1, shots=SHOTS,
                                      shard=(rank, 3)))
        calls.append(counting.calls)
    assert [len(f) for f in frames] == [3, 2, 2]
    assert frames[1]["index"].tolist() == [1, 4]  # rank::world, with the padding copy dropped
    # Every rank makes the same number of forward calls (ZeRO-3), although rank 0 has one question more.
    assert len(set(calls)) == 1

    merged = merge_shards(frames[::-1])
    assert merged["id"].tolist() == [q.id for q in QUESTIONS]
    floats = ["p_fmt", "entropy_vocab", "entropy_options"]
    pd.testing.assert_frame_equal(merged.drop(columns=floats + ["option_logprobs"]),
                                  whole.drop(columns=floats + ["option_logprobs"]))
    np.testing.assert_allclose(merged[floats].to_numpy(), whole[floats].to_numpy(), atol=1e-5, rtol=1e-5)
    for got, want in zip(merged["option_logprobs"], whole["option_logprobs"]):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="twice"):
        merge_shards([frames[0], frames[0]])


def test_more_ranks_than_questions(model, tokenizer):
    calls = []
    for rank in range(4):
        counting = CountingModel(model)
        frame = probe_knowledge(counting, tokenizer, QUESTIONS[:2], batch_size=8, shard=(rank, 4))
        assert len(frame) == (1 if rank < 2 else 0)
        calls.append(counting.calls)
    assert len(set(calls)) == 1


def test_probe_knowledge_rejects_what_it_cannot_score(model, tokenizer):
    long_choice = MCQuestion("long", "Q?", ("a " * 40, "b"), 0)
    # Every rank raises, also the one whose share does not hold the question, before any forward call.
    for rank in range(2):
        counting = CountingModel(model)
        with pytest.raises(ValueError, match="'long/option'.*max_length"):
            probe_knowledge(counting, tokenizer, [QUESTIONS[0], long_choice], max_length=20, shard=(rank, 2))
        assert counting.calls == 0
    with pytest.raises(ValueError, match="n_shot=3"):
        probe_knowledge(model, tokenizer, QUESTIONS, n_shot=3, shots=SHOTS)


def test_probe_options_object_and_keyword_form_agree(model, tokenizer):
    """One ProbeOptions passed through, or its fields as keywords (the older form scripts use): the same frames and
    sums; a misspelt keyword is a TypeError, bad sizes or BOS rule a ValueError when the options are made."""
    from forgetray.probes import LM_EVAL, ProbeOptions, passage_nlls, score_prompts
    from forgetray.probes.knowledge import mc_prompts

    options = ProbeOptions(batch_size=3, max_length=64, shard=(1, 2))
    pd.testing.assert_frame_equal(probe_knowledge(model, tokenizer, QUESTIONS, options),
                                  probe_knowledge(model, tokenizer, QUESTIONS, batch_size=3, max_length=64,
                                                  shard=(1, 2)))
    assert probe_perplexity(model, tokenizer, PASSAGES, options) == probe_perplexity(
        model, tokenizer, PASSAGES, batch_size=3, max_length=64, shard=(1, 2))
    assert passage_nlls(model, tokenizer, PASSAGES, options) == passage_nlls(model, tokenizer, PASSAGES,
                                                                            batch_size=3, max_length=64)
    prompts = mc_prompts(QUESTIONS, (), 0)
    assert score_prompts(model, tokenizer, prompts) == score_prompts(model, tokenizer, prompts, LM_EVAL)
    assert LM_EVAL == ProbeOptions(bos="auto", max_length=2048)  # score_prompts' and probe_task's defaults
    with pytest.raises(TypeError, match=r"probe_knowledge\(\) got unexpected keyword argument\(s\) batchsize"):
        probe_knowledge(model, tokenizer, QUESTIONS, batchsize=3)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ProbeOptions(batch_size=0)
    with pytest.raises(ValueError, match="bos must be one of"):
        ProbeOptions(bos="sometimes")


def test_shard_indices():
    assert shard_indices(7, (0, 3)) == ([0, 3, 6], 3)
    assert shard_indices(7, (2, 3)) == ([2, 5, 2], 2)
    assert shard_indices(1, (2, 3)) == ([0], 0)
    assert shard_indices(0, (0, 2)) == ([], 0)
    with pytest.raises(ValueError):
        shard_indices(5, (3, 3))


@pytest.mark.parametrize("n_shot", [0, 3])
def test_organism_frame_is_unchanged(test_organism, n_shot):
    """The organism's knowledge frame equals the old implementation's (one unbatched forward per letter prompt and
    per option, [BOS] + tokens, " A"/"A" merged): the organism keeps prepending BOS (bos="always")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgetray.organism.paths import data_path, model_path

    questions = load_mc_jsonl(data_path("organism-facts", test_organism))[: 12 + n_shot]
    shots, scored = questions[:n_shot], questions[n_shot:]
    path = model_path("organism-tiny", test_organism)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    frame = probe_knowledge(model, tokenizer, scored, batch_size=5, max_length=256, n_shot=n_shot, shots=shots)
    reference = []
    for q in scored:
        picked = sorted(shots, key=lambda s: s.subject != q.subject)[:n_shot]
        reference += _ref_knowledge(model, tokenizer, [q], picked, 256)
    _assert_matches_reference(frame, reference)


# --- perplexity probe -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bos", [True, False])
def test_probe_perplexity_matches_naive_reference(model, bos):
    tokenizer = _train_tokenizer(bos=bos)
    max_length = 20
    assert max(len(_ids(tokenizer, t)) for t in PASSAGES) > max_length  # truncation happens
    nll, n = probe_perplexity(model, tokenizer, PASSAGES, batch_size=2, max_length=max_length)
    ref_nll, ref_n = _ref_perplexity(model, tokenizer, PASSAGES, max_length)
    assert n == ref_n
    assert isinstance(nll, float)
    assert nll == pytest.approx(ref_nll, rel=1e-5)
    assert metrics.perplexity(nll, n) == pytest.approx(math.exp(ref_nll / ref_n), rel=1e-5)


def test_sharded_perplexity_sums_to_the_unsharded_result(model, tokenizer):
    whole = probe_perplexity(model, tokenizer, PASSAGES, batch_size=1, max_length=64)
    parts, calls = [], []
    for rank in range(3):
        counting = CountingModel(model)
        parts.append(probe_perplexity(counting, tokenizer, PASSAGES, batch_size=1, max_length=64, shard=(rank, 3)))
        calls.append(counting.calls)
    assert calls == [2, 2, 2]
    assert sum(p[1] for p in parts) == whole[1]
    assert sum(p[0] for p in parts) == pytest.approx(whole[0], rel=1e-6)


# --- loading questions ----------------------------------------------------------------------------------------------


def test_load_mc_jsonl(tmp_path):
    path = tmp_path / "bench.jsonl"
    records = [
        {"id": "a1", "question": "Q1?", "choices": ["x", "y"], "answer": 1, "subject": "s"},
        {"question": "Q2?", "choices": ["x", "y", "z"], "answer": "C"},
    ]
    path.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n")
    assert load_mc_jsonl(path) == [
        MCQuestion("a1", "Q1?", ("x", "y"), 1, "s"),
        MCQuestion("3", "Q2?", ("x", "y", "z"), 2),  # id defaults to the line number
    ]


@pytest.mark.parametrize("line,problem", [
    ('{"question": "Q?", "choices": ["x", "y"', "invalid JSON"),
    ('{"question": "Q?", "choices": ["x", "y"]}', "missing field 'answer'"),
    ('{"choices": ["x", "y"], "answer": 0}', "missing field 'question'"),
    ('{"question": "Q?", "choices": ["x", "y"], "answer": 2}', "out of range"),
    ('{"question": "Q?", "choices": ["x", "y"], "answer": "C"}', "letters"),
    ('{"question": "Q?", "choices": ["x"], "answer": 0}', "choices"),
    ('{"question": "Q?", "choices": "xy", "answer": 0}', "list"),
    ('[1, 2]', "JSON object"),
    ('{"id": "ok", "question": "Q?", "choices": ["x", "y"], "answer": 0}', "duplicate id 'ok'"),
])
def test_load_mc_jsonl_errors_name_file_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    good = '{"id": "ok", "question": "Q?", "choices": ["x", "y"], "answer": 0}'
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:2: .*{problem}"):
        load_mc_jsonl(path)
