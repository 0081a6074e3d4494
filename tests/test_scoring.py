"""score_prompts against a naive reference written here: per (context, continuation), lm-eval's tokenization done
by hand and one unbatched, uncached forward; on the three tokenizer families, every BOS rule, shared prefixes (with
a prompt that must fall back), multi-token continuations, truncation, and sharding."""

import math
from types import SimpleNamespace

import pytest
import torch

import tokenizer_fixtures
from forgetray.data.questions import MCPrompt
from forgetray.probes import forward_passes
from forgetray.probes.scoring import score_prompts, tokenize
from forgetray.probes.tokens import letter_token_ids

torch.set_num_threads(1)

SHOTS = "".join(f"Question: Which is {w}?\nA. Lund\nB. Oslo\nC. Paris\nD. Rome\nAnswer: {a}\n\n"
                for w, a in [("north", "A"), ("the river", "B"), ("old", "C"), ("small", "D"), ("blue", "A")])
QUESTIONS = ["What is the capital of Zorbia?", "How many moons does the planet have?", "Pick one.",
             "Which river runs through the old town of Velmar and past its harbour?"]
OPTIONS = ("Lund", "Oslo the old town", "Paris", "yes no maybe")


def _prompts():
    out = []
    for n, q in enumerate(QUESTIONS):
        query = f"Question: {q}\nA. Lund\nB. Oslo\nC. Paris\nD. Rome\nAnswer:"
        out.append(MCPrompt(f"l{n}", SHOTS, query, (" A", " B", " C", " D"), n % 4, subject="geo"))
        out.append(MCPrompt(f"o{n}", "", f"Question: {q}\nAnswer:", tuple(" " + o for o in OPTIONS), n % 4))
    # Shares the prefix text but glues its first characters onto the prefix's last ones: its tokens need not start
    # with the prefix's tokens, so it may have to fall back; with multi-token continuations on a shared prefix.
    out.append(MCPrompt("glued", SHOTS, "Answer:Question: Pick one.\nAnswer:", (" Oslo the old town", " A"), 0))
    out.append(MCPrompt("shared-multi", SHOTS, "Question: Pick one.\nAnswer: ", ("Paris", "Oslo the old town"), 1))
    return out


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: tokenizer_fixtures.load(tokenizer_fixtures.build_family(f, root)) for f in tokenizer_fixtures.FAMILIES}


class CountingModel:
    def __init__(self, model):
        self.model, self.calls, self.inputs = model, 0, []

    def __call__(self, **kwargs):
        self.calls += 1
        self.inputs += kwargs["input_ids"].tolist()
        out = self.model(**kwargs)
        return SimpleNamespace(logits=out.logits, past_key_values=out.past_key_values)


