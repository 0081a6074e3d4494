"""The instruction-vector dynamics probe (issue 12 item 3): cosine and head overlap by hand; accuracy with the base
vector injected against this test's own hook; P(y|x) and P(y_c|c,x) against a manual unpadded forward; the probe's
metrics per state against the same independent computations; its settings, cache keys and the report's
re-injection table."""

from __future__ import annotations

import math

import pytest
import torch

from forgetray.iv import dynamics
from forgetray.spec import SpecError, TrialConfig
from forgetray.train import iv_guided
from forgetray.train.iv_probe import IVProbe, Settings


def test_cosine_and_head_overlap_by_hand():
    assert dynamics.cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert dynamics.cosine(torch.tensor([3.0, -4.0]), torch.tensor([-6.0, 8.0])) == pytest.approx(-1.0)
    assert dynamics.cosine(torch.zeros(3), torch.ones(3)) == 0.0
    assert dynamics.head_overlap([(0, 1), (1, 2), (0, 3)], [(1, 2), (0, 1), (2, 2)]) == pytest.approx(2 / 3)
    assert dynamics.head_overlap([(0, 1)], [[0, 1]]) == 1.0  # heads read back from json are lists
    with pytest.raises(ValueError):
        dynamics.head_overlap([(0, 1)], [(0, 1), (0, 2)])


# --- on a tiny Llama ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory, fixture_files):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgetray.iv import load_task
    from test_iv_training import _answered_task, _answering_model

    root = tmp_path_factory.mktemp("dyn")
    model_dir = _answering_model(fixture_files["model"], root / "answering")
    path = _answered_task(model_dir, root / "task.jsonl")
    # an instruction and one demonstration: P(y|x) and P(y_c|c,x) read different prompts, and some answers go wrong
    path.write_text(path.read_text().replace('"n_shot": 0', '"n_shot": 1, "instruction": "Echo the next word."'))
    task = load_task(path)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return task, model, AutoTokenizer.from_pretrained(model_dir)


def _own_forward(model, tokenizer, text: str, vector=None, layer=0, degree=1.0):
    """Logits of one unpadded prompt; with `vector`, added here to decoder layer `layer`'s output at the last
    token by a hook of this test's own."""
    ids = tokenizer(text)["input_ids"]
    handle = None
    if vector is not None:
        def hook(_m, _a, out):
            hidden = out[0] if isinstance(out, tuple) else out
            hidden = hidden.clone()
            hidden[0, -1] += degree * vector
            return (hidden,) + tuple(out[1:]) if isinstance(out, tuple) else hidden
        handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0], ids
    finally:
        if handle is not None:
            handle.remove()


def _first_answer_token(tokenizer, prompt) -> int:
    return tokenizer(prompt.text + prompt.answer)["input_ids"][len(tokenizer(prompt.text)["input_ids"])]


def _own_logprob(model, tokenizer, prompt) -> float:
    """log P(answer | prompt) by one unpadded forward of prompt + answer, summed over the answer's tokens."""
    context = tokenizer(prompt.text)["input_ids"]
    whole = tokenizer(prompt.text + prompt.answer)["input_ids"]
    logits, _ = _own_forward(model, tokenizer, prompt.text + prompt.answer)
    logp = torch.log_softmax(logits.double(), -1)
    return float(sum(logp[t - 1, whole[t]] for t in range(len(context), len(whole))))


def test_accuracy_with_the_vector_injected_equals_the_tests_own_hook(setup):
    from forgetray.iv import zero_shot_prompts

    task, model, tokenizer = setup
    prompts = zero_shot_prompts(task)[:10]
    batches = iv_guided.batches(iv_guided.encode_prompts(tokenizer, prompts, "auto", 256), 4, 0, "cpu")
    torch.manual_seed(0)
    vector = torch.randn(model.config.hidden_size) * 3
    plain = dynamics.correct(model, batches)
    injected = dynamics.correct(model, batches, vector, layer=1, degree=0.5)
    own_plain, own_injected = [], []
    for prompt in prompts:
        answer = _first_answer_token(tokenizer, prompt)
        own_plain.append(int(_own_forward(model, tokenizer, prompt.text)[0][-1].argmax()) == answer)
        own_injected.append(int(_own_forward(model, tokenizer, prompt.text, vector, 1, 0.5)[0][-1].argmax()) == answer)
    assert plain.tolist() == own_plain and injected.tolist() == own_injected
    assert own_plain != own_injected, "the vector must change some prediction for this check to mean anything"


