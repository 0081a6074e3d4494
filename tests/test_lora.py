"""LoRA (PEFT) as a phase's fine-tuning option: the settings and the plan, the adapter-disabled reference, the merged
model every later step sees, Wise-FT on it; and one real sweep (Ray Train + DeepSpeed ZeRO-2 on 2 CPU workers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import local_ray
import torch

from forgetray.plan import Lora, Phase, plan
from forgetray.spec import SpecError, TrialConfig
from forgetray.train import lora

# Measured on this machine (fp32, CPU, the tiny fixture Llama after 3 adapter steps at lr 1e-2): the merged model's
# logits differ from the adapted peft model's by at most ~1e-7 (different summation order of W x + s B A x).
MERGE_ATOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from fixtures import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("lora") / "tiny-llama")


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _trained(model_dir, steps: int = 3, targets=("q_proj", "v_proj")):
    """A peft model after `steps` AdamW steps on the adapters (B starts at 0: the adapter must move)."""
    torch.manual_seed(0)
    model = lora.wrap(_load(model_dir), Lora(rank=4, alpha=16, dropout=0.0, targets=targets))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), ids


def test_only_the_adapters_train_and_rank_0_is_full_fine_tuning(model_dir):
    plain = _load(model_dir)
    assert lora.wrap(plain, Lora()) is plain and not lora.is_lora(plain)
    model = lora.wrap(_load(model_dir), Lora(rank=4, targets=("q_proj", "v_proj")))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    assert len(trainable) == 2 * 2 * 2  # 2 layers x 2 targets x (A, B)
    with pytest.raises(ValueError, match="lora_targets"):
        lora.wrap(_load(model_dir), Lora(rank=4, targets=("no_such_module",)))


def test_adapter_disabled_reference_equals_the_base_model(model_dir):
    """The reference without a second copy: with the adapters disabled, the peft model's logits are the base
    model's, bit for bit, before training and after optimizer steps on the adapters (the base stays frozen)."""
    base = _load(model_dir)
    untrained, ids = _trained(model_dir, steps=0)
    model, _ = _trained(model_dir, steps=3)
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        for peft_model in (untrained, model):
            with lora.adapter_disabled(peft_model):
                assert torch.equal(peft_model(input_ids=ids).logits, expected)
        assert not torch.allclose(model(input_ids=ids).logits, expected)  # the adapter did train
        # the context ends: the adapters act again; the base weights are the start's, exactly
        assert torch.equal(model(input_ids=ids).logits, adapted)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in lora.base_weights(model).items())
    with lora.adapter_disabled(base):  # a plain model: nothing to disable
        pass


