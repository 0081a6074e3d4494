"""SAM (docs/methods.md §5): the perturbation maths on tiny tensors, and one SAM optimizer step of the real DeepSpeed
engine with 1 and with 2 ranks (gloo, CPU) against a reference SAM update written here with plain autograd.

AdamW's first step is about lr * sign(g): it hides an error in the gradient's scale. So under ZeRO-0 the test also
records the gradient the engine hands its optimizer (clipping off) and compares it with the reference gradient at
w + e, where a wrong scale of g, e or rho shows in full."""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forgetray.methods.sam import perturbation
from forgetray.plan import ift_phase
from forgetray.spec import SpecError, TrialConfig


# --- the maths --------------------------------------------------------------------------------------------------


def test_sam_perturbation_by_hand():
    # g = ([3], [4]) -> ||g|| = 5; e = rho * g / 5
    params = [torch.tensor([1.0]), torch.tensor([2.0])]
    e = perturbation(params, [torch.tensor([3.0]), torch.tensor([4.0])], rho=0.5)
    assert torch.allclose(e[0], torch.tensor([0.3])) and torch.allclose(e[1], torch.tensor([0.4]))


def test_asam_perturbation_by_hand():
    # w = (1, -2), g = (3, 4): |w| g = (3, 8) with norm sqrt(73); e = rho * w^2 g / sqrt(73) = rho * (3, 16) / sqrt(73)
    params = [torch.tensor([1.0, -2.0])]
    e = perturbation(params, [torch.tensor([3.0, 4.0])], rho=2.0, adaptive=True)
    expected = 2.0 * torch.tensor([1.0 * 3.0, 4.0 * 4.0]) / math.sqrt(73)
    assert torch.allclose(e[0], expected)


def test_zero_gradient_and_zero_rho_give_no_step():
    params = [torch.ones(3)]
    assert torch.equal(perturbation(params, [torch.zeros(3)], rho=1.0)[0], torch.zeros(3))
    assert torch.equal(perturbation(params, [torch.ones(3)], rho=0.0)[0], torch.zeros(3))
    with pytest.raises(ValueError, match="rho"):
        perturbation(params, [torch.ones(3)], rho=-1.0)


def test_sam_settings_are_validated():
    with pytest.raises(SpecError, match="'zero_stage'.*SAM"):
        TrialConfig(sam_rho=0.05, zero_stage=3)
    with pytest.raises(SpecError, match="'sam_every'"):
        TrialConfig(sam_every=0)
    with pytest.raises(SpecError, match="'sam_rho'"):
        TrialConfig(sam_rho=-0.1)


# --- one optimizer step of the DeepSpeed engine -------------------------------------------------------------------

RHO, LR, BATCH, MICRO = 0.5, 1e-2, 4, 2


def _model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).float()


def _examples() -> list[dict]:
    # Different lengths and response masks, so a wrong loss normalisation would show.
    g = torch.Generator().manual_seed(3)
    out = []
    for n in (7, 9, 5, 8):
        ids = torch.randint(3, 64, (n,), generator=g).tolist()
        labels = [-100] * 2 + ids[2:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def _trial(workers: int, zero_stage: int, adaptive: bool) -> TrialConfig:
    return TrialConfig(batch_size=BATCH, micro_batch_size=MICRO, workers=workers, zero_stage=zero_stage, lr=LR,
                       warmup_ratio=0.0, lr_schedule="constant", sam_rho=RHO, sam_adaptive=adaptive, epochs=1)


def _phase(trial: TrialConfig, clip: bool):
    """The trial's IFT phase; without `clip`, gradient clipping is out of reach (so a gradient's scale shows)."""
    phase = ift_phase(trial)
    return phase if clip else dataclasses.replace(phase, optimizer=dataclasses.replace(phase.optimizer, grad_clip=1e6))


# The engine configurations the step is checked in: (ZeRO stage, adaptive).
CONFIGS = [(0, False), (0, True), (2, True)]


def _engine_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: for each of CONFIGS in turn, the real DeepSpeed engine (forgetray's build_engine) and train_epoch
    over one global batch, from the same start. Under ZeRO-0 (clipping off) it also records the gradients the
    optimizer steps with. One process group serves every configuration (a process costs ~4 s of imports)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {config: _engine_step(rank, world, *config) for config in CONFIGS}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def _engine_step(rank: int, world: int, zero_stage: int, adaptive: bool) -> dict:
    from forgetray.train.deepspeed_config import deepspeed_config
    from forgetray.train.engine import build_engine, train_epoch

    trial = _trial(world, zero_stage, adaptive)
    phase = _phase(trial, clip=zero_stage != 0)
    model = _model(0)
    names = {id(p): name for name, p in model.named_parameters()}
    seen: dict[str, torch.Tensor] = {}
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):  # ZeRO-0 in fp32 steps the client optimizer on the module's own parameters
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) in names:
                    seen[names[id(p)]] = p.grad.detach().clone()
        return step(self, *args, **kwargs)

    torch.optim.AdamW.step = spy
    try:
        engine, _ = build_engine(model, phase, deepspeed_config(phase, zero_stage, "fp32"), total_steps=1)
        train_epoch(engine, _examples(), phase, epoch=1, seed=trial.seed, rank=rank, world=world, pad_id=0,
                    device=torch.device("cpu"))
    finally:
        torch.optim.AdamW.step = step
    return {"weights": {k: v.detach().clone() for k, v in engine.module.state_dict().items()}, "grads": seen}


