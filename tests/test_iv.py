"""forgetray.iv on a tiny random Llama: every check against a computation written here (plain hooks, hand values)."""

from __future__ import annotations

import json
import math
import random
import re
from contextlib import nullcontext

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from forgetray.iv import heads as iv_heads
from forgetray.iv.loss import IVLossWeights, iv_guided_loss, kl_t
from forgetray.iv.schedule import degree
from forgetray.iv.tasks import Example, Task, Template, load_task, n_shot_prompts, shuffled_labels, zero_shot_prompts
from forgetray.iv.vector import (answer_probs, causal_indirect_effect, inject_vector, instruction_vector,
                                 mean_head_activations, top_heads)

N_LAYERS, N_HEADS, HEAD_DIM, HIDDEN, VOCAB = 2, 4, 8, 32, 64
LENGTHS = [5, 3, 7]  # unequal, so every padded batch has padding
RANDOM_VECTORS = 20  # random vectors of the instruction vector's norm it is compared with


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=N_LAYERS,
                         num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS, max_position_embeddings=64,
                         attention_bias=True, pad_token_id=0,
                         attn_implementation="sdpa")  # eager leaks NaN from float64 padding rows

    m = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():  # a non-zero o_proj bias, so that bias handling shows
        for layer in m.model.layers:
            layer.self_attn.o_proj.bias.normal_()
    return m


def padded(seqs: list[list[int]], side: str) -> dict[str, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return {"input_ids": ids, "attention_mask": mask}


def seqs(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def last_index(side: str, width: int) -> torch.Tensor:
    """The last real token of each sequence, from the known lengths (not from the mask)."""
    return torch.tensor([width - 1 if side == "left" else n - 1 for n in LENGTHS])


class OProjInputs:
    """The test's own pre-hooks: the full o_proj input of every layer in the last forward."""

    def __init__(self, model):
        self.inputs, self.handles = {}, []
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
                lambda mod, args, i=i: self.inputs.__setitem__(i, args[0].detach().clone())))

    def remove(self):
        for h in self.handles:
            h.remove()


# --- positions and head activations ----------------------------------------------------------------------------------


def test_positions_from_mask_and_labels():
    left, right = padded(seqs(0), "left"), padded(seqs(0), "right")
    assert iv_heads.last_token_positions(left["attention_mask"]).tolist() == [6, 6, 6]
    assert iv_heads.last_token_positions(right["attention_mask"]).tolist() == [4, 2, 6]
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, -100]])
    assert iv_heads.last_prompt_positions(labels).tolist() == [1, 0]
    with pytest.raises(ValueError, match="no answer"):
        iv_heads.last_prompt_positions(torch.full((1, 3), -100))


@pytest.mark.parametrize("side", ["left", "right"])
def test_head_activations_match_a_plain_hook_at_the_last_token(model, side):
    batch = padded(seqs(1), side)
    pos = last_index(side, batch["input_ids"].shape[1])
    spy = OProjInputs(model)
    try:
        with torch.no_grad(), iv_heads.record_heads(model, pos) as record:
            model(**batch)
    finally:
        spy.remove()
    got = record.all()
    assert got.shape == (3, N_LAYERS, N_HEADS, HEAD_DIM)
    for b in range(3):
        for layer in range(N_LAYERS):
            want = spy.inputs[layer][b, pos[b]].view(N_HEADS, HEAD_DIM)
            assert torch.equal(got[b, layer], want)
    if side == "right":  # causal attention: padding after a sequence cannot change it; compare with it alone
        for b, s in enumerate(seqs(1)):
            spy = OProjInputs(model)
            with torch.no_grad():
                model(input_ids=torch.tensor([s]))
            spy.remove()
            alone = torch.stack([spy.inputs[l][0, -1].view(N_HEADS, HEAD_DIM) for l in range(N_LAYERS)])
            torch.testing.assert_close(got[b], alone, rtol=0, atol=1e-10)
    # listed heads, in the listed order
    with torch.no_grad(), iv_heads.record_heads(model, pos, heads=[(1, 2), (0, 3)]) as few:
        model(**batch)
    assert torch.equal(few.stack(), torch.stack([got[:, 1, 2], got[:, 0, 3]], dim=1))


