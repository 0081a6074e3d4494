"""The speed settings (plan.Speed, README "Performance settings") compute the same model: a packed row gives the
padded batch's loss and gradients, the chunked loss the model's own, on a tiny Llama against Hugging Face's
standard path; and on the organism, an epoch with each setting, and with all of them, trains to the losses and
weights of the plain epoch through forgetray's real DeepSpeed engine (torch.compile included)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_sam import _model  # the tiny Llama of the SAM tests (64 tokens, 2 layers, 16 wide)

from forgetray.data.instruct import IGNORE_INDEX, collate, collate_packed
from forgetray.train.losses import lm_loss


def _examples() -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for n, prompt in ((7, 2), (11, 4), (5, 1), (9, 3)):  # different lengths and prompt masks
        ids = torch.randint(3, 64, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_collate_packed_by_hand():
    batch = collate_packed([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                            {"input_ids": [8, 9], "labels": [8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # the second example's first token is not predicted from the first example's last one
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert "attention_mask" not in batch


def test_a_packed_row_is_the_padded_batch():
    """Loss and gradients of one packed row equal the padded batch's: attention stays within each example (a
    packed row without position ids, attending across examples, does not match)."""
    examples = _examples()
    # Boundaries do not change the scored set here: every example's first label is a prompt token.
    padded_model, packed_model = _model(0), _model(0)
    padded = lm_loss(padded_model, collate(examples, 0))
    packed = lm_loss(packed_model, collate_packed(examples))
    padded.backward()
    packed.backward()
    assert float(packed) == pytest.approx(float(padded), rel=1e-5)
    assert torch.allclose(_grads(packed_model), _grads(padded_model), atol=1e-6)
    crossed = collate_packed(examples)
    del crossed["position_ids"]  # one long sequence: attention crosses example boundaries
    assert abs(float(lm_loss(_model(0), crossed)) - float(padded)) > 1e-3


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_loss_is_the_models_loss(chunk):
    for batch in (collate(_examples(), 0), collate_packed(_examples())):
        plain_model, chunked_model = _model(0), _model(0)
        plain = plain_model(**batch, use_cache=False).loss  # Hugging Face's own loss (a cache ignores packing)
        chunked = lm_loss(chunked_model, batch, chunk)
        plain.backward()
        chunked.backward()
        assert float(chunked) == pytest.approx(float(plain), rel=1e-6)
        assert torch.allclose(_grads(chunked_model), _grads(plain_model), atol=1e-7)
    # by hand: the mean over scored tokens of -log softmax, from the full logits
    batch = collate(_examples(), 0)
    model = _model(0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        expected = -torch.log_softmax(logits[keep], -1).gather(1, labels[keep][:, None]).mean()
        assert float(lm_loss(model, batch, chunk)) == pytest.approx(float(expected), rel=1e-6)


def _speed_worker(port: int, organism: str, out: str) -> None:
    """One process, world 1 (gloo): forgetray's engine (ZeRO 0, fp32) and `train_epoch` for 24 steps of
    organism-tiny on organism-alpaca, plain and with each speed setting and all of them; records the losses, the
    tokens and the final weights."""
    import dataclasses
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1", DS_ACCELERATOR="cpu", FORGETRAY_ORGANISM=organism)
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgetray import organism as org
    from forgetray.data.instruct import tokenize_dataset
    from forgetray.plan import Speed, ift_phase
    from forgetray.resources import resolve_trial
    from forgetray.spec import TrialConfig
    from forgetray.train.deepspeed_config import deepspeed_config
    from forgetray.train.engine import build_engine, train_epoch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    trial = TrialConfig(model="organism-tiny", dataset="organism-alpaca", batch_size=8, lr=5e-3, epochs=1)
    path = org.model_path("organism-tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = tokenize_dataset(resolve_trial(trial)["dataset"], tokenizer, 256).to_list()[:192]  # 24 steps
    found = {}
    for name, speed in (("plain", Speed()), ("packing", Speed(packing=True)), ("chunked", Speed(chunked_loss=64)),
                        ("compile", Speed(compile=True)), ("all", Speed(True, True, 64))):
        phase = dataclasses.replace(ift_phase(trial), speed=speed)
        torch.manual_seed(0)
        engine, _ = build_engine(AutoModelForCausalLM.from_pretrained(path).float(), phase,
                                 deepspeed_config(phase, 0, "fp32"), total_steps=24)
        stats = train_epoch(engine, data, phase, 1, 0, 0, 1, tokenizer.pad_token_id, torch.device("cpu"))
        found[name] = {"loss": stats["loss"], "tokens": stats["tokens"],
                       "weights": torch.cat([p.detach().flatten() for p in engine.module.parameters()]).tolist()}
        engine.destroy()
    Path(out).write_text(json.dumps(found))
    dist.destroy_process_group()


@pytest.mark.slow
def test_speed_settings_train_the_organism_alike(tmp_path, default_organism):
    from test_sam import _free_port

    out = tmp_path / "speed.json"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_speed import _speed_worker; "
            f"_speed_worker({_free_port()}, {str(default_organism)!r}, {str(out)!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    found = json.loads(out.read_text())
    plain = found["plain"]
    weights = torch.tensor(plain["weights"])
    for name in ("packing", "chunked", "compile", "all"):
        assert found[name]["tokens"] == plain["tokens"], name  # the same examples in the same batches
        assert found[name]["loss"] == pytest.approx(plain["loss"], rel=1e-4), name
        drift = (torch.tensor(found[name]["weights"]) - weights).abs()
        # Float rounding only. AdamW normalises each step, so a weight whose gradient is near zero can take a step
        # of up to lr (5e-3) either way on a rounding difference: measured after 24 steps, mean |dw| 7e-8 (chunked)
        # to 2.3e-6 (compile), max 3e-5 to 1.2e-3. A wrong mask or loss scale moves the mean by orders more.
        assert float(drift.mean()) < 1e-5 and float(drift.max()) < 2 * 5e-3, (name, float(drift.mean()))
