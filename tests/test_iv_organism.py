"""The organism carries an instruction vector (issue 12's sanity check, before any question about its forgetting).

On organism-icl, the base model that also read the demonstration pages, forgetray's extraction (clean 5-shot prompts,
causal indirect effects on the same queries without their demonstrations, the top heads) gives each attribute task a
vector that, added after layer 1 at the last token of a zero-shot prompt, restores the task better than random vectors
of the same norm (by 0.15-0.6 here: README, "The model organism"). The extraction uses the IV settings of
`sweeps/iv_guided_organism.py` (layer 1, top 6 heads, 100 clean and 25 corrupted prompts, `no_demonstrations`), the
sweep whose questions this check comes before. The accuracies are counted here one prompt at a time with this test's
own hook, apart from the batched code the probe uses. The shipped weights make this the same model on every machine.
"""

from __future__ import annotations

import pytest
import torch

from forgetray import organism
from forgetray.iv import builtin, n_shot_prompts
from forgetray.train import iv_guided

LAYER, HEADS = 1, 6  # what sweeps/iv_guided_organism.py uses (iv_layer, iv_heads; iv_probe_layer, iv_probe_heads)


class Extraction:  # the settings `iv_guided.extract` reads (as the trial's iv_prompts, iv_corrupted, ...)
    prompts, corrupted, heads, corruption = 100, 25, HEADS, "no_demonstrations"


@pytest.fixture(scope="module")
def icl(default_organism):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = organism.model_path(organism.ICL_MODEL, default_organism)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), default_organism


def _accuracy(model, tokenizer, prompts, vector=None) -> float:
    """Greedy first answer token, one unpadded prompt at a time after BOS (as every organism document began in
    pre-training, and as trials read organism models: `bos="always"`); `vector` added to decoder layer LAYER's output at
    the last token by this test's own hook."""
    def add(_module, _args, out):
        hidden = (out[0] if isinstance(out, tuple) else out).clone()
        hidden[0, -1] += vector
        return (hidden,) + tuple(out[1:]) if isinstance(out, tuple) else hidden

    handle = model.model.layers[LAYER].register_forward_hook(add) if vector is not None else None
    right = 0
    try:
        for prompt in prompts:
            ids = tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
            whole = tokenizer(prompt.text + prompt.answer, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([[tokenizer.bos_token_id] + ids])).logits[0, -1]
            assert whole[:len(ids)] == ids  # the prompt's tokens are a prefix: the next one is the answer's first
            right += int(logits.argmax()) == whole[len(ids)]
    finally:
        if handle is not None:
            handle.remove()
    return right / len(prompts)


@pytest.mark.parametrize("name", builtin.ATTRIBUTE_TASKS)
def test_the_top_heads_vector_restores_the_task_on_zero_shot_prompts_and_a_random_one_does_not(icl, name):
    model, tokenizer, root = icl
    task = builtin.builtin_task(name, root)
    # The base does the task in context, and a zero-shot prompt ("Q: <name>\nA:") does not say which attribute.
    assert _accuracy(model, tokenizer, n_shot_prompts(task, 40, seed=7)) >= 0.95
    zero_shot = n_shot_prompts(task, len(task.examples), seed=0, n_shot=0)
    plain = _accuracy(model, tokenizer, zero_shot)
    assert plain <= 0.45

    found = iv_guided.extract(model, tokenizer, task, Extraction, "always", 256, 32, seed=0, device="cpu")
    assert found["scores"][0] > 0.2  # a head that alone restores a fifth of the answer's probability
    vector = found["vector"]
    generator = torch.Generator().manual_seed(0)
    randoms = []
    for _ in range(5):
        direction = torch.randn(vector.shape, generator=generator)
        randoms.append(_accuracy(model, tokenizer, zero_shot, direction * (vector.norm() / direction.norm())))
    injected = _accuracy(model, tokenizer, zero_shot, vector)
    assert injected >= max(randoms) + 0.1 and injected >= 2 * plain, (name, plain, injected, randoms)


def test_the_quickstart_sizes_have_no_such_task(icl):
    """organism-tiny and organism-small never read the pages: given 5 demonstrations of an attribute, they do not
    answer with it (the task is organism-icl's alone; the quickstart's models and results are unchanged)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, root = icl
    task = builtin.builtin_task("organism-colour", root)
    prompts = n_shot_prompts(task, 40, seed=7)
    for size in organism.MODEL_SIZES:
        path = organism.model_path(size, root)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        assert _accuracy(model, AutoTokenizer.from_pretrained(path), prompts) < 0.5, size