def _ref_ids(tokenizer, text, bos):
    if bos == "auto":
        return tokenizer(text)["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id] + ids if bos == "always" else ids


def _ref_score(model, tokenizer, prompt, bos, max_length, sets):
    context = prompt.prefix + prompt.query
    stripped = context.rstrip()
    ctx = _ref_ids(tokenizer, stripped, bos)
    logprobs, greedy, answer = [], [], None
    for cont_text in prompt.continuations:
        cont = _ref_ids(tokenizer, context + cont_text, bos)[len(ctx):]
        seq = (ctx + cont)[:-1]
        while len(seq) > max_length:  # drop the token after the BOS (or the first one without it)
            del seq[1 if bos != "never" else 0]
        with torch.no_grad():
            log_p = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
        rows = range(len(seq) - len(cont), len(seq))
        logprobs.append(sum(float(log_p[r, t]) for r, t in zip(rows, cont)))
        greedy.append(all(int(log_p[r].argmax()) == t for r, t in zip(rows, cont)))
        if answer is None and sets is not None:
            p = log_p[len(seq) - len(cont)].exp()
            answer = ([sum(float(p[t]) for t in s) for s in sets], -float((p * log_p[len(seq) - len(cont)]).sum()))
    return logprobs, greedy, answer


def _assert_close(got, want):
    for score, (logprobs, greedy, answer) in zip(got, want):
        assert score.logprobs == pytest.approx(logprobs, abs=1e-4)
        assert list(score.greedy) == greedy
        if answer is not None:
            assert score.answer_probs == pytest.approx(answer[0], abs=1e-6)
            assert score.entropy_vocab == pytest.approx(answer[1], abs=1e-5)


@pytest.mark.parametrize("family", tokenizer_fixtures.FAMILIES)
@pytest.mark.parametrize("bos,batch_size", [("auto", 3), ("always", 2), ("never", 16)])
def test_score_prompts_matches_naive_reference(families, family, bos, batch_size):
    model, tokenizer = families[family]
    prompts = _prompts()
    sets = letter_token_ids(tokenizer, 4)
    got = score_prompts(model, tokenizer, prompts, bos=bos, batch_size=batch_size, max_length=512, answer_sets=sets)
    want = [_ref_score(model, tokenizer, p, bos, 512, sets) for p in prompts]
    _assert_close(got, want)
    assert [s.char_lengths for s in got] == [tuple(map(len, p.continuations)) for p in prompts]
    lps = [s.logprobs[0] for s in got]
    assert len({round(x, 3) for x in lps}) > len(lps) // 2  # the random model is not degenerate


def test_prefix_is_run_once_per_group_and_reused(families):
    model, tokenizer = families["metaspace"]
    prompts = [p for p in _prompts() if p.prefix]
    requests = tokenize(tokenizer, prompts, "auto", 512)
    plan = forward_passes.plan_groups(requests, 64, 512, tokenizer.bos_token_id)
    shared_groups = [g for g in plan.groups if g.shared]
    assert len(shared_groups) == 1
    reusing = {prompts[i].id for batch in shared_groups[0].batches for i in batch}
    assert {f"l{n}" for n in range(len(QUESTIONS))} <= reusing
    counting = CountingModel(model)
    score_prompts(counting, tokenizer, prompts, batch_size=64)
    assert counting.calls == plan.n_calls
    # The prefix's tokens were fed once, not once per prompt: only one input row starts with them.
    head = shared_groups[0].shared[:20]
    assert len(shared_groups[0].shared) > 50
    assert sum(row[:20] == head for row in counting.inputs) == 1


def test_a_prompt_whose_tokens_do_not_start_with_the_prefix_falls_back(families, monkeypatch):
    model, tokenizer = families["legacy"]
    prefix = "Answer: Pari"
    prompts = [MCPrompt("a", prefix, " One?\nAnswer:", (" A", " B"), 0),
               MCPrompt("b", prefix, " Two?\nAnswer:", (" A", " B"), 1),
               MCPrompt("c", prefix, "s Three?\nAnswer:", (" A", " B"), 1)]  # "Pari" + "s": "▁Paris", one piece
    requests = tokenize(tokenizer, prompts, "auto", 512)
    prefix_ids = requests[0].prefix_ids
    common = forward_passes._common_length(prefix_ids, requests[2].ctx)
    assert common < len(prefix_ids) - forward_passes.BOUNDARY_SLACK
    plan = forward_passes.plan_groups(requests, 8, 512, tokenizer.bos_token_id)
    layout = [(len(g.shared), sorted(i for b in g.batches for i in b)) for g in plan.groups]
    assert layout == [(len(prefix_ids), [0, 1]), (0, [2])]
    # With a slack that accepts c, the group shares only the tokens c has in common with the prefix.
    monkeypatch.setattr(forward_passes, "BOUNDARY_SLACK", len(prefix_ids) - common)
    plan = forward_passes.plan_groups(requests, 8, 512, tokenizer.bos_token_id)
    assert [(len(g.shared), sorted(i for b in g.batches for i in b)) for g in plan.groups] == [(common, [0, 1, 2])]
    for slack in (0, len(prefix_ids) - common):
        monkeypatch.setattr(forward_passes, "BOUNDARY_SLACK", slack)
        got = score_prompts(model, tokenizer, prompts, batch_size=8)
        _assert_close(got, [_ref_score(model, tokenizer, p, "auto", 512, None) for p in prompts])



@pytest.mark.parametrize("bos", ["always", "never"])
def test_truncated_inputs_keep_the_bos_and_match_the_reference(families, bos):
    model, tokenizer = families["bytelevel"]
    prompts = _prompts()
    max_length = 40
    assert max(len(r.ctx) for r in tokenize(tokenizer, prompts, bos, 512)) > max_length
    got = score_prompts(model, tokenizer, prompts, bos=bos, batch_size=4, max_length=max_length,
                        answer_sets=letter_token_ids(tokenizer, 4))
    want = [_ref_score(model, tokenizer, p, bos, max_length, letter_token_ids(tokenizer, 4)) for p in prompts]
    _assert_close(got, want)


def test_shards_make_equal_calls_and_merge_to_the_whole(families):
    model, tokenizer = families["bytelevel"]
    prompts = _prompts()
    whole = score_prompts(model, tokenizer, prompts, batch_size=2)
    parts, calls = {}, []
    for rank in range(3):
        counting = CountingModel(model)
        scores = score_prompts(counting, tokenizer, prompts, batch_size=2, shard=(rank, 3))
        parts.update(zip(range(rank, len(prompts), 3), scores))
        calls.append(counting.calls)
    assert len(set(calls)) == 1
    for i, score in enumerate(whole):
        assert parts[i].logprobs == pytest.approx(score.logprobs, abs=1e-5)


def test_rejects_what_it_cannot_score(families):
    model, tokenizer = families["bytelevel"]
    counting = CountingModel(model)
    long = MCPrompt("long", "", "Q:", (" Oslo the old town" * 20,), 0)
    with pytest.raises(ValueError, match="'long'.*max_length"):
        score_prompts(counting, tokenizer, [_prompts()[0], long], max_length=30, shard=(1, 2))
    with pytest.raises(ValueError, match="bos"):
        score_prompts(counting, tokenizer, _prompts(), bos="sometimes")
    assert counting.calls == 0
    assert not math.isnan(score_prompts(model, tokenizer, _prompts()[:1])[0].logprobs[0])