def test_mean_head_activations_over_kept_rows(model):
    batches = [padded(seqs(2), "left"), padded(seqs(3), "right")]
    batches[1]["keep"] = torch.tensor([True, False, True])
    rows = []
    for batch, side in zip(batches, ["left", "right"]):
        pos = last_index(side, batch["input_ids"].shape[1])
        spy = OProjInputs(model)
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        spy.remove()
        keep = batch.get("keep", torch.ones(3, dtype=torch.bool))
        rows += [torch.stack([spy.inputs[l][b, pos[b]].view(N_HEADS, HEAD_DIM) for l in range(N_LAYERS)])
                 for b in range(3) if keep[b]]
    want = torch.stack(rows).mean(dim=0)
    torch.testing.assert_close(mean_head_activations(model, batches), want, rtol=0, atol=1e-12)


# --- causal indirect effect and top heads ----------------------------------------------------------------------------


def test_cie_matches_a_manual_patched_forward_and_top_k_order(model):
    clean = padded(seqs(4), "left")
    mean = mean_head_activations(model, [clean])
    corrupted = padded(seqs(5), "right")
    corrupted["answer_ids"] = torch.tensor([3, 10, 20])
    pos = last_index("right", corrupted["input_ids"].shape[1])
    inputs = {k: corrupted[k] for k in ("input_ids", "attention_mask")}

    def p_answer(logits):
        return torch.stack([torch.softmax(logits[b, pos[b]], -1)[corrupted["answer_ids"][b]] for b in range(3)])

    with torch.no_grad():
        base = p_answer(model(**inputs).logits)
    want = torch.zeros(N_LAYERS, N_HEADS, dtype=torch.float64)
    for layer in range(N_LAYERS):
        for head in range(N_HEADS):
            def replace(mod, args):
                x = args[0].clone()
                for b in range(3):
                    x[b, pos[b], head * HEAD_DIM:(head + 1) * HEAD_DIM] = mean[layer, head]
                return (x,)
            handle = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(replace)
            with torch.no_grad():
                want[layer, head] = (p_answer(model(**inputs).logits) - base).mean()
            handle.remove()
    got = causal_indirect_effect(model, [corrupted], mean)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert want.abs().max() > 0  # the patch did something

    ranked = sorted(((float(want[l, h]), l, h) for l in range(N_LAYERS) for h in range(N_HEADS)), reverse=True)
    top = top_heads(got, k=3)
    assert [(l, h) for l, h, _ in top] == [(l, h) for _, l, h in ranked[:3]]
    tied = top_heads(torch.tensor([[0.1, 0.3], [0.3, 0.0]]), k=2)
    assert [(l, h) for l, h, _ in tied] == [(0, 1), (1, 0)]  # ties keep (layer, head) order


# --- the vector and its injection ------------------------------------------------------------------------------


def test_vector_is_the_sum_of_head_contributions_without_the_bias(model):
    mean = torch.randn(N_LAYERS, N_HEADS, HEAD_DIM, dtype=torch.float64)
    chosen = [(1, 2, 0.5), (0, 0, 0.4), (0, 3, 0.1)]
    want = torch.zeros(HIDDEN, dtype=torch.float64)
    for layer, head, _ in chosen:
        weight = model.model.layers[layer].self_attn.o_proj.weight
        want += weight[:, head * HEAD_DIM:(head + 1) * HEAD_DIM] @ mean[layer, head]
    torch.testing.assert_close(instruction_vector(model, mean, chosen), want, rtol=0, atol=1e-12)
    assert model.model.layers[1].self_attn.o_proj.bias.abs().sum() > 0  # so leaving it out is a real choice


class LayerOutputs:
    def __init__(self, model):
        self.outputs, self.handles = {}, []
        for i, layer in enumerate(model.model.layers):
            def keep(mod, args, out, i=i):
                self.outputs[i] = (out[0] if isinstance(out, tuple) else out).detach().clone()
            self.handles.append(layer.register_forward_hook(keep))

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("layer", [0, 1])
def test_injection_moves_layer_L_by_degree_times_vector_at_the_last_prompt_token_only(model, side, layer):
    batch = padded(seqs(6), side)
    width = batch["input_ids"].shape[1]
    pos = last_index(side, width)
    vector = torch.randn(HIDDEN, dtype=torch.float64)
    clean = LayerOutputs(model)
    with torch.no_grad():
        clean_logits = model(**batch).logits
    clean.remove()
    with inject_vector(model, vector, layer, iv_heads.last_token_positions(batch["attention_mask"]), degree=0.7):
        injected = LayerOutputs(model)  # registered after the injection hook: sees its result
        with torch.no_grad():
            model(**batch)
        injected.remove()
    for before in range(layer):
        assert torch.equal(injected.outputs[before], clean.outputs[before])
    want = torch.zeros(3, width, HIDDEN, dtype=torch.float64)
    for b in range(3):
        want[b, pos[b]] = 0.7 * vector
    torch.testing.assert_close(injected.outputs[layer] - clean.outputs[layer], want, rtol=0, atol=1e-12)
    with torch.no_grad():  # the hook is gone after the block
        assert torch.equal(model(**batch).logits, clean_logits)