def test_answer_logprobs_equal_a_manual_forward(setup):
    from forgetray.iv import Prompt

    task, model, tokenizer = setup
    probe = IVProbe(task, Settings(0, 3, 1.0, 4, 2, "shuffle_labels"), "auto", 256, 3, 0, "unused")
    prompts = [Prompt(f"Q: {e.input}\nA:", f" {e.output} and more words") for e in task.examples[:7]]
    got = dynamics.answer_logprobs(model, probe._whole(tokenizer, prompts, "cpu"))
    want = [_own_logprob(model, tokenizer, p) for p in prompts]
    assert got.tolist() == pytest.approx(want, abs=1e-4)
    assert len(tokenizer(prompts[0].answer)["input_ids"]) > 2  # several answer tokens are summed


def test_probe_metrics_per_state_against_independent_computation(setup):
    from forgetray.iv import n_shot_prompts

    task, model, tokenizer = setup
    settings = Settings(layer=0, heads=3, degree=2.0, prompts=12, corrupted=4, corruption="shuffle_labels")
    probe = IVProbe(task, settings, "auto", 256, 5, 3, "unused", other_task=task)  # the control's task: any
    torch.manual_seed(1)
    # small against the tiny model's hidden states (norm ~0.1), so that degree 1 and 2 differ
    base = {"vector": torch.randn(model.config.hidden_size) * 1e-3, "heads": [[0, 1], [1, 2], [1, 3]], "scores": [0.1] * 3,
            "clean_prompts": 12, "clean_correct": 12}
    probe._base = base
    probe._other = {"vector": torch.randn(model.config.hidden_size) * 2e-3}  # another task's base vector
    got = probe.measure(model, tokenizer, "sft", "cpu", rank=0, world=1)

    own = iv_guided.extract(model, tokenizer, task, settings, "auto", 256, 5, 3, "cpu", require_clean=False)
    queries = n_shot_prompts(task, 12, 3, n_shot=0)
    assert queries[0].text.startswith("Echo the next word.")
    acc = sum(int(_own_forward(model, tokenizer, p.text)[0][-1].argmax()) == _first_answer_token(tokenizer, p)
              for p in queries) / 12
    acc_iv = sum(int(_own_forward(model, tokenizer, p.text, base["vector"], 0, 2.0)[0][-1].argmax())
                 == _first_answer_token(tokenizer, p) for p in queries) / 12
    from forgetray.iv import Prompt

    bare = [Prompt(p.text.split("\n\n", 1)[1], p.answer) for p in queries]  # the instruction removed: x alone
    p_knowledge = sum(math.exp(_own_logprob(model, tokenizer, p)) for p in bare) / 12
    p_instruction = sum(math.exp(_own_logprob(model, tokenizer, p)) for p in n_shot_prompts(task, 12, 3)) / 12
    assert got["sft/iv_probe/acc_zero_shot"] == pytest.approx(acc) and got["sft/iv_probe/acc_injected"] == pytest.approx(acc_iv)
    assert acc != acc_iv, "the base vector must change the accuracy for this check to mean anything"
    assert got["sft/iv_probe/p_knowledge"] == pytest.approx(p_knowledge, rel=1e-4)
    assert got["sft/iv_probe/p_instruction"] == pytest.approx(p_instruction, rel=1e-4)
    assert p_knowledge != pytest.approx(p_instruction, rel=1e-3)
    assert got["sft/iv_probe/acc_nshot"] == own["clean_correct"] / 12 > 0
    clean = n_shot_prompts(task, 12, 3)
    acc_nshot_iv = sum(int(_own_forward(model, tokenizer, p.text, base["vector"], 0, 2.0)[0][-1].argmax())
                       == _first_answer_token(tokenizer, p) for p in clean) / 12
    assert got["sft/iv_probe/acc_nshot_injected"] == pytest.approx(acc_nshot_iv)
    # the control: 3 seeded Gaussian directions at the base vector's norm, the mean of their zero-shot accuracies
    generator = torch.Generator().manual_seed(3)
    accs = []
    for _ in range(3):
        d = torch.randn(base["vector"].shape, generator=generator, dtype=torch.float64)
        r = (d * (base["vector"].double().norm() / d.norm())).float()
        assert r.norm() == pytest.approx(float(base["vector"].norm()), rel=1e-5)
        accs.append(sum(int(_own_forward(model, tokenizer, p.text, r, 0, 2.0)[0][-1].argmax())
                        == _first_answer_token(tokenizer, p) for p in queries) / 12)
    assert got["sft/iv_probe/acc_random"] == pytest.approx(sum(accs) / 3)
    # the same draws on the n-shot prompts, and the other task's vector on both kinds of prompt
    generator = torch.Generator().manual_seed(3)
    accs = []
    for _ in range(3):
        d = torch.randn(base["vector"].shape, generator=generator, dtype=torch.float64)
        r = (d * (base["vector"].double().norm() / d.norm())).float()
        accs.append(sum(int(_own_forward(model, tokenizer, p.text, r, 0, 2.0)[0][-1].argmax())
                        == _first_answer_token(tokenizer, p) for p in clean) / 12)
    assert got["sft/iv_probe/acc_nshot_random"] == pytest.approx(sum(accs) / 3)
    other = probe._other["vector"]
    for key, prompts in (("acc_other", queries), ("acc_nshot_other", clean)):
        want = sum(int(_own_forward(model, tokenizer, p.text, other, 0, 2.0)[0][-1].argmax())
                   == _first_answer_token(tokenizer, p) for p in prompts) / 12
        assert got[f"sft/iv_probe/{key}"] == pytest.approx(want), key
    assert got["sft/iv_probe/acc_other"] != pytest.approx(acc), "the other vector must change the accuracy here"
    assert "sft/iv_probe/other_norm" not in got  # the control vector's own numbers: at the base only
    a, b = own["vector"].double(), base["vector"].double()
    assert got["sft/iv_probe/cosine"] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-6)
    assert got["sft/iv_probe/head_overlap"] == len({tuple(h) for h in own["heads"]} & {(0, 1), (1, 2), (1, 3)}) / 3
    assert got["sft/iv_probe/vector_norm"] == pytest.approx(float(own["vector"].norm()))

    # the base's own vector is the base vector; a state that answers no clean prompt has no vector to compare
    at_base = probe.measure(model, tokenizer, "base", "cpu", rank=0, world=1)
    assert at_base["base/iv_probe/cosine"] == pytest.approx(1.0) and at_base["base/iv_probe/head_overlap"] == 1.0
    assert at_base["base/iv_probe/other_norm"] == pytest.approx(float(other.norm()))
    assert at_base["base/iv_probe/other_cosine"] == pytest.approx(
        float(other.double() @ b / (other.double().norm() * b.norm())), abs=1e-6)
    with torch.no_grad():
        broken = type(model)(model.config).eval()
        broken.lm_head.weight.zero_()
        broken.lm_head.weight[0] = 1.0  # always predicts token 0
        lost = probe.measure(broken, tokenizer, "restored", "cpu", rank=0, world=1)
    assert lost["restored/iv_probe/acc_nshot"] == 0 and "restored/iv_probe/cosine" not in lost
    from forgetray.metrics import registry

    assert all(registry.parse(name) for name in {**got, **at_base, **lost})


