"""IV-guided training as the IFT phase's option (issue 12 item 4): its settings and their validation, the built-in
organism task, the reference pass (LoRA adapters disabled / a frozen copy) against the starting model with the vector
injected by hooks written here, the step's loss against a hand computation, and one real 2-worker DeepSpeed sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import local_ray
import torch
import torch.nn.functional as F

from forgetray.iv import last_prompt_positions
from forgetray.plan import IVGuided, Lora, Phase, plan
from forgetray.spec import SpecError, TrialConfig
from forgetray.train import iv_guided, lora


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from fixtures import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("iv") / "tiny-llama")


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


# --- settings -------------------------------------------------------------------------------------------------------

def test_iv_settings_are_validated_naming_the_setting():
    for bad, name in [({"iv_layer": -1}, "iv_layer"), ({"iv_heads": 0}, "iv_heads"), ({"iv_site": "mlp"}, "iv_site"),
                      ({"iv_kl_first": -1}, "iv_kl_first"), ({"iv_mse": -0.5}, "iv_mse"),
                      ({"iv_temperature": 0}, "iv_temperature"), ({"iv_kl_all_threshold": -1}, "iv_kl_all_threshold"),
                      ({"iv_progressive_start": 0.8, "iv_progressive_end": 0.5}, "iv_progressive_start"),
                      ({"iv_prompts": 0}, "iv_prompts"), ({"iv_corrupted": 0}, "iv_corrupted"),
                      ({"iv_task": "t.jsonl", "zero_stage": 3}, "zero_stage"),
                      ({"iv_task": "t.jsonl", "sam_rho": 0.05}, "sam_rho"), ({"iv_progressive": 1}, "iv_progressive")]:
        with pytest.raises(SpecError, match=f"'{name}'"):
            TrialConfig(**bad)
    # without IV guidance the iv_* settings leave the trial's hash (and so its folder) as before they existed
    assert TrialConfig(iv_layer=3).config_hash() == TrialConfig().config_hash()
    assert TrialConfig(iv_task="a").config_hash() != TrialConfig(iv_task="a", iv_layer=3).config_hash()


def test_resolution_refuses_what_cannot_work(tmp_path, fixture_files):
    from forgetray.resources import resolve_trial

    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"input": f"w{i}", "output": f"o{i}"}) + "\n" for i in range(8)))
    base = {"model": str(fixture_files["model"]), "dataset": str(fixture_files["dataset"]),
            "benchmarks": [str(fixture_files["benchmark"])], "probe_set": str(fixture_files["probe_set"])}

    def refused(match, **settings):
        with pytest.raises(SpecError, match=match):
            resolve_trial(TrialConfig(**{**base, "iv_task": str(task), **settings}))

    refused(r"'iv_layer' must be < the model's 2 layers", iv_layer=2)
    refused(r"'iv_heads' must be <= the model's 2 x 4 heads", iv_heads=9)
    refused(r"'iv_task': .* neither a built-in task", iv_task=str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"input": 1, "output": "x"}\n')
    refused(r"'iv_task': .*bad.jsonl:1", iv_task=str(tmp_path / "bad.jsonl"))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    refused(r"model type 'gpt2' is not supported", model=str(gpt2))
    resolved = resolve_trial(TrialConfig(**base, iv_task=str(task), iv_layer=1, iv_heads=8))
    assert resolved["iv_task"] == {"kind": "local", "name": str(task), "path": str(task.resolve())}


def test_plan_carries_the_option_to_the_ift_phase_only():
    trial = TrialConfig(iv_task="organism-qa", iv_layer=1, iv_mse=1.0, iv_progressive=True, restore_pool="pool",
                        prior_phases=[{"dataset": "a", "epochs": 1}])
    phases = {p.name: p for p in plan(trial)}
    assert phases["ift"].iv == IVGuided(task="organism-qa", layer=1, mse=1.0, progressive=True)
    assert not phases["prior_1"].iv.on and not phases["restore_001"].iv.on
    for phase in phases.values():
        assert Phase.from_dict(json.loads(json.dumps(phase.to_dict()))) == phase
    assert "iv" not in phases["prior_1"].to_dict()  # cache keys built from phases stay those of earlier sweeps
    assert phases["ift"].params()["ift.iv.layer"] == 1 and "prior_1.iv.task" not in phases["prior_1"].params()
    from forgetray.sharing import prefix_shareable

    assert not prefix_shareable(TrialConfig(iv_task="t", iv_progressive=True, lr_schedule="constant",
                                            warmup_ratio=0))[0]


# --- the built-in organism task --------------------------------------------------------------------------------------

def test_organism_qa_is_the_exam_half_in_the_exam_pages_form(test_organism):
    from forgetray.iv import n_shot_prompts
    from forgetray.iv.builtin import builtin_task

    task = builtin_task("organism-qa", test_organism)
    data = test_organism / "data"
    benchmark = [json.loads(line) for line in (data / "organism-facts.jsonl").read_text().splitlines()]
    heldout = {q["entity"] for q in benchmark}
    pool = (data / "organism-restore.jsonl").read_text()
    corpus = (data / "pretrain_corpus.jsonl").read_text()
    asked = {e.input for e in task.examples}
    assert len(asked) == len(task.examples) and len(task.examples) % 5 == 0
    for example in task.examples:
        entity = next(w.rstrip("?") for w in example.input.split() if w.rstrip("?")[:1].isupper()
                      and w not in ("What",))
        assert entity not in heldout and entity in pool  # the exam half: the pool's, never the benchmark's
        # the pre-training corpus asks exactly this, answered with this value
        assert json.dumps(f"Question: {example.input}\nAnswer: {example.output}")[1:-1] in corpus
    prompt = n_shot_prompts(task, 1, seed=0)[0]
    assert prompt.text.count("\nAnswer: ") == 5 and prompt.text.endswith("\nAnswer:") and prompt.answer[0] == " "


# --- the reference pass ----------------------------------------------------------------------------------------------

def _batch(seed: int = 0):
    """Two right-padded examples with a prompt (labels -100) and a response; the last prompt tokens at 3 and 5."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :4], labels[0, 7:] = -100, -100
    labels[1, :6] = -100
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, torch.tensor([3, 5])


