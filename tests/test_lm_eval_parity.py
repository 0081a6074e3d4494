"""forgetray's scorer against lm-eval 0.4.13's own HFLM `loglikelihood` on the same (context, continuation)
requests, for each tokenizer family: single-token (letters) and multi-token (option text) continuations, with and
without a shared 5-shot prefix. Log-likelihoods agree to 1e-4 and predictions exactly; forgetray's merged-letter
rule is checked to differ from lm-eval's " A"-only rule where it should (the documented difference)."""

import numpy as np
import pytest
import torch

import tokenizer_fixtures
from forgetray.data.questions import MCPrompt, MCQuestion
from forgetray.probes import letter_token_ids, mc_prompts, probe_knowledge, score_prompts

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

torch.set_num_threads(1)

WORDS = ["Lund", "Oslo", "Paris", "Rome", "north", "river", "old", "small", "blue", "moons", "planet", "harbour"]
QUESTIONS = [MCQuestion(f"q{i}", f"Which is the {WORDS[i % 12]} of the {WORDS[(3 * i + 1) % 12]}?",
                        tuple(WORDS[(i + k) % 12] + " " * (k % 2) + WORDS[(i * k) % 12].lower() * (k % 2)
                              for k in range(4)), i % 4, "geo" if i % 3 else "lit")
             for i in range(14)]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return {f: tokenizer_fixtures.build_family(f, root) for f in tokenizer_fixtures.FAMILIES}


def _lm_eval(lm, prompts):
    """lm-eval's log-likelihood of every (context, continuation) request, per prompt."""
    requests = [Instance("loglikelihood", {}, (p.context, c), idx) for p in prompts for idx, c in
                enumerate(p.continuations)]
    out, flat = [], lm.loglikelihood(requests, disable_tqdm=True)
    for p in prompts:
        out.append(flat[: len(p.continuations)])
        flat = flat[len(p.continuations):]
    return out


@pytest.mark.parametrize("family", tokenizer_fixtures.FAMILIES)
@pytest.mark.parametrize("n_shot", [0, 5])
def test_loglikelihoods_and_predictions_equal_lm_eval(family_dirs, family, n_shot):
    path = family_dirs[family]
    model, tokenizer = tokenizer_fixtures.load(path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=1024, device="cpu")
    shots, scored = QUESTIONS[:5], QUESTIONS[5:]
    prompts = mc_prompts(scored, shots, n_shot)  # letter prompt (" A" ..), option prompt (" {choice}") per question
    assert n_shot == 0 or all(p.prefix for p in prompts[::2])
    ours = score_prompts(model, tokenizer, prompts, bos="auto", batch_size=3, max_length=1024)
    theirs = _lm_eval(lm, prompts)
    lengths = [score.token_lengths for score in ours]
    assert max(max(n) for n in lengths[1::2]) > 1  # option continuations are multi-token
    assert all(n == (1,) * len(n) for n in lengths[::2])  # letters are single tokens
    for prompt, score, want in zip(prompts, ours, theirs):
        assert score.logprobs == pytest.approx([lp for lp, _ in want], abs=1e-4), prompt.id
        assert list(score.greedy) == [g for _, g in want], prompt.id
        assert int(np.argmax(score.logprobs)) == int(np.argmax([lp for lp, _ in want])), prompt.id

    # probe_knowledge with lm-eval's letter rule and BOS rule predicts as lm-eval; its option columns too.
    frame = probe_knowledge(model, tokenizer, scored, batch_size=3, max_length=1024, n_shot=n_shot, shots=shots,
                            bos="auto", letter_rule="lm_eval")
    assert frame["letter_pred"].tolist() == [int(np.argmax([lp for lp, _ in w])) for w in theirs[::2]]
    assert frame["acc_pred"].tolist() == [int(np.argmax([lp for lp, _ in w])) for w in theirs[1::2]]
    norm = [int(np.argmax([lp / len(c) for (lp, _), c in zip(w, q.choices)])) for w, q in zip(theirs[1::2], scored)]
    assert frame["acc_norm_pred"].tolist() == norm

    # The merged rule (forgetray's default, docs/methods.md §3) adds the bare "A" pieces' probability to lm-eval's " A":
    # its prediction is argmax_k(exp(lm-eval's log-likelihood of " k") + p("k")), and its P_fmt exceeds lm-eval's sum.
    merged = probe_knowledge(model, tokenizer, scored, batch_size=3, max_length=1024, n_shot=n_shot, shots=shots,
                             bos="auto")
    sets = letter_token_ids(tokenizer, 4)
    assert all(len(s) == 2 for s in sets)  # a spaced and a bare piece for every letter, in every family
    bare = score_prompts(model, tokenizer, prompts[::2], bos="auto", max_length=1024,
                         answer_sets=[[s[1]] for s in sets])
    for q, row, w, b in zip(scored, merged.itertuples(), theirs[::2], bare):
        spaced = np.exp([lp for lp, _ in w])
        assert row.letter_pred == int(np.argmax(spaced + np.array(b.answer_probs))), q.id
        assert row.p_fmt == pytest.approx(spaced.sum() + sum(b.answer_probs), rel=1e-4)
        assert row.p_fmt > spaced.sum()


def test_bos_rules_follow_the_tokenizer(family_dirs):
    """"auto" is lm-eval's rule: these tokenizers add BOS themselves, so "auto" equals "always" here; "never"
    differs (no BOS); the organism keeps "always" whatever its tokenizer does."""
    model, tokenizer = tokenizer_fixtures.load(family_dirs["metaspace"])
    prompts = [MCPrompt("p", "", "Question: Pick one.\nAnswer:", (" yes", " no"), 0)]
    auto, always, never = (score_prompts(model, tokenizer, prompts, bos=b)[0].logprobs
                           for b in ("auto", "always", "never"))
    assert auto == always
    assert never != pytest.approx(auto, abs=1e-3)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=256, device="cpu")
    assert auto == pytest.approx([lp for lp, _ in _lm_eval(lm, prompts)[0]], abs=1e-4)