def test_the_base_extraction_writes_the_other_tasks_vector_beside_the_base_vector(setup, tmp_path):
    import dataclasses

    from forgetray.train.iv_probe import OTHER_DIR, extract_base

    task, model, tokenizer = setup
    other = dataclasses.replace(task, name="other", examples=task.examples[::-1])  # other prompts, another vector
    settings = Settings(layer=0, heads=3, degree=1.0, prompts=8, corrupted=3, corruption="shuffle_labels")
    probe = IVProbe(task, settings, "auto", 256, 4, 0, str(tmp_path), other_task=other)
    extract_base(probe, model, tokenizer, "cpu", 0, 1, tmp_path)
    own = iv_guided.extract(model, tokenizer, other, settings, "auto", 256, 4, 0, "cpu")
    assert torch.equal(probe.other["vector"], own["vector"]) and probe.other["heads"] == own["heads"]
    assert not torch.equal(probe.base["vector"], own["vector"])
    assert (tmp_path / OTHER_DIR / "summary.json").is_file()


# --- settings and keys -----------------------------------------------------------------------------------------------

def test_settings_are_validated_and_hashed_only_when_on():
    for bad, name in [({"iv_probe_layer": -1}, "iv_probe_layer"), ({"iv_probe_heads": 0}, "iv_probe_heads"),
                      ({"iv_probe_degree": -1.0}, "iv_probe_degree"), ({"iv_probe_task": " "}, "iv_probe_task"),
                      ({"iv_probe_task": "t.jsonl", "zero_stage": 3}, "zero_stage"),
                      ({"iv_probe_other_task": "o"}, "iv_probe_other_task"),  # without the probe
                      ({"iv_probe_task": "t", "iv_probe_other_task": "t"}, "iv_probe_other_task"),
                      ({"iv_probe_task": "t", "iv_probe_other_task": " "}, "iv_probe_other_task")]:
        with pytest.raises(SpecError, match=f"'{name}'"):
            TrialConfig(**bad)
    assert TrialConfig(iv_probe_layer=3).config_hash() == TrialConfig().config_hash()
    on = TrialConfig(iv_probe_task="t")
    assert on.config_hash() != TrialConfig().config_hash()
    assert on.config_hash() != TrialConfig(iv_probe_task="t", iv_prompts=7).config_hash()  # it extracts with them
    assert on.config_hash() != TrialConfig(iv_probe_task="t", iv_probe_degree=0.5).config_hash()
    assert TrialConfig(iv_task="a").config_hash() == TrialConfig(iv_task="a", iv_probe_layer=2).config_hash()
    # the control task: hashed when set; unset, the hashes are those from before it existed (computed at the commit
    # before it, d5d05d4: a probed trial's and a plain one's)
    assert (on.config_hash(), TrialConfig().config_hash()) == ("ce95b44ee4", "2324237384")
    assert TrialConfig(iv_probe_task="t", iv_probe_other_task="o").config_hash() != on.config_hash()
    from forgetray.resources import resolve_iv_task

    with pytest.raises(SpecError, match=r"^setting 'iv_probe_other_task': 'nope.jsonl' is neither a built-in task"):
        resolve_iv_task("nope.jsonl", TrialConfig(), {"kind": "hub", "path": "m"}, "iv_probe", "iv_probe_other_task")