def _reference(adaptive: bool, rho: float = RHO, clip: bool = True) -> tuple[dict, dict]:
    """SAM by hand: the same global batch, split into the same micro-batches, each micro-batch's loss the mean over
    its response tokens, the batch gradient their mean; e from the global norm; clipping at 1.0 (DeepSpeed: clip
    coefficient 1 / (norm + 1e-6)) or none, and AdamW as the engine is configured. -> (weights after the step, the
    gradient at w + e by parameter name)."""
    from forgetray.data.instruct import collate
    from forgetray.train.engine import epoch_order

    model = _model(0)
    params = [p for p in model.parameters()]
    data = _examples()
    order = epoch_order(len(data), TrialConfig().seed, 1).tolist()
    micro = [collate([data[i] for i in order[k:k + MICRO]], 0) for k in range(0, BATCH, MICRO)]

    def gradient() -> list[torch.Tensor]:
        total = [torch.zeros_like(p) for p in params]
        for batch in micro:
            grads = torch.autograd.grad(model(**batch).loss, params, allow_unused=True)
            for t, g in zip(total, grads):
                if g is not None:
                    t += g / len(micro)
        return total

    w = [p.detach().clone() for p in params]
    g = gradient()
    if adaptive:
        tg = [p.abs() * gi for p, gi in zip(w, g)]
        norm = torch.sqrt(sum((t ** 2).sum() for t in tg))
        e = [rho * p.abs() * t / norm for p, t in zip(w, tg)]
    else:
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        e = [rho * gi / norm for gi in g]
    with torch.no_grad():
        for p, ei in zip(params, e):
            p += ei
    g_sam = gradient()
    with torch.no_grad():
        for p, wi in zip(params, w):
            p.copy_(wi)
    norm_sam = torch.sqrt(sum((gi ** 2).sum() for gi in g_sam))
    coef = min(1.0, 1.0 / (float(norm_sam) + 1e-6)) if clip else 1.0
    for p, gi in zip(params, g_sam):
        p.grad = gi * coef
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    optimizer.step()
    grads = {name: gi.clone() for (name, _), gi in zip(model.named_parameters(), g_sam)}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, grads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_ENGINE_RUNS: dict[int, dict] = {}  # world -> {config: result}: one run per test process and world size