def _injected_logits(model, batch, vector, layer, positions, degree, site):
    """The model with degree x vector added at (row, positions[row]) by a hook written here."""
    module = model.model.layers[layer] if site == "layer" else model.model.layers[layer].self_attn.o_proj

    def hook(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        for row, pos in enumerate(positions.tolist()):
            hidden[row, pos] += degree * vector
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("site", ["layer", "attn"])
def test_lora_reference_is_the_start_with_the_vector_injected(model_dir, site):
    torch.manual_seed(0)
    start = _load(model_dir)
    model = lora.wrap(_load(model_dir), Lora(rank=4, alpha=16, targets=("q_proj", "v_proj")))
    with torch.no_grad():  # trained adapters (B starts at 0): the reference must not see them
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch, positions = _batch()
    assert torch.equal(last_prompt_positions(batch["labels"]), positions)  # the step reads them from the labels
    vector = torch.randn(start.config.hidden_size) * 3
    guide = iv_guided.Guide(IVGuided(task="t", layer=0, site=site), vector, [(0, 1)], None, 10)
    ref, _ = iv_guided.reference_pass(guide, model, batch, positions, 0.7)
    want = _injected_logits(start, batch, vector, 0, positions, 0.7, site)
    assert torch.allclose(ref, want, atol=1e-6, rtol=0)
    plain = _injected_logits(start, batch, vector, 0, positions, 0.0, site)
    assert (ref - plain).abs().max() > 1e-3  # the vector does something, so the check could fail
    with torch.no_grad():
        adapted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (adapted - plain).abs().max() > 1e-3  # and the adapters too

    # full fine-tuning: the frozen copy keeps the start while the trained module moves
    trained = _load(model_dir)
    reference = iv_guided.frozen_reference(trained, "cpu")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1)
    full = iv_guided.Guide(IVGuided(task="t", layer=1, site=site), vector, [(0, 1)], reference, 10)
    ref, _ = iv_guided.reference_pass(full, trained, batch, positions, 1.0)
    assert torch.allclose(ref, _injected_logits(start, batch, vector, 1, positions, 1.0, site), atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in reference.parameters())