def test_the_base_vector_shares_the_iv_guided_extraction_and_joins_the_base_evaluation_key():
    from forgetray.keys import base_eval_key, iv_key, iv_probe_key

    task = {"kind": "local", "name": "t.jsonl", "path": "/t.jsonl"}
    resolved = {"model": {"path": "m"}, "prior_datasets": [], "bos": "auto", "iv_task": task, "iv_probe_task": task,
                "benchmarks": {"b": {"path": "/b", "score": "acc"}}, "probe_set": {"path": "/p"}}
    both = TrialConfig(iv_task="t.jsonl", iv_probe_task="t.jsonl", iv_probe_layer=4)
    assert iv_probe_key(both, resolved) == iv_key(both, resolved)  # one extraction for the two
    assert iv_probe_key(TrialConfig(iv_task="t.jsonl", iv_probe_task="t.jsonl", iv_probe_heads=4), resolved) \
        != iv_key(both, resolved)
    other = {**resolved, "iv_probe_other_task": {"kind": "builtin", "name": "o", "path": "/org"}}
    controlled = TrialConfig(iv_task="t.jsonl", iv_probe_task="t.jsonl", iv_probe_layer=4, iv_probe_other_task="o")
    assert iv_probe_key(controlled, other) != iv_key(controlled, other)  # its folder holds the other vector too
    assert base_eval_key(controlled, other) != base_eval_key(both, resolved)
    plain = TrialConfig()
    assert base_eval_key(plain, resolved) == base_eval_key(TrialConfig(iv_probe_layer=3), resolved)
    probed = base_eval_key(TrialConfig(iv_probe_task="t.jsonl"), resolved)
    assert probed != base_eval_key(plain, resolved)
    assert probed != base_eval_key(TrialConfig(iv_probe_task="t.jsonl", iv_probe_degree=0.5), resolved)