def test_injection_at_the_attention_output(model):
    batch = padded(seqs(7), "left")  # left padding: the last prompt token is the last column
    pos = iv_heads.last_token_positions(batch["attention_mask"])
    vector = torch.randn(HIDDEN, dtype=torch.float64)
    o_proj = model.model.layers[1].self_attn.o_proj

    def attention_output(inject: bool) -> torch.Tensor:
        outs = []
        with torch.no_grad(), (inject_vector(model, vector, 1, pos, site="attn") if inject else nullcontext()):
            handle = o_proj.register_forward_hook(lambda mod, args, out: outs.append(out.detach().clone()))
            model(**batch)
            handle.remove()
        return outs[0]

    diff = attention_output(True) - attention_output(False)
    torch.testing.assert_close(diff[:, -1], vector.expand(3, HIDDEN), rtol=0, atol=1e-12)
    assert diff[:, :-1].abs().max() == 0


def test_pipeline_vector_raises_the_answer_probability_more_than_random_vectors(model):
    """mean -> CIE -> top heads -> vector -> injected forward. A task random weights can carry: the clean prompts are
    one token repeated, and the answer is what the model predicts after them; the corrupted prompts are random. The
    vector of the top layer-0 heads, added where they write (layer 0's attention output), raises P(answer) on the
    corrupted prompts, and by more than random vectors of its norm (seeded) do: the heads the CIE picks carry the
    clean context, not just any push. (Measured over 5 repeated tokens x 2 corrupted sets: the vector always raises
    P(answer) and beats 94-100% of 50 random vectors. With random clean prompts and answers, as this test had before,
    it does not: random weights carry no such task, and 7-93% of random vectors did better.)"""
    clean, corrupted = padded([[5] * n for n in LENGTHS], "left"), padded(seqs(9), "left")
    with torch.no_grad():
        answer = int(model(**clean).logits[0, -1].argmax())
    corrupted["answer_ids"] = torch.tensor([answer] * len(LENGTHS))
    mean = mean_head_activations(model, [clean])
    top = top_heads(causal_indirect_effect(model, [corrupted], mean, layers=[0]), k=2)
    assert all(layer == 0 for layer, _, _ in top)
    vector = instruction_vector(model, mean, top)
    pos = iv_heads.last_token_positions(corrupted["attention_mask"])
    inputs = {k: corrupted[k] for k in ("input_ids", "attention_mask")}

    def gains(v: torch.Tensor) -> torch.Tensor:
        """The rise of P(answer) on each corrupted prompt with v added at layer 0's attention output."""
        with torch.no_grad():
            before = answer_probs(model(**inputs).logits, pos, corrupted["answer_ids"])
            with inject_vector(model, v, 0, pos, site="attn"):
                after = answer_probs(model(**inputs).logits, pos, corrupted["answer_ids"])
        return after - before

    own = gains(vector)
    assert (own > 0).all(), own  # on every prompt
    g = torch.Generator().manual_seed(0)
    random_gains = []
    for _ in range(RANDOM_VECTORS):
        direction = torch.randn(HIDDEN, generator=g, dtype=torch.float64)
        random_gains.append(float(gains(direction * (vector.norm() / direction.norm())).mean()))
    beaten = sum(float(own.mean()) > r for r in random_gains)
    assert beaten >= 0.9 * RANDOM_VECTORS, (float(own.mean()), sorted(random_gains))


def test_unsupported_architecture_is_named():
    class Gpt2Like(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="Gpt2Like is not a supported architecture"):
        iv_heads.head_layout(Gpt2Like())


# --- loss and schedule -----------------------------------------------------------------------------------------------


def softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def kl_by_hand(model_rows, ref_rows, t):
    """sum over rows of KL(p_model || p_ref), divided by the number of rows."""
    total = 0.0
    for m, r in zip(model_rows, ref_rows):
        p, q = softmax(m, t), softmax(r, t)
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total / len(model_rows)


MODEL = [[0.0, 1.0, 3.0], [2.0, 0.0, -1.0]]
REF = [[1.0, 0.5, 0.0], [0.0, 0.0, 2.0]]