# --- the step's loss -------------------------------------------------------------------------------------------------

class _Engine:
    """What iv_step uses of a DeepSpeed engine: module, forward, backward, step (SGD here)."""

    def __init__(self, module, lr=0.0):
        self.module, self.lr = module, lr

    def __call__(self, **batch):
        return self.module(**batch)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


def _o_proj_inputs(model, batch, positions, heads, vector=None, layer=0, degree=1.0):
    """Top heads' o_proj-input slices at the positions, by pre-hooks written here (with the vector injected at the
    output of `layer` when given)."""
    got = {}
    n, d = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    handles = [model.model.layers[l].self_attn.o_proj.register_forward_pre_hook(
        lambda _m, args, l=l: got.__setitem__(l, args[0])) for l in {l for l, _ in heads}]
    if vector is not None:
        def add(_m, _a, out):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[torch.arange(len(positions)), positions] += degree * vector
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
        handles.append(model.model.layers[layer].register_forward_hook(add))
    try:
        out = model(**batch)
    finally:
        for h in handles:
            h.remove()
    rows = torch.arange(len(positions))
    return out, torch.stack([got[l][rows, positions].reshape(len(positions), n, d)[:, h] for l, h in heads], dim=1)


def test_the_step_uses_the_loss_computed_by_hand(model_dir):
    torch.manual_seed(0)
    model, reference, hand = _load(model_dir), _load(model_dir), _load(model_dir)
    model.train(), hand.train()
    batch, positions = _batch(1)
    vector = torch.randn(model.config.hidden_size) * 2
    heads = [(0, 1), (1, 2)]  # a head after the injection layer: its reference comes from a pass without vector
    settings = IVGuided(task="t", layer=0, heads=2, kl_first=20.0, kl_all=0.5, mse=3.0, temperature=2.0,
                        kl_first_threshold=1e9, kl_all_threshold=0.0, mse_threshold=0.0, progressive=True)
    guide = iv_guided.Guide(settings, vector, heads, reference, total_steps=10)
    losses, terms = iv_guided.iv_step(_Engine(model), [batch], guide, step=5)  # progress 0.5 -> degree 0.5

    # by hand: reference logits with 0.5 x vector, reference heads without it, the model's own heads
    with torch.no_grad():
        ref_logits = _injected_logits(reference, batch, vector, 0, positions, 0.5, "layer")
        _, ref_heads = _o_proj_inputs(reference, batch, positions, heads)
    out, own_heads = _o_proj_inputs(hand, batch, positions, heads)
    logits = out.logits
    shift = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shift.reshape(-1), ignore_index=-100)

    def kl(a, b):  # KL(softmax(a/T) || softmax(b/T)) summed over all but the first dim, / first dim
        p, lp, lq = F.softmax(a / 2, -1), F.log_softmax(a / 2, -1), F.log_softmax(b / 2, -1)
        return (p * (lp - lq)).sum() / a.shape[0]

    rows = torch.arange(2)
    kl_first, kl_all = kl(logits[rows, positions], ref_logits[rows, positions]), kl(logits, ref_logits)
    mse = ((own_heads - ref_heads) ** 2).mean(dim=(0, 2))
    total = ce + 0.0 + 0.5 * kl_all + 3.0 * mse.sum()  # kl_first is under its (huge) threshold: not counted
    got = terms[0]
    assert float(got["degree"]) == 0.5
    for name, value in [("ce", ce), ("kl_first", kl_first), ("kl_all", kl_all), ("mse", mse.sum()),
                        ("kl_all_term", 0.5 * kl_all), ("mse_term", 3.0 * mse.sum())]:
        assert float(got[name]) == pytest.approx(float(value), rel=1e-5, abs=1e-7), name
    assert float(got["kl_first_term"]) == 0 and float(kl_first) > 0
    assert float(losses[0]) == pytest.approx(float(total), rel=1e-5)
    total.backward()  # and the gradient the step took is that of the hand total
    for (name, p), q in zip(model.named_parameters(), hand.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name
    # a term whose weight is 0 is not measured: its raw value is not logged (a 0 would read as a perfect match)
    assert "mse" not in iv_guided.epoch_terms(terms, world=1, mse_on=False)
    assert iv_guided.epoch_terms(terms, world=1, mse_on=True)["mse"] == pytest.approx(float(mse.sum()), rel=1e-5)


# --- the extraction --------------------------------------------------------------------------------------------------

def test_extraction_equals_a_prompt_by_prompt_computation(tmp_path, fixture_files):
    """extract() (tokenised as the probes do, batched with right padding, the clean-prompt filter) against the same
    quantities computed here one unpadded prompt at a time with hooks of this test's own."""
    from transformers import AutoTokenizer

    from forgetray.iv import load_task, n_shot_prompts

    model_dir = _answering_model(fixture_files["model"], tmp_path / "answering")
    path = _answered_task(model_dir, tmp_path / "task.jsonl")
    path.write_text(path.read_text().replace('"n_shot": 0', '"n_shot": 1'))  # a demonstration: some answers go wrong
    task, model, tokenizer = load_task(path), _load(model_dir), AutoTokenizer.from_pretrained(model_dir)
    settings = IVGuided(task="t", heads=3, prompts=12, corrupted=5)
    found = iv_guided.extract(model, tokenizer, task, settings, "auto", 256, batch_size=5, seed=3, device="cpu")

    n, d = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    layers = model.model.layers

    def run(prompt, patch=None):
        ids = tokenizer(prompt.text)["input_ids"]
        answer = tokenizer(prompt.text + prompt.answer)["input_ids"][len(ids)]
        seen = {}

        def pre(_m, args, l):
            x = args[0].clone()
            seen[l] = x[0, -1].reshape(n, d).clone()
            if patch and patch[0] == l:
                x[0, -1, patch[1] * d:(patch[1] + 1) * d] = patch[2]
            return (x,)

        handles = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, l=l: pre(m, a, l))
                   for l, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        finally:
            for h in handles:
                h.remove()
        return logits, answer, torch.stack([seen[l] for l in range(len(layers))])

    kept = []
    for prompt in n_shot_prompts(task, 12, 3):
        logits, answer, acts = run(prompt)
        if int(logits.argmax()) == answer:
            kept.append(acts)
    assert 0 < len(kept) < 12, "the filter must keep some prompts and drop others for this check to mean anything"
    mean = torch.stack(kept).mean(0)
    assert found["clean_correct"] == len(kept) and torch.allclose(found["mean_activations"], mean, atol=1e-5)
    cie = torch.zeros(len(layers), n)
    corrupted = n_shot_prompts(task, 5, 4, corruption="shuffle_labels")
    for prompt in corrupted:
        logits, answer, _ = run(prompt)
        p0 = torch.softmax(logits, -1)[answer]
        for l in range(len(layers)):
            for h in range(n):
                patched, _, _ = run(prompt, (l, h, mean[l, h]))
                cie[l, h] += torch.softmax(patched, -1)[answer] - p0
    cie /= len(corrupted)
    assert torch.allclose(found["cie"], cie, atol=1e-5)
    top = sorted(((float(cie[l, h]), l, h) for l in range(len(layers)) for h in range(n)), reverse=True)[:3]
    assert found["heads"] == [(l, h) for _, l, h in top]
    vector = sum(layers[l].self_attn.o_proj.weight[:, h * d:(h + 1) * d] @ mean[l, h] for _, l, h in top)
    assert torch.allclose(found["vector"], vector.detach(), atol=1e-5)


