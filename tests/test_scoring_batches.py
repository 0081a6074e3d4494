"""How the scorer fills its forward calls and what its LM head computes: token-budget batches (`batch_tokens`) by
hand and against the naive reference of test_scoring; a bf16 model's scored logits in fp32, against a reference
written here (the model's own bf16 hidden state times its head in fp32)."""

import copy

import pytest
import torch

import tokenizer_fixtures
from forgetray.data.questions import MCPrompt
from forgetray.probes import ProbeOptions, forward_passes
from forgetray.probes.scoring import score_prompts, tokenize
from forgetray.probes.tokens import letter_token_ids
from test_scoring import CountingModel, _assert_close, _prompts, _ref_score

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bytelevel(tmp_path_factory):
    return tokenizer_fixtures.load(tokenizer_fixtures.build_family("bytelevel", tmp_path_factory.mktemp("bl")))


def test_chunks_by_rows_and_by_tokens():
    widths = [10, 8, 8, 8, 8, 30]
    assert forward_passes.chunks(widths, 2) == [range(0, 2), range(2, 4), range(4, 6)]
    # 2 x 10 = 20 <= 24 but 3 x 10 = 30 > 24; then 3 x 8 = 24 just fits; the 30-token row alone, though over it.
    assert forward_passes.chunks(widths, 2, batch_tokens=24) == [range(0, 2), range(2, 5), range(5, 6)]
    assert forward_passes.chunks(widths, 2, batch_tokens=1000) == [range(0, 6)]
    assert forward_passes.chunks(widths, 2, batch_tokens=5) == [range(i, i + 1) for i in range(6)]
    with pytest.raises(ValueError, match="batch_tokens"):
        ProbeOptions(batch_tokens=-1)


@pytest.mark.parametrize("budget", [60, 400, 100_000])
def test_token_budget_batches_score_as_the_reference(bytelevel, budget):
    model, tokenizer = bytelevel
    prompts = _prompts()
    sets = letter_token_ids(tokenizer, 4)
    requests = tokenize(tokenizer, prompts, "auto", 512)
    plan = forward_passes.plan_groups(requests, 2, 512, tokenizer.bos_token_id, batch_tokens=budget)
    batches = [batch for group in plan.groups for batch in group.batches]
    for batch in batches:  # rows x the widest row (its whole context, shared tokens included) within the budget
        assert len(batch) == 1 or len(batch) * max(len(requests[i].ctx) for i in batch) <= budget
    widest = max(len(batch) for batch in batches)
    assert widest > 2 if budget >= 400 else widest <= 2  # the budget, not batch_size=2, sets the rows
    counting = CountingModel(model)
    got = score_prompts(counting, tokenizer, prompts, batch_size=2, batch_tokens=budget, max_length=512,
                        answer_sets=sets)
    assert counting.calls == plan.n_calls
    _assert_close(got, [_ref_score(model, tokenizer, p, "auto", 512, sets) for p in prompts])


def test_bf16_model_scores_with_its_head_in_fp32(bytelevel):
    model, tokenizer = bytelevel
    half = type(model)(model.config).to(torch.bfloat16).eval()
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    assert forward_passes.keeps_logits(half)
    queries = [f"Question: {q}\nA. Lund\nB. Oslo\nC. Paris\nD. Rome\nAnswer:" for q in
               ("Which is north?", "Which river is the oldest one in the town?", "Pick one.")]
    prompts = [MCPrompt(str(n), "", q, (" A", " B", " C", " D"), 0) for n, q in enumerate(queries)]
    # batch_size 1 and no shared prefix: the same [1, L] forward as the reference, so only the head can differ.
    got = score_prompts(half, tokenizer, prompts, batch_size=1, max_length=512)
    head = half.lm_head.weight.float()
    worst_bf16 = 0.0
    for prompt, score, request in zip(prompts, got, tokenize(tokenizer, prompts, "auto", 512)):
        with torch.no_grad():
            hidden = half.model(input_ids=torch.tensor([request.ctx])).last_hidden_state[0, -1]  # bf16
            want = torch.log_softmax((hidden.float() @ head.T).double(), -1)
            rounded = torch.log_softmax((hidden @ half.lm_head.weight.T).double(), -1)  # the bf16 head's logits
        firsts = [c[0] for c in request.conts]
        assert score.logprobs == pytest.approx([float(want[t]) for t in firsts], abs=2e-6)
        worst_bf16 = max(worst_bf16, max(abs(float(rounded[t] - want[t])) for t in firsts))
    assert worst_bf16 > 1e-4  # a bf16 head would be told apart by the 2e-6 above
    assert half.lm_head.forward.__func__ is torch.nn.Linear.forward  # the head is given back as it was