# --- the report's table ------------------------------------------------------------------------------------------------

def _trial(history: dict, stage_codes: dict) -> object:
    from forgetray.report.runs import TrialData

    # a run judged by the margin rule logs the test variant beside stage/code (one without it predates the rule)
    history = {**history, "stage/code": stage_codes, "stage/test_code": stage_codes}
    return TrialData("t", "r", "FINISHED", {"lr": "0.01"}, ["b"], {"b": "acc"}, history, {})


def test_reinjection_table_puts_both_restorations_side_by_side():
    from forgetray.report.reinjection import reinjection_table, reinjection_text, share, verdict

    history = {"base/iv_probe/acc_zero_shot": {0: 0.9}, "base/iv_probe/acc_injected": {0: 0.92},
               "sft/iv_probe/acc_zero_shot": {1: 0.9, 2: 0.5, 3: 0.3, 4: 0.4},
               "sft/iv_probe/acc_injected": {1: 0.9, 2: 0.8, 3: 0.35, 4: 0.8},
               "restored/iv_probe/acc_zero_shot": {1: 0.9, 2: 0.85, 3: 0.8, 4: 0.45},
               "sft/iv_probe/cosine": {1: 0.99, 2: 0.7, 3: 0.5}, "sft/iv_probe/head_overlap": {1: 1.0, 2: 0.6},
               "sft/iv_probe/p_knowledge": {2: 0.4}, "sft/iv_probe/p_instruction": {2: 0.2},
               # the n-shot prompts: measured at epoch 2 only
               "base/iv_probe/acc_nshot": {0: 1.0}, "sft/iv_probe/acc_nshot": {2: 0.4},
               "sft/iv_probe/acc_nshot_injected": {2: 0.9}, "restored/iv_probe/acc_nshot": {2: 0.5},
               # the controls: random vectors of the base vector's norm, another task's vector (n-shot only here)
               "sft/iv_probe/acc_random": {2: 0.45}, "sft/iv_probe/acc_nshot_other": {2: 0.42}}
    table = reinjection_table([_trial(history, {1: 0, 2: 1, 3: 2, 4: 1})], ["lr"])
    assert table["epoch"].tolist() == [1, 2, 3, 4, 2]
    assert table["prompts"].tolist() == ["zero-shot"] * 4 + ["n-shot"]
    assert table["recovers"].tolist() == ["no loss", "both", "R only", "IV only", "IV only"]
    nshot = table.iloc[4]
    assert nshot["gap"] == pytest.approx(0.6) and nshot["share_iv"] == pytest.approx(0.5 / 0.6)
    assert nshot["share_restored"] == pytest.approx(0.1 / 0.6) and nshot["cosine_sft"] == 0.7
    row = table[table["prompts"] == "zero-shot"].set_index("epoch").loc[2]
    assert row["share_iv"] == pytest.approx((0.8 - 0.5) / 0.4) and row["share_restored"] == pytest.approx(0.35 / 0.4)
    assert row["acc_sft_iv"] == 0.8 and row["cosine_sft"] == 0.7 and row["p_instruction_sft"] == 0.2
    assert row["acc_sft_random"] == 0.45 and math.isnan(row["acc_sft_other"])
    assert nshot["acc_sft_other"] == 0.42 and math.isnan(nshot["acc_sft_random"])
    from forgetray.metrics.stage import PSEUDO_FORGETTING

    assert row["stage"] == PSEUDO_FORGETTING
    text = reinjection_text(table, ["lr"])
    assert "sft+IV" in text and "R share" in text and "IV only" in text and "P(y_c|c,x)" in text
    assert "sft+rand" in text and "sft+other" in text
    assert math.isnan(share(0.5, 0.5, 0.0)) and verdict(0.2, 0.6, math.nan) == "IV"
    assert reinjection_table([_trial({"sft/b/acc": {1: 0.5}}, {})], ["lr"]).empty  # no probe: no table


def test_the_reinjection_rows_are_declared_and_documented():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for word in ("iv_probe_task", "iv_probe_layer", "iv_probe_heads", "iv_probe_degree", "reinjection_table.csv"):
        assert word in readme, word


