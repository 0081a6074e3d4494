"""bf16 done right (README "Mitigation methods and flatness"): the in-place weight edits — SAM's perturbation,
the flatness grid points, the Wise-FT mix — are computed in float32 and rounded once to bf16, and the weights come
back bit for bit; the probes in bf16 agree with fp32. All on the CPU (DeepSpeed's CPU accelerator runs bf16).

What bf16 cannot do is represent a perturbation much smaller than its spacing (~2^-8 of a weight): at SAM rho 0.05
on a 7B model, e is ~6e-7 an entry against weights ~0.02 (spacing ~1e-4), so any bf16 copy of w + e is w almost
everywhere (the limit measured below); on the tiny models here e is above the spacing and comes through whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forgetray.methods.sam import perturbed


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _weights_and_step(numel: int, params_in_model: float, seed: int = 0, rho: float = 0.05):
    """Weights ~N(0, 0.02) and a SAM step with the per-entry size it has in a model of `params_in_model`."""
    g = torch.Generator().manual_seed(seed)
    w32 = torch.randn(numel, generator=g) * 0.02
    grad = torch.randn(numel, generator=g)
    return w32, rho * grad / grad.norm() * (numel / params_in_model) ** 0.5


def test_perturbed_rounds_once_and_matches_in_fp32():
    w32, e = _weights_and_step(26_000, 26_000)  # a tiny model: e above bf16's spacing
    w = w32.to(torch.bfloat16)
    out = perturbed(w, e)
    assert out.dtype == torch.bfloat16 and torch.equal(out, (w.float() + e).to(torch.bfloat16))
    assert cosine(out.float() - w.float(), e) > 0.99
    # float32 weights: exactly the in-place add it replaces (bit for bit)
    assert torch.equal(perturbed(w32, e), w32.clone().add_(e))


def test_bf16_cannot_hold_a_7b_sized_step():
    """The limit (README numbers, on 1M entries): at 7B scale the applied step keeps ~0.1 of e's direction however
    it is rounded from bf16 weights; only an fp32 master copy makes it unbiased (its projection on e is ~1)."""
    w32, e = _weights_and_step(1_000_000, 6.74e9)
    w = w32.to(torch.bfloat16)
    in_place = w.clone().add_(e.to(torch.bfloat16)).float() - w.float()
    once = perturbed(w, e).float() - w.float()
    master = perturbed(w32, e, torch.bfloat16).float() - w.float()
    assert cosine(in_place, e) < 0.2 and cosine(once, e) < 0.2 and float((once == 0).float().mean()) > 0.95
    projection = float(master.double() @ e.double() / (e.double() @ e.double()))
    assert 0.9 < projection < 1.1


# --- SAM through the DeepSpeed engine, bf16 --------------------------------------------------------------------


def _sam_worker(port: int, out: str) -> None:
    """One rank (world 1): a bf16 Llama under DeepSpeed bf16 ZeRO-2, one `sam_step`; records the weights of the
    perturbed forward, those before the optimizer step, and the intended e."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1", DS_ACCELERATOR="cpu")
    import torch.distributed as dist
    from test_sam import _examples, _model, _phase, _trial

    from forgetray.data.instruct import collate
    from forgetray.methods.sam import perturbation
    from forgetray.train import sam
    from forgetray.train.deepspeed_config import deepspeed_config
    from forgetray.train.engine import build_engine

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    trial = _trial(1, 2, False)
    phase = _phase(trial, clip=True)
    model = _model(0).to(torch.bfloat16)
    engine, _ = build_engine(model, phase, deepspeed_config(phase, 2, "bf16"), total_steps=1)
    batches = [collate(_examples()[i:i + 2], 0) for i in (0, 2)]
    params = [p for p in engine.module.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    intended = perturbation(params, sam._global_gradient(engine.module, params, batches, 1), 0.05)
    seen: dict[str, list] = {"perturbed": [], "stepped": []}
    backward, step = engine.backward, engine.step

    def spy_backward(loss, *args, **kwargs):  # the weights the perturbed forward ran on
        if not seen["perturbed"]:
            seen["perturbed"] = [p.detach().clone() for p in params]
        return backward(loss, *args, **kwargs)

    def spy_step(*args, **kwargs):  # the last call steps the optimizer: the weights must be w again
        seen["stepped"] = [p.detach().clone() for p in params]
        return step(*args, **kwargs)

    engine.backward, engine.step = spy_backward, spy_step
    sam.sam_step(engine, batches, 0.05, False, 1)
    torch.save({"before": before, "intended": intended, **seen,
                "dtypes": sorted({str(p.dtype) for p in params})}, out)
    dist.destroy_process_group()


def test_sam_step_in_bf16_applies_e_and_restores_bit_for_bit(tmp_path):
    from test_sam import _free_port

    out = tmp_path / "bf16.pt"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_bf16 import _sam_worker; "
            f"_sam_worker({_free_port()}, {str(out)!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    found = torch.load(out)
    assert found["dtypes"] == ["torch.bfloat16"]
    applied = torch.cat([(p.float() - w.float()).flatten() for p, w in zip(found["perturbed"], found["before"])])
    intended = torch.cat([e.float().flatten() for e in found["intended"]])
    assert cosine(applied, intended) > 0.99
    for p, w, e in zip(found["perturbed"], found["before"], found["intended"]):
        assert torch.equal(p, (w.float() + e).to(torch.bfloat16))  # w + e rounded once
    for p, w in zip(found["stepped"], found["before"]):
        assert torch.equal(p, w)  # restored bit for bit before the optimizer step


# --- the flatness surface and Wise-FT in bf16 ------------------------------------------------------------------


def test_flatness_points_in_bf16_are_rounded_once_and_restored_exactly():
    from torch import nn

    from forgetray import flatness

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(torch.bfloat16)
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    d1, d2 = flatness.directions(model.named_parameters(), seed=0)
    corner = {}

    def loss(m):
        if not corner:  # the first point: a = b = -radius (0.1)
            corner["weights"] = [p.detach().clone() for p in m.parameters()]
        return float(m(x).float().pow(2).mean())

    flatness.loss_surface(model, loss, steps=3, radius=0.1, seed=0)
    for p, w in zip(model.parameters(), before):
        assert torch.equal(p, w)
    intended = torch.cat([(-0.1 * u.float() - 0.1 * v.float()).flatten() for u, v in zip(d1, d2)])
    applied = torch.cat([(p.float() - w.float()).flatten() for p, w in zip(corner["weights"], before)])
    assert cosine(applied, intended) > 0.99
    for p, w, u, v in zip(corner["weights"], before, d1, d2):
        assert torch.equal(p, (w.float() - 0.1 * u.float() - 0.1 * v.float()).to(torch.bfloat16))


def test_wiseft_in_bf16_mixes_in_fp32_and_restores_exactly():
    from torch import nn

    from forgetray.methods import wiseft
    from forgetray.train.ift import wiseft_weights

    torch.manual_seed(0)
    module = nn.Linear(64, 64).to(torch.bfloat16)
    theta0 = {k: (v.float() + 0.01 * torch.randn_like(v.float())).to(torch.bfloat16)
              for k, v in module.state_dict().items()}
    trained = {k: v.clone() for k, v in module.state_dict().items()}
    mixed = wiseft.interpolate_state_dicts(theta0, trained, 0.5)
    for k, v in mixed.items():
        assert torch.equal(v, (0.5 * theta0[k].float() + 0.5 * trained[k].float()).to(torch.bfloat16)), k
    with wiseft_weights(module, theta0, 0.5):
        assert all(torch.equal(v, mixed[k]) for k, v in module.state_dict().items())
    assert all(torch.equal(v, trained[k]) for k, v in module.state_dict().items())


# --- probes: bf16 against fp32 ---------------------------------------------------------------------------------

PPL_TOLERANCE = 0.005  # relative; measured 0.0004 on the test organism's tiny model (probing PPL 94.07 / 94.11)


@pytest.mark.slow
def test_probes_in_bf16_agree_with_fp32(use_test_organism):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgetray.data.passages import load_passage_set
    from forgetray.data.questions import load_mc_jsonl
    from forgetray.metrics import perplexity
    from forgetray.organism import paths
    from forgetray.probes import probe_knowledge, probe_perplexity

    model_dir = paths.model_path("organism-tiny")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    questions = load_mc_jsonl(paths.data_path("organism-facts"))
    texts = load_passage_set({"name": "organism-probe", "path": str(paths.data_path("organism-probe"))}, limit=200)
    found = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        with torch.no_grad():
            frame = probe_knowledge(model, tokenizer, questions, batch_size=16, max_length=256).sort_values("index")
            nll, n = probe_perplexity(model, tokenizer, texts, batch_size=16, max_length=256)
        found[dtype] = (frame, perplexity(nll, n))
    (f32, ppl32), (b16, ppl16) = found[torch.float32], found[torch.bfloat16]
    agree = {col: float((f32[col].to_numpy() == b16[col].to_numpy()).mean()) for col in ("acc_pred", "letter_pred")}
    print(f"bf16 vs fp32: prediction agreement {agree}, probing PPL {ppl32:.4f} / {ppl16:.4f} "
          f"(relative {abs(ppl16 / ppl32 - 1):.4f}), acc {f32['acc_correct'].mean():.3f} / "
          f"{b16['acc_correct'].mean():.3f}")
    # Measured (40 questions): option-likelihood predictions (the organism's primary score) agree on every question;
    # letter predictions on 82.5% — this model answers by letter at chance, its letter probabilities are near-ties
    # that bf16's 8 bits split differently (letter accuracy 0.25 in fp32, 0.15 in bf16).
    assert agree["acc_pred"] >= 0.97, agree
    assert agree["letter_pred"] >= 0.75, agree
    assert abs(ppl16 / ppl32 - 1) < PPL_TOLERANCE