def test_probe_batch_tokens_reaches_the_probes_and_is_checked(tmp_path):
    from forgetray.spec import SpecError, TrialConfig
    from forgetray.train.evaluate import ProbeSuite

    (tmp_path / "probe.jsonl").write_text('{"text": "a passage"}\n')
    resolved = {"benchmarks": {}, "probe_set": {"kind": "local", "path": str(tmp_path / "probe.jsonl")}}
    trial = TrialConfig(probe_batch_tokens=4096)
    options = ProbeSuite.load(resolved, trial).options("cpu", rank=1, world=2)
    assert (options.batch_tokens, options.batch_size, options.shard) == (4096, 32, (1, 2))
    assert TrialConfig().config_hash() == TrialConfig(probe_batch_tokens=0).config_hash() != trial.config_hash()
    with pytest.raises(SpecError, match="probe_batch_tokens"):
        TrialConfig(probe_batch_tokens=-1)


def test_near_ties_and_the_exact_upcast(bytelevel):
    from forgetray.probes import ties

    assert ties.near_ties([(-1.0, -1.05, -3.0), (-1.0, -2.0), (-0.5,), (-2.0, -1.2, -1.25)], 0.1) == [0, 3]
    assert ties.near_ties([(-1.0, -1.5)], 0.5) == []  # a gap of exactly the margin is not a tie
    model, _ = bytelevel
    half = type(model)(model.config).to(torch.bfloat16)
    before = {name: (p.data_ptr(), p.data.clone()) for name, p in half.named_parameters()}
    freq = half.model.rotary_emb.inv_freq
    with ties.full_precision(half):
        assert {p.dtype for p in half.parameters()} | {half.model.rotary_emb.inv_freq.dtype} == {torch.float32}
        assert all(torch.equal(p.data, before[n][1].float()) for n, p in half.named_parameters())
    # The very memory is back (an engine's flat buffer the parameters view stays theirs), with its values.
    assert all(p.data_ptr() == before[n][0] and torch.equal(p.data, before[n][1]) for n, p in half.named_parameters())
    assert half.model.rotary_emb.inv_freq is freq
    next(half.parameters()).ds_id = 0  # what a ZeRO-3 partitioned parameter carries
    with pytest.raises(ValueError, match="ZeRO-3"):
        with ties.full_precision(half):
            pass


def test_bf16_near_ties_get_the_fp32_scores_of_the_same_weights(bytelevel):
    model, tokenizer = bytelevel
    half = type(model)(model.config).to(torch.bfloat16).eval()
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    upcast = copy.deepcopy(half).float()  # the fp32 reference: the same bf16 values (buffers too), in fp32
    prompts = _prompts()
    want = [_ref_score(upcast, tokenizer, p, "auto", 512, None) for p in prompts]
    plain = score_prompts(half, tokenizer, prompts, batch_size=4, max_length=512)
    assert max(abs(a - b) for s, (w, _, _) in zip(plain, want) for a, b in zip(s.logprobs, w)) > 1e-3
    everything = score_prompts(half, tokenizer, prompts, batch_size=4, max_length=512, fp32_ties=1e9)
    _assert_close(everything, want)  # every prompt re-scored: fp32's numbers
    gaps = [sorted(w, reverse=True)[:2] for w, _, _ in want]
    margin = sorted(a - b for a, b in gaps)[len(gaps) // 2]  # half the prompts count as ties
    some = score_prompts(half, tokenizer, prompts, batch_size=4, max_length=512, fp32_ties=margin)
    retried = [i for i, (s, p) in enumerate(zip(some, plain)) if s.logprobs != p.logprobs]
    assert 0 < len(retried) < len(prompts)
    for i in retried:
        assert some[i].logprobs == pytest.approx(want[i][0], abs=1e-4)
    assert [max(range(len(s.logprobs)), key=s.logprobs.__getitem__) for s in some] == \
        [max(range(len(w)), key=w.__getitem__) for w, _, _ in want]