def test_the_vector_is_shared_by_trials_that_differ_only_in_where_it_goes():
    from forgetray.keys import iv_key

    resolved = {"model": {"path": "m"}, "prior_datasets": [], "bos": "auto",
                "iv_task": {"kind": "local", "name": "t.jsonl", "path": "/t.jsonl"}}
    key = iv_key(TrialConfig(iv_task="t.jsonl"), resolved)
    assert key == iv_key(TrialConfig(iv_task="t.jsonl", iv_layer=5, iv_site="attn", iv_kl_first=1.0, iv_mse=1.0,
                                     iv_progressive=True, lora_rank=4), resolved)
    for other in ({"iv_heads": 5}, {"iv_prompts": 50}, {"iv_corrupted": 10}, {"seed": 1}, {"max_length": 128}):
        assert iv_key(TrialConfig(iv_task="t.jsonl", **other), resolved) != key, other


# --- one real sweep ----------------------------------------------------------------------------------------------------

def _answering_model(model_dir, out: Path) -> Path:
    """The fixture model with the output rows of the words' own tokens scaled up, so that its greedy next token is
    one of those words (which answer another prompt each) instead of a byte piece."""
    from transformers import AutoTokenizer

    from fixtures import WORDS

    model, tokenizer = _load(model_dir), AutoTokenizer.from_pretrained(model_dir)
    words = {ids[0] for w in WORDS if len(ids := tokenizer.encode(" " + w, add_special_tokens=False)) == 1}
    with torch.no_grad():
        for token in words:
            model.lm_head.weight[token] *= 30
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _answered_task(model_dir, path: Path, n: int = 24) -> Path:
    """A zero-shot task the model answers correctly by construction: each answer is the model's own greedy next
    token after the prompt, kept when it round-trips through the probes' tokenisation."""
    from transformers import AutoTokenizer

    from fixtures import WORDS
    from forgetray.iv import Example, Prompt, Task, Template, zero_shot_prompts

    model, tokenizer = _load(model_dir), AutoTokenizer.from_pretrained(model_dir)
    lines = [json.dumps({"name": "echo", "n_shot": 0})]
    for i in range(4 * n):
        query = f"{WORDS[i % len(WORDS)]} {WORDS[(7 * i + 3) % len(WORDS)]} {i}"
        (prompt,) = zero_shot_prompts(Task("echo", (Example(query, "x"),), template=Template(n_shot=0)))
        (ids, _), = iv_guided.encode_prompts(tokenizer, [prompt], "auto", 256)
        with torch.no_grad():
            predicted = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        output = tokenizer.decode([predicted]).strip()
        if output and iv_guided.encode_prompts(tokenizer, [Prompt(prompt.text, " " + output)], "auto",
                                               256)[0][1] == predicted:
            lines.append(json.dumps({"input": query, "output": output}))
        if len(lines) > n:
            break
    assert len(lines) > 8, "too few prompts the model answers"
    assert len({json.loads(line)["output"] for line in lines[1:]}) > 1  # not one answer for every prompt
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_iv_guided_lora_trial_on_two_zero2_workers(tmp_path, fixture_files, ray_session):
    """An IV-guided LoRA trial (progressive degree, the MSE on, the all-positions KL at weight 0) end to end on 2
    DeepSpeed ZeRO-2 CPU workers: every term is logged per epoch and finite, the weight-0 term counts exactly 0,
    the degree follows the schedule, and the extracted vector is an artifact of the run. With the IV dynamics probe
    on (issue 12 item 3) and the checkpoints restored: its metrics for the base, every SFT_e and every R_e, one
    extraction shared with IV guidance, and the report's re-injection table."""

    from mlflow.tracking import MlflowClient

    from fixtures import make_pool_file
    from forgetray import Sweep, run

    local_ray()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = _answering_model(fixture_files["model"], tmp_path / "answering-llama")
    task = _answered_task(model, tmp_path / "echo.jsonl")
    sweep = Sweep(
        "iv", model=str(model), dataset=str(fixture_files["dataset"]), epochs=2, lr=1e-2,
        batch_size=8, max_length=256, workers=2, zero_stage=2, benchmarks=[str(fixture_files["benchmark"])],
        probe_set=str(fixture_files["probe_set"]), probe_passages=8, lora_rank=4, lora_alpha=16,
        iv_task=str(task), iv_layer=0, iv_heads=3, iv_mse=1.0, iv_kl_all=0.0, iv_progressive=True, iv_prompts=12,
        iv_corrupted=4, warmup_ratio=0.0,
        iv_probe_task=str(task), iv_probe_layer=1, iv_probe_heads=3, iv_probe_degree=0.5,
        restore_pool=str(make_pool_file(tmp_path / "pool.jsonl", n=400)), restore_lr=1e-3, restore_batch_size=4,
        restore_seq_len=64, restore_trajectory_points=2, restore_group=0,
    )
    table = run(sweep, tracking_uri=uri, storage=tmp_path / "storage")
    assert table.attrs["failed_trials"] == 0

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("iv")
    (trial,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("forgetray.kind") == "trial"]
    assert trial.info.status == "FINISHED" and trial.data.params["phase.ift.iv.mse"] == "1.0"
    history = {k: {m.step: m.value for m in client.get_metric_history(trial.info.run_id, f"train/iv/{k}")}
               for k in ("ce", "kl_first", "kl_all", "mse", "kl_first_term", "kl_all_term", "mse_term", "degree")}
    for name, values in history.items():
        assert sorted(values) == [1, 2] and all(math.isfinite(v) for v in values.values()), name
    assert all(v == 0 for v in history["kl_all_term"].values())  # weight 0: counted as exactly 0, raw still logged
    assert all(v > 0 for v in history["kl_all"].values())
    # 40 examples / 8 = 5 steps an epoch, 10 in all: degree(step 0..9) = 1 1 1 .9 .7 .5 .3 .1 0 0
    assert history["degree"][1] == pytest.approx((1 + 1 + 1 + 0.9 + 0.7) / 5)
    assert history["degree"][2] == pytest.approx((0.5 + 0.3 + 0.1 + 0 + 0) / 5)
    loss = {m.step: m.value for m in client.get_metric_history(trial.info.run_id, "train/loss")}
    # train/loss is the total the step minimised: per micro-batch ce + 20 x KL_first [> 0.1] + 0 x KL_all [> 0.1]
    # + 1.0 x sum over heads of MSE_h [> 0.01] (forgetray.iv.loss with this sweep's weights), and every logged
    # value is the epoch's mean over the same micro-batches, so the sum holds for the means too.
    for epoch in (1, 2):
        terms = {k: v[epoch] for k, v in history.items()}
        assert loss[epoch] == pytest.approx(terms["ce"] + terms["kl_first_term"] + terms["kl_all_term"]
                                            + terms["mse_term"], rel=1e-5, abs=1e-6), (loss[epoch], terms)
        # each term as its weight and threshold make it from the raw value: x [x > thr] lies in [x - thr, x] per
        # micro-batch (3 heads of threshold 0.01 each for the MSE), so its mean lies in the weighted interval
        assert 20.0 * (terms["kl_first"] - 0.1) - 1e-5 <= terms["kl_first_term"] <= 20.0 * terms["kl_first"] + 1e-5
        assert 1.0 * (terms["mse"] - 3 * 0.01) - 1e-6 <= terms["mse_term"] <= 1.0 * terms["mse"] + 1e-6
        assert terms["kl_all_term"] == 0.0
    extraction = client.get_run(trial.info.run_id).data.metrics
    assert extraction["iv/clean_correct"] >= 1 and extraction["iv/clean_prompts"] == 12
    artifacts = {a.path for a in client.list_artifacts(trial.info.run_id, "iv")}
    assert {"iv/vector.pt", "iv/summary.json"} <= artifacts
    saved = torch.load(next((tmp_path / "storage").glob("iv/*/iv/*/vector.pt")), weights_only=False)
    assert len(saved["heads"]) == 3 and saved["vector"].shape == (32,)

    from test_iv_dynamics import check_a_probed_sweep

    check_a_probed_sweep(client, trial.info.run_id, tmp_path, uri, "iv", saved)