def test_kl_t_direction_and_temperature_by_hand():
    got = kl_t(torch.tensor(MODEL), torch.tensor(REF), temperature=2.0)
    assert got.item() == pytest.approx(kl_by_hand(MODEL, REF, 2.0), rel=1e-5)
    assert got.item() != pytest.approx(kl_by_hand(REF, MODEL, 2.0), rel=1e-2)  # the other direction differs
    assert got.item() != pytest.approx(4 * kl_by_hand(MODEL, REF, 2.0), rel=1e-2)  # no T^2 factor
    assert kl_t(torch.tensor(MODEL), torch.tensor(REF), 1.0).item() == pytest.approx(kl_by_hand(MODEL, REF, 1.0),
                                                                                   rel=1e-5)


def test_iv_guided_loss_terms_thresholds_and_weights():
    # (B=2, S=2, V=3): position 0 is the last prompt token of row 0, position 1 of row 1
    logits = torch.tensor([[MODEL[0], MODEL[1]], [MODEL[1], MODEL[0]]], requires_grad=True)
    ref = torch.tensor([[REF[0], REF[1]], [REF[0], REF[1]]])
    pos = torch.tensor([0, 1])
    ce = torch.tensor(1.5)
    first = kl_by_hand([MODEL[0], MODEL[0]], [REF[0], REF[1]], 2.0)
    every = kl_by_hand([MODEL[0], MODEL[1], MODEL[1], MODEL[0]], [REF[0], REF[1], REF[0], REF[1]], 2.0) * 2
    assert first > 0.1 and every > 0.1  # both count at the default threshold
    heads = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, -1.0], [0.0, 0.1]]])  # (B=2, k=2, D=2)
    ref_heads = torch.zeros(2, 2, 2)
    mse0, mse1 = (1 + 1 + 1 + 1) / 4, (0 + 0 + 0 + 0.01) / 4  # head 1: 0.0025, below thr_mse = 0.01
    out = iv_guided_loss(ce, logits, ref, pos, heads=heads, ref_heads=ref_heads)
    assert out["kl_first"].item() == pytest.approx(first, rel=1e-5)
    assert out["kl_all"].item() == pytest.approx(every, rel=1e-5)  # summed over positions, / batch size
    assert out["mse"].item() == pytest.approx(mse0 + mse1)
    assert out["mse_term"].item() == pytest.approx(1.0 * mse0)  # per head, x * [x > thr], not x - thr
    want = 1.5 + 20 * first + 0.1 * every + mse0
    assert out["loss"].item() == pytest.approx(want, rel=1e-5)

    high = IVLossWeights(thr=first + 0.01, w_mse=0.0)  # kl_first just below its threshold: no value, no gradient
    out = iv_guided_loss(ce, logits, ref, pos, weights=high)
    assert out["kl_first_term"].item() == 0.0 and out["mse_term"].item() == 0.0
    assert out["kl_all_term"].item() == pytest.approx(0.1 * every, rel=1e-5)  # counted whole, not every - thr
    out["kl_first_term"].backward()
    assert logits.grad is None or logits.grad.abs().max() == 0
    with pytest.raises(ValueError, match="needs heads"):
        iv_guided_loss(ce, logits, ref, pos)


def test_progressive_degree():
    assert degree(0, 100) == 1.0 and degree(24, 100) == 1.0
    assert degree(25, 100) == 1.0  # the first tenth of the window keeps 1.0
    assert degree(29, 100) == 1.0 and degree(30, 100) == 0.9
    assert degree(50, 100) == 0.5 and degree(74, 100) == 0.1
    assert degree(75, 100) == 0.0 and degree(100, 100) == 0.0 and degree(150, 100) == 0.0
    assert [degree(s, 10, start=0.0, end=1.0, levels=2) for s in (0, 4, 5, 9, 10)] == [1.0, 1.0, 0.5, 0.5, 0.0]
    assert degree(3, 10, start=0.5, end=0.5) == 1.0 and degree(5, 10, start=0.5, end=0.5) == 0.0
    with pytest.raises(ValueError):
        degree(1, 10, start=0.8, end=0.2)


# --- tasks ------------------------------------------------------------------------------------------------------------

TASK = Task("capitals", tuple(Example(f"c{i}", f"city{i}") for i in range(8)), instruction="Name the capital.",
            template=Template(n_shot=2))