def test_merged_model_equals_the_adapted_model(model_dir, tmp_path):
    """The checkpoint's `model/` (base model's save_pretrained with the merged state dict, as report_checkpoint
    writes it) reloads with transformers and computes the adapted model's logits; the training module is not
    modified by merging; peft's merge_and_unload gives the same weights."""
    from transformers import AutoModelForCausalLM

    model, ids = _trained(model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = lora.merged_state_dict(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert set(merged) == set(_load(model_dir).state_dict())  # the plain model's names
    model.get_base_model().save_pretrained(tmp_path / "model", state_dict=merged, safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        diff = float((reloaded(input_ids=ids).logits - adapted).abs().max())
    assert diff < MERGE_ATOL, diff
    lora.save_adapter(model, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    from peft import PeftModel  # the checkpoint's adapter/ on its start is the adapted model again

    with torch.no_grad():
        again = PeftModel.from_pretrained(_load(model_dir), tmp_path / "adapter").eval()
        assert torch.equal(again(input_ids=ids).logits, adapted)
    unloaded = lora.merge_and_unload(model).state_dict()
    assert all(torch.allclose(unloaded[k], v, atol=1e-6) for k, v in merged.items())


def test_wiseft_with_lora_equals_a_hand_computation(model_dir):
    """Inside wiseft_weights the LoRA module computes (1-a)*theta0 + a*merged = theta0 + a*(alpha/r)*B@A on the
    targets (the base weights elsewhere); afterwards it is the adapted model again, its base weights bit-exact."""
    from forgetray.train.ift import wiseft_weights

    model, ids = _trained(model_dir)
    theta0 = {k: v.clone() for k, v in _load(model_dir).state_dict().items()}
    frozen = lora.base_weights(model)
    a, scale = 0.5, 16 / 4
    hand = dict(theta0)
    for name, module in model.get_base_model().named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * scale
            hand[f"{name}.weight"] = theta0[f"{name}.weight"] + a * delta.detach()
    reference = _load(model_dir)
    reference.load_state_dict(hand)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with wiseft_weights(model, theta0, a) as mixed:
            assert all(torch.allclose(mixed[k], v, atol=1e-6) for k, v in hand.items())
            inside = model(input_ids=ids).logits
        assert torch.allclose(inside, reference(input_ids=ids).logits, atol=MERGE_ATOL)
        assert torch.equal(model(input_ids=ids).logits, adapted)
    assert all(torch.equal(v, frozen[k]) for k, v in lora.base_weights(model).items())


def test_lora_settings_are_validated_naming_the_setting():
    for bad, name in [({"lora_rank": -1}, "lora_rank"), ({"lora_alpha": 0}, "lora_alpha"),
                      ({"lora_dropout": 1.0}, "lora_dropout"), ({"lora_rank": 4, "lora_targets": []}, "lora_targets"),
                      ({"lora_targets": [""]}, "lora_targets"), ({"lora_rank": 4, "zero_stage": 3}, "zero_stage"),
                      ({"lora_rank": 4, "flatness_grid": 3}, "flatness_grid"), ({"lora_rank": 1.5}, "lora_rank")]:
        with pytest.raises(SpecError, match=f"'{name}'"):
            TrialConfig(**bad)
    with pytest.raises(SpecError, match=r"'prior_phases'\[0\].*'lora_dropout'"):
        TrialConfig(prior_phases=[{"dataset": "d", "epochs": 1, "lora_rank": 2, "lora_dropout": -0.1}])
    # SAM with LoRA is allowed: it perturbs the trainable weights (the adapters), like its gradient step
    assert TrialConfig(lora_rank=4, sam_rho=0.05, zero_stage=2).lora_targets == ("q_proj", "v_proj")
    # full fine-tuning's config hash ignores the (unused) LoRA settings: the same trials as before they existed
    assert TrialConfig(lora_alpha=8).config_hash() == TrialConfig().config_hash()
    assert TrialConfig(lora_rank=4).config_hash() != TrialConfig(lora_rank=4, lora_alpha=8).config_hash()


def test_plan_puts_lora_on_the_ift_and_chosen_prior_phases_never_on_restoration():
    trial = TrialConfig(lora_rank=8, lora_alpha=32, lora_dropout=0.1, lora_targets=["q_proj", "k_proj"],
                        restore_pool="pool", prior_phases=[{"dataset": "a", "epochs": 1},
                                                           {"dataset": "b", "epochs": 1, "lora_rank": 2}])
    phases = {p.name: p for p in plan(trial)}
    assert phases["ift"].lora == Lora(8, 32.0, 0.1, ("q_proj", "k_proj"))
    assert phases["prior_1"].lora == Lora() and phases["prior_2"].lora == Lora(rank=2)
    assert all(p.lora.rank == 0 for p in phases.values() if p.kind == "restore")
    for phase in phases.values():
        assert Phase.from_dict(json.loads(json.dumps(phase.to_dict()))) == phase
    params = phases["ift"].params()
    assert params["ift.lora.rank"] == 8 and params["ift.lora.targets"] == ("q_proj", "k_proj")
    assert TrialConfig.from_dict(json.loads(json.dumps(trial.to_dict()))) == trial


@pytest.mark.slow
def test_lora_trial_on_two_zero2_workers(tmp_path, fixture_files, ray_session):
    """A LoRA trial (rank 4, with SAM and Wise-FT a = 0.5) end to end on 2 DeepSpeed ZeRO-2 CPU workers, one of
    which fails after epoch 1 (the restart resumes from the adapter-only DeepSpeed state), then restores every
    checkpoint in the same workers (restore_group=0): each checkpoint holds `adapter/` and a merged `model/` = theta0 + a * delta whose probe
    is the logged one, the frozen base weights are the start's, and restoration trains the merged model fully."""

    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fixtures import make_pool_file
    from forgetray import Sweep, run
    from forgetray.data.questions import load_mc_jsonl
    from forgetray.probes import probe_knowledge, summarize_knowledge
    from forgetray.train.worker import FAIL_ONCE_ENV

    marker = tmp_path / "failed-once"
    fail_once = {FAIL_ONCE_ENV: f"{marker}:1"}
    local_ray(fail_once)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    alpha, rank, scale = 0.5, 4, 16 / 4
    sweep = Sweep(
        "lora", model=str(fixture_files["model"]), dataset=str(fixture_files["dataset"]), epochs=2, lr=1e-2,
        batch_size=8, max_length=256, workers=2, zero_stage=2, benchmarks=[str(fixture_files["benchmark"])],
        probe_set=str(fixture_files["probe_set"]), probe_passages=16, lora_rank=rank, lora_alpha=16,
        lora_targets=["q_proj", "v_proj"], sam_rho=0.05, sam_every=2, wiseft_alpha=alpha,
        restore_pool=str(make_pool_file(tmp_path / "pool.jsonl", n=400)), restore_lr=1e-3, restore_batch_size=4,
        restore_seq_len=64, restore_trajectory_points=2, restore_group=0,
    )
    table = run(sweep, tracking_uri=uri, storage=tmp_path / "storage")
    assert table.attrs["failed_trials"] == 0 and marker.exists(), "the injected failure did not happen"

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lora")
    (trial,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("forgetray.kind") == "trial"]
    assert trial.info.status == "FINISHED"
    params = trial.data.params
    assert params["phase.ift.lora.rank"] == "4" and params["phase.restore.lora.rank"] == "0"
    assert [m.step for m in client.get_metric_history(trial.info.run_id, "sft/bench/acc")] == [1, 2]
    trial_dir = next((tmp_path / "storage").glob("lora/*/trials/*"))
    # (a LoRA prior phase's merge is the same code, `lora.merged_state_dict`; left out here for the suite's time)
    start = AutoModelForCausalLM.from_pretrained(fixture_files["model"]).state_dict()
    logged = {m.step: m.value for m in client.get_metric_history(trial.info.run_id, "sft/bench/acc")}
    models = {}
    for epoch in (1, 2):
        ckpt = trial_dir / "ift" / f"epoch_{epoch:03d}"
        adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
        assert json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["r"] == rank
        model = AutoModelForCausalLM.from_pretrained(ckpt / "model").eval()
        models[epoch] = saved = model.state_dict()
        targets = 0
        for key, value in start.items():
            prefix = f"base_model.model.{key[: -len('.weight')]}"
            if f"{prefix}.lora_A.weight" in adapter:  # theta0 + a * (alpha / r) * B @ A
                delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"] * scale
                assert delta.abs().max() > 0 and torch.allclose(saved[key], value + alpha * delta, atol=1e-6), key
                targets += 1
            else:  # the frozen base weights are the start's, bit for bit
                assert torch.equal(saved[key], value), key
        assert targets == 2 * 2
        with torch.no_grad():
            frame = probe_knowledge(model, AutoTokenizer.from_pretrained(ckpt / "model"),
                                    load_mc_jsonl(fixture_files["benchmark"]), batch_size=4, max_length=256,
                                    bos="auto")
        assert logged[epoch] == pytest.approx(summarize_knowledge(frame)["acc"], abs=1e-5)
    assert not torch.equal(models[1]["model.layers.0.self_attn.q_proj.weight"],
                           models[2]["model.layers.0.self_attn.q_proj.weight"])
    # Restoration is full fine-tuning of the merged SFT_e: every weight moves, not only the LoRA targets.
    restored = AutoModelForCausalLM.from_pretrained(
        next(trial_dir.glob("ift/restored_epoch_001")) / "model").state_dict()
    key = "model.layers.0.mlp.up_proj.weight"  # no LoRA target
    assert not torch.equal(restored[key], models[1][key])