def test_the_report_reads_the_probe_back_from_mlflow_and_writes_the_table(tmp_path):
    """A store written with MlflowClient directly (a trial that logged knowledge, stages and the probe's metrics):
    build_report writes reinjection_table.csv and appends its text; a sweep without the probe gets neither."""
    import time

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from forgetray.report import build_report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("dyn", artifact_location=(tmp_path / "artifacts").as_uri())
    now = int(time.time() * 1000)
    parent = client.create_run(experiment, run_name="dyn-exec", start_time=now,
                               tags={"forgetray.kind": "sweep", "forgetray.sweep": "dyn"}).info.run_id
    for name, probed in (("with", True), ("without", False)):
        run = client.create_run(experiment, run_name=name, tags={"forgetray.kind": "trial",
                                                                  "mlflow.parentRunId": parent}).info.run_id
        values = [("base/b/knowledge", 0.8, 0), ("sft/b/knowledge", 0.6, 1), ("restored/b/knowledge", 0.8, 1),
                  ("stage/code", 1, 1)]
        if probed:
            values += [("base/iv_probe/acc_zero_shot", 0.9, 0), ("sft/iv_probe/acc_zero_shot", 0.5, 1),
                       ("sft/iv_probe/acc_injected", 0.85, 1), ("restored/iv_probe/acc_zero_shot", 0.8, 1),
                       ("sft/iv_probe/cosine", 0.4, 1)]
        client.log_batch(run, metrics=[Metric(n, float(v), now, s) for n, v, s in values],
                         params=[Param("trial.iv_probe_task", "t" if probed else ""),
                                 Param("resolved.benchmarks.b.score", "acc")])
        client.set_terminated(run)
    client.set_terminated(parent)
    report = build_report("dyn", uri, tmp_path / "out", log_to_mlflow=False)
    table = report.reinjection_table
    assert table["trial"].tolist() == ["with"] and table["recovers"].tolist() == ["both"]
    assert table["share_iv"].tolist() == pytest.approx([(0.85 - 0.5) / 0.4])
    assert (tmp_path / "out" / "reinjection_table.csv").is_file() and "sft+IV" in report.text
    assert "sft+IV" in (tmp_path / "out" / "stage_table.txt").read_text()


def check_a_probed_sweep(client, run_id: str, tmp_path, uri: str, experiment: str, vector: dict) -> None:
    """What a real sweep with the probe on (tests/test_iv_training.py's IV-guided LoRA sweep, 2 epochs, restored,
    12 clean prompts, iv_probe_heads = iv_heads) must have logged: the probe's metrics for the base at step 0 and
    for SFT_e and R_e at epochs 1 and 2; one extraction folder shared with IV guidance (`vector`: its vector.pt),
    also the run's iv_probe/ artifacts; the report's re-injection table."""
    from forgetray.report import build_report

    assert len(list((tmp_path / "storage").glob("iv/*/iv/*/vector.pt"))) == 1
    assert {"iv_probe/vector.pt"} <= {a.path for a in client.list_artifacts(run_id, "iv_probe")}
    for state, steps in (("base", [0]), ("sft", [1, 2]), ("restored", [1, 2])):
        for key in ("acc_zero_shot", "acc_injected", "acc_random", "acc_nshot", "acc_nshot_injected", "acc_nshot_random",
                    "p_knowledge", "p_instruction"):
            got = {m.step: m.value for m in client.get_metric_history(run_id, f"{state}/iv_probe/{key}")}
            assert sorted(got) == steps and all(0 <= v <= 1 for v in got.values()), (state, key, got)
    latest = client.get_run(run_id).data.metrics
    assert latest["base/iv_probe/cosine"] == pytest.approx(1.0)
    assert latest["base/iv_probe/acc_nshot"] == latest["iv/clean_correct"] / 12
    assert latest["base/iv_probe/top_cie"] == pytest.approx(vector["scores"][0])
    report = build_report(experiment, uri, tmp_path / "report", log_to_mlflow=False)
    table = report.reinjection_table
    assert table["epoch"].tolist() == [1, 2, 1, 2] and table["acc_sft_iv"].notna().all()
    assert table["prompts"].tolist() == ["zero-shot"] * 2 + ["n-shot"] * 2
    assert table["acc_restored"].notna().all() and "sft+IV" in report.text
    assert (tmp_path / "report" / "reinjection_table.csv").is_file()