def test_prompts_format():
    assert zero_shot_prompts(TASK)[0].text == "Name the capital.\n\nQ: c0\nA:"
    assert zero_shot_prompts(TASK, instruction=False)[0].full == "Q: c0\nA: city0"
    prompt = n_shot_prompts(TASK, count=1, seed=3)[0]
    blocks = prompt.text.split("\n\n")
    assert blocks[0] == "Name the capital." and len(blocks) == 4 and blocks[-1].endswith("\nA:")
    for block in blocks[1:3]:  # each demonstration keeps its own label
        q, a = block.split("\nA: ")
        assert a == "city" + q.removeprefix("Q: c")
    query = blocks[-1].removeprefix("Q: ").removesuffix("\nA:")
    assert prompt.answer == " city" + query.removeprefix("c")


def test_corruptions_shuffle_labels_and_remove_the_instruction():
    clean = n_shot_prompts(TASK, count=6, seed=1, n_shot=4)
    shuffled = n_shot_prompts(TASK, count=6, seed=1, n_shot=4, corruption="shuffle_labels")
    bare = n_shot_prompts(TASK, count=6, seed=1, n_shot=4, corruption="no_instruction")
    assert shuffled == n_shot_prompts(TASK, count=6, seed=1, n_shot=4, corruption="shuffle_labels")  # seeded
    assert shuffled != n_shot_prompts(TASK, count=6, seed=2, n_shot=4, corruption="shuffle_labels")
    for c, s, b in zip(clean, shuffled, bare):
        assert c.answer == s.answer == b.answer  # same query, its true answer
        assert b.text == c.text.removeprefix("Name the capital.\n\n")
        c_blocks, s_blocks = c.text.split("\n\n")[1:-1], s.text.split("\n\n")[1:-1]
        assert [x.split("\n")[0] for x in c_blocks] == [x.split("\n")[0] for x in s_blocks]  # same inputs
        assert sorted(x.split("A: ")[1] for x in c_blocks) == sorted(x.split("A: ")[1] for x in s_blocks)
        for block in s_blocks:  # no demonstration keeps its own label
            q, a = block.split("\nA: ")
            assert a != "city" + q.removeprefix("Q: c")
    twins = [Example("a", "x"), Example("b", "x"), Example("c", "y")]  # no text derangement exists: index one
    out = shuffled_labels(twins, random.Random(0))
    assert sorted(e.output for e in out) == ["x", "x", "y"] and out[2].output != "y"
    with pytest.raises(ValueError, match="no instruction"):
        n_shot_prompts(Task("t", TASK.examples), count=1, seed=0, corruption="no_instruction")


def test_no_demonstrations_corruption_keeps_the_query_and_the_instruction():
    clean = n_shot_prompts(TASK, count=6, seed=1, n_shot=4)
    alone = n_shot_prompts(TASK, count=6, seed=1, n_shot=4, corruption="no_demonstrations")
    for c, z in zip(clean, alone):
        assert z.answer == c.answer
        assert z.text == "Name the capital.\n\n" + c.text.split("\n\n")[-1]  # instruction + the same query
    with pytest.raises(ValueError, match="corruption must be one of"):
        n_shot_prompts(TASK, count=1, seed=0, corruption="typo")


def test_load_task_and_its_errors(tmp_path):
    path = tmp_path / "antonyms.jsonl"
    path.write_text(json.dumps({"instruction": "Give the opposite.", "n_shot": 3}) + "\n\n"
                    + "\n".join(json.dumps({"input": a, "output": b}) for a, b in [("hot", "cold"), ("up", "down")]))
    task = load_task(path)
    assert task.name == "antonyms" and task.instruction == "Give the opposite." and task.template.n_shot == 3
    assert task.examples == (Example("hot", "cold"), Example("up", "down"))
    bad = {
        '{"input": "a", "output": "b"}\n{"input": "a"\n': ":2: invalid JSON",
        '{"input": "a", "output": "b"}\n\n{"input": "a"}\n': ":3: missing output",
        '{"input": "a", "output": 3}\n': ":1: input and output must be strings",
        '[1, 2]\n': ":1: expected a JSON object",
        '{"input": "a", "output": "b"}\n{"instruction": "x"}\n': ":2: a header line",
        '{"instruction": "x", "shots": 2}\n': ":1: unknown header keys",
        '{"instruction": "x"}\n': ": no examples",
    }
    for i, (text, message) in enumerate(bad.items()):
        p = tmp_path / f"bad{i}.jsonl"
        p.write_text(text)
        with pytest.raises(ValueError, match="^" + re.escape(f"{p}{message}")):
            load_task(p)