def _run_engine(tmp_path_factory, world: int, zero_stage: int, adaptive: bool) -> dict:
    if world not in _ENGINE_RUNS:
        out = tmp_path_factory.mktemp("sam-engine") / f"w{world}.pt"
        port = _free_port()
        code = ("import sys; sys.path.insert(0, {tests!r}); from test_sam import _engine_worker; "
                "_engine_worker({rank}, {world}, {port}, {out!r})")
        procs = [subprocess.Popen([sys.executable, "-c", code.format(tests=str(Path(__file__).parent), rank=r,
                                                                     world=world, port=port, out=str(out))],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
        logs = [p.communicate(timeout=300)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
        _ENGINE_RUNS[world] = torch.load(out)
    return _ENGINE_RUNS[world][(zero_stage, adaptive)]


# Adam's first step is lr * g / (|g| + eps): for the few entries whose gradient is near eps, float rounding in the
# gradient shows up amplified (measured: up to ~7e-6 with lr 1e-2). So the tolerance is 0.1% of a step, which is still
# far below how much the SAM update differs from the plain one (asserted below).
ATOL = 1e-3 * LR


@pytest.mark.parametrize("zero_stage,adaptive", CONFIGS)
def test_sam_step_one_and_two_workers_match_reference(tmp_path_factory, zero_stage, adaptive):
    clip = zero_stage != 0
    expected, expected_grads = _reference(adaptive, clip=clip)
    plain, plain_grads = _reference(adaptive, rho=0.0, clip=clip)
    assert max(float((expected[k] - plain[k]).abs().max()) for k in expected) > 100 * ATOL  # SAM changes the step
    start = {k: v.detach().clone() for k, v in _model(0).state_dict().items()}
    for world in (1, 2):
        got = _run_engine(tmp_path_factory, world, zero_stage, adaptive)
        assert got["weights"].keys() == expected.keys()
        for key in expected:
            assert not torch.equal(got["weights"][key], start[key]), f"{key} did not move"
            assert torch.allclose(got["weights"][key], expected[key], rtol=0, atol=ATOL), \
                (world, key, float((got["weights"][key] - expected[key]).abs().max()))
        if zero_stage == 0:
            # The gradient the optimizer stepped with is the one at w + e, at its true scale (2x off would fail).
            assert got["grads"].keys() == expected_grads.keys()
            for key, want in expected_grads.items():
                assert torch.allclose(got["grads"][key], want, rtol=1e-4, atol=1e-7), \
                    (world, key, float((got["grads"][key] - want).abs().max()))
                # and it is not the plain gradient at w: SAM's perturbation moved it
            assert max(float((expected_grads[k] - plain_grads[k]).abs().max()) for k in expected_grads) > 1e-3


def test_perturbed_weights_are_rounded_once():
    """bf16 has 8 significant bits: at 1.0 its spacing is 2^-7, so 1 + (2^-8 + 1e-6) is nearer 1 + 2^-7. Rounding e
    to bf16 first (2^-8 exactly: 1e-6 is below its spacing there) and then the sum gives a tie, which rounds to even,
    1.0: the perturbation would be lost."""
    from forgetray.methods.sam import perturbed

    w = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    e = torch.tensor([2.0**-8 + 1e-6, 0.25], dtype=torch.float32)
    got = perturbed(w, e)
    assert got.dtype == torch.bfloat16
    assert got.tolist() == [1.0 + 2.0**-7, -1.75]
    assert (w + e.to(torch.bfloat16)).tolist() == [1.0, -1.75]  # the in-place bf16 sum this avoids
    # an fp32 master weight, the result in the model's bf16: the same single rounding
    assert perturbed(w.float(), e, torch.bfloat16).tolist() == [1.0 + 2.0**-7, -1.75]
    # float64 stays float64 (no float32 step): 1 + 1e-12 survives
    w64 = torch.tensor([1.0], dtype=torch.float64)
    assert perturbed(w64, torch.tensor([1e-12], dtype=torch.float64)).item() == 1.0 + 1e-12
    assert perturbed(w64, torch.tensor([1e-12], dtype=torch.float64), torch.float32).dtype == torch.float32


def test_perturbation_norm_runs_over_every_parameter_and_keeps_wide_dtypes():
    # g = ([1, 2], [[2], [4]]) -> ||g||^2 = 1 + 4 + 4 + 16 = 25; e = rho g / 5, each in its parameter's dtype
    params = [torch.zeros(2, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.bfloat16)]
    grads = [torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([[2.0], [4.0]], dtype=torch.bfloat16)]
    e = perturbation(params, grads, rho=1.0)
    assert e[0].dtype == torch.float64 and e[1].dtype == torch.float32  # float32 at least, wider kept
    assert e[0].tolist() == pytest.approx([0.2, 0.4], abs=1e-12)
    assert e[1].shape == (2, 1) and e[1].flatten().tolist() == pytest.approx([0.4, 0.8], abs=1e-7)
    # ASAM over two tensors: |w| g = (1 * 3, -2 -> 2 * 4 = 8) and (0.5 * 2 = 1): norm sqrt(9 + 64 + 1) = sqrt(74);
    # e = rho w^2 g / sqrt(74)
    params = [torch.tensor([1.0, -2.0]), torch.tensor([0.5])]
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([2.0])]
    e = perturbation(params, grads, rho=3.0, adaptive=True)
    assert e[0].tolist() == pytest.approx([3.0 * 3.0 / math.sqrt(74), 3.0 * 16.0 / math.sqrt(74)], rel=1e-6)
    assert e[1].tolist() == pytest.approx([3.0 * 0.5 / math.sqrt(74)], rel=1e-6)
    with pytest.raises(ValueError, match="2 parameters but 1 gradients"):
        perturbation(params, grads[:1], rho=1.0)
    with pytest.raises(ValueError, match="rho must be >= 0, got -1.0"):
        perturbation(params, grads, rho=-1.0)


def test_a_vanishing_gradient_gives_a_finite_step_no_longer_than_rho():
    """The guard is added to the norm: a gradient of norm 1e-12 (the guard's size) gives half the radius, never an
    infinite or overlong step (a guard subtracted would divide by zero here)."""
    for adaptive in (False, True):
        e = perturbation([torch.ones(1, dtype=torch.float64)], [torch.full((1,), 1e-12, dtype=torch.float64)],
                         rho=1.0, adaptive=adaptive)
        assert e[0].item() == pytest.approx(0.5, rel=1e-9)
