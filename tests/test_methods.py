"""Anti-forgetting methods (docs/methods.md §6): Wise-FT interpolation (state dicts and HF model directories) and
rehearsal sampling."""

from __future__ import annotations

import json
import math

import pytest
import torch

from forgetray.data.rehearsal import mix, replay_count, replay_indices
from forgetray.methods.wiseft import interpolate_model_dirs, interpolate_state_dicts

# --------------------------------------------------------------------------------------------------------------------
# Wise-FT on state dicts


def test_interpolate_by_hand():
    theta0 = {"w": torch.tensor([0.0, 2.0]), "b": torch.tensor([[1.0], [-1.0]])}
    theta1 = {"w": torch.tensor([4.0, 6.0]), "b": torch.tensor([[3.0], [1.0]])}
    out = interpolate_state_dicts(theta0, theta1, 0.25)
    assert list(out) == ["w", "b"]
    assert torch.equal(out["w"], torch.tensor([1.0, 3.0]))  # 0.75*0 + 0.25*4, 0.75*2 + 0.25*6
    assert torch.equal(out["b"], torch.tensor([[1.5], [-0.5]]))
    assert torch.equal(interpolate_state_dicts(theta0, theta1, 0.5)["w"], torch.tensor([2.0, 4.0]))
    # inputs untouched
    assert torch.equal(theta0["w"], torch.tensor([0.0, 2.0])) and torch.equal(theta1["w"], torch.tensor([4.0, 6.0]))


def test_alpha_endpoints_are_exact():
    g = torch.Generator().manual_seed(0)
    theta0 = {"w": torch.randn(5, 7, generator=g), "h": torch.randn(3, generator=g).to(torch.bfloat16)}
    theta1 = {"w": torch.randn(5, 7, generator=g), "h": torch.randn(3, generator=g).to(torch.bfloat16)}
    at0, at1 = interpolate_state_dicts(theta0, theta1, 0.0), interpolate_state_dicts(theta0, theta1, 1.0)
    for key in theta1:
        assert torch.equal(at0[key], theta0[key]) and at0[key].dtype == theta0[key].dtype
        assert torch.equal(at1[key], theta1[key]) and at1[key].dtype == theta1[key].dtype


def test_bf16_computed_in_fp32_and_cast_back():
    """Values worked out by hand where bf16 arithmetic (8 significant bits, rounding after every operation) gives a
    different answer from computing in float32 and rounding once at the end."""
    alpha = 0.3
    x = 255 / 128  # 1.9921875, the largest bf16 below 2 (in [1, 2) bf16 steps by 1/128)
    y = 205 / 2048  # 0.10009765625, the bf16 nearest 0.1 (in [1/16, 1/8) steps by 1/2048)
    t0 = torch.tensor([x, y, 1.0], dtype=torch.bfloat16)
    t1 = torch.tensor([x, y, 2.0], dtype=torch.bfloat16)
    out = interpolate_state_dicts({"w": t0}, {"w": t1}, alpha)["w"]
    assert out.dtype == torch.bfloat16
    # Interpolating a value with itself gives it back (float32 is far finer than a bf16 step). In bf16 it would not:
    # 0.7 x = 178.5 / 128 (a hair under, 0.7 not being exact) rounds to 178 / 128, 0.3 x = 153 / 256 fits, and their
    # sum 254.5 / 128 is a tie that rounds to even, 254 / 128 = 1.984375: one step low. Likewise y: 0.7 y = 143.5 /
    # 2048 and 0.3 y = 61.5 / 2048 sit on ties too and the bf16 sum ends at 206 / 2048, one step high.
    # Last: 0.7 * 1 + 0.3 * 2 = 1.3 = 166.4 / 128, whose nearest bf16 is 166 / 128 = 1.296875.
    assert out.tolist() == [x, y, 1.296875]
    # float64 inputs are computed in float64: 1 + 2^-40 does not survive float32 (it rounds to 1), so half of it
    # would come out as exactly 0.5.
    d0 = torch.tensor([0.0, 1.0], dtype=torch.float64)
    d1 = torch.tensor([1.0 + 2.0**-40, 3.0], dtype=torch.float64)
    out64 = interpolate_state_dicts({"w": d0}, {"w": d1}, 0.5)["w"]
    assert out64.dtype == torch.float64
    assert out64.tolist() == [0.5 + 2.0**-41, 2.0]


def test_output_dtype_follows_theta1():
    out = interpolate_state_dicts({"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([4.0, 6.0]).half()}, 0.25)
    assert out["w"].dtype == torch.float16 and torch.equal(out["w"], torch.tensor([1.0, 3.0]).half())


def test_int_buffers_pass_through_from_theta1():
    theta0 = {"w": torch.tensor([0.0]), "step": torch.tensor([3]), "mask": torch.tensor([True, False])}
    theta1 = {"w": torch.tensor([2.0]), "step": torch.tensor([7]), "mask": torch.tensor([False, False])}
    for alpha in (0.0, 0.5, 1.0):
        out = interpolate_state_dicts(theta0, theta1, alpha)
        assert out["step"] is theta1["step"] and out["mask"] is theta1["mask"]
    assert torch.equal(interpolate_state_dicts(theta0, theta1, 0.5)["w"], torch.tensor([1.0]))


def test_key_mismatch_names_the_key():
    w = torch.zeros(2)
    with pytest.raises(ValueError, match="missing from theta0, first 'lm_head.weight'"):
        interpolate_state_dicts({"embed.weight": w}, {"embed.weight": w, "lm_head.weight": w}, 0.5)
    with pytest.raises(ValueError, match="not in theta1, first 'extra'"):
        interpolate_state_dicts({"embed.weight": w, "extra": w}, {"embed.weight": w}, 0.5)


def test_shape_mismatch_names_key_and_shapes():
    with pytest.raises(ValueError, match=r"'layer\.w'.*\[2, 3\].*\[3, 2\]"):
        interpolate_state_dicts({"layer.w": torch.zeros(2, 3)}, {"layer.w": torch.zeros(3, 2)}, 0.5)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match="alpha"):
        interpolate_state_dicts({"w": torch.zeros(1)}, {"w": torch.zeros(1)}, alpha)


# --------------------------------------------------------------------------------------------------------------------
# Wise-FT on Hugging Face model directories


def _tiny_llama(seed: int, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms initialise to ones in both models: make every tensor differ
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wiseft")
    m0, m1 = _tiny_llama(0), _tiny_llama(1)
    dirs = {"m0": root / "m0", "m0_sharded": root / "m0-sharded", "m1": root / "m1", "m1_sharded": root / "m1-sharded",
            "m0_3layers": root / "m0-3layers"}
    m0.save_pretrained(dirs["m0"])
    m0.save_pretrained(dirs["m0_sharded"], max_shard_size="20KB")
    m1.save_pretrained(dirs["m1"])
    m1.save_pretrained(dirs["m1_sharded"], max_shard_size="20KB")
    _tiny_llama(2, layers=3).save_pretrained(dirs["m0_3layers"])
    for key in ("m1", "m1_sharded"):  # a non-weight file that must travel with the output
        (dirs[key] / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    params = {"m0": {k: v.detach().clone() for k, v in m0.named_parameters()},
              "m1": {k: v.detach().clone() for k, v in m1.named_parameters()}}
    return dirs, params


@pytest.mark.parametrize("src0,src1", [("m0", "m1"), ("m0_sharded", "m1_sharded"), ("m0", "m1_sharded")])
def test_interpolate_model_dirs(model_dirs, tmp_path, src0, src1):
    from transformers import LlamaForCausalLM

    dirs, params = model_dirs
    alpha = 0.3
    out = interpolate_model_dirs(dirs[src0], dirs[src1], alpha, tmp_path / "out")
    assert out == tmp_path / "out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left behind

    in_names = sorted(p.name for p in dirs[src1].iterdir())
    assert sorted(p.name for p in out.iterdir()) == in_names
    shards = [n for n in in_names if n.endswith(".safetensors")]
    if src1 == "m1_sharded":
        assert len(shards) >= 2 and "model.safetensors.index.json" in in_names
    for name in in_names:
        if not name.endswith(".safetensors"):
            assert (out / name).read_bytes() == (dirs[src1] / name).read_bytes(), name

    from safetensors import safe_open

    with safe_open(str(out / shards[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}

    model = LlamaForCausalLM.from_pretrained(out)
    got = dict(model.named_parameters())
    assert set(got) == set(params["m1"])
    for key, p in got.items():
        expected = (1 - alpha) * params["m0"][key] + alpha * params["m1"][key]
        assert p.dtype == torch.float32
        assert torch.allclose(p.detach(), expected, atol=1e-6, rtol=0), key


def test_interpolate_model_dirs_mismatch_leaves_nothing(model_dirs, tmp_path):
    dirs, _ = model_dirs
    with pytest.raises(ValueError, match="model.layers.2"):
        interpolate_model_dirs(dirs["m0_3layers"], dirs["m1"], 0.5, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_interpolate_model_dirs_failure_mid_write_leaves_nothing(model_dirs, tmp_path, monkeypatch):
    import forgetray.methods.wiseft as wiseft

    dirs, _ = model_dirs
    calls = []

    def failing(theta0, theta1, alpha):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return interpolate_state_dicts(theta0, theta1, alpha)

    monkeypatch.setattr(wiseft, "interpolate_state_dicts", failing)
    with pytest.raises(RuntimeError, match="boom"):
        interpolate_model_dirs(dirs["m0_sharded"], dirs["m1_sharded"], 0.5, tmp_path / "out")
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_interpolate_model_dirs_refuses_existing_output(model_dirs, tmp_path):
    dirs, _ = model_dirs
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        interpolate_model_dirs(dirs["m0"], dirs["m1"], 0.5, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


# --------------------------------------------------------------------------------------------------------------------
# Rehearsal


@pytest.mark.parametrize("n,ratio,expected", [
    (52002, 0.01, 520),  # Alpaca, the default ratio: 520.02 -> 520
    (52002, 0.0, 0),
    (0, 0.5, 0),
    (10, 0.01, 1),  # 0.1 -> at least one
    (1, 0.001, 1),
    (100, 0.005, 1),  # exactly 0.5 -> half up
    (100, 0.015, 2),  # exactly 1.5 -> 2
    (100, 0.025, 3),  # exactly 2.5 -> 3 (not banker's 2)
    (1000, 0.0014, 1),  # 1.4 -> 1
    (1000, 0.0016, 2),  # 1.6 -> 2
    (7, 1.0, 7),
    (7, 0.5, 4),  # 3.5 -> 4
])
def test_replay_count_table(n, ratio, expected):
    assert replay_count(n, ratio) == expected
    assert len(replay_indices(n, ratio, seed=0)) == expected


@pytest.mark.parametrize("ratio", [-0.01, 1.01, float("nan")])
def test_replay_count_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        replay_count(100, ratio)


def test_replay_indices_deterministic_sorted_distinct():
    a, b = replay_indices(1000, 0.1, seed=3), replay_indices(1000, 0.1, seed=3)
    c = replay_indices(1000, 0.1, seed=4)
    assert a == b and a != c
    assert len(a) == 100 and len(set(a)) == 100 and a == sorted(a)
    assert all(isinstance(i, int) and 0 <= i < 1000 for i in a)
    assert replay_indices(5, 1.0, seed=9) == [0, 1, 2, 3, 4]


def test_mix_length_and_content():
    current = [f"cur{i}" for i in range(30)]
    previous = [f"prev{i:03d}" for i in range(200)]  # zero-padded: string order is index order
    out = mix(current, previous, 0.05, seed=0)
    assert len(out) == 40  # 30 current + round(0.05 * 200) = 10 replayed
    assert out[:30] == current
    replayed = out[30:]
    assert set(replayed) <= set(previous) and len(set(replayed)) == 10
    assert replayed == sorted(replayed)  # in index order
    assert set(replayed) != {f"prev{i:03d}" for i in range(10)}  # a sample, not the first ten
    assert mix(current, previous, 0.05, seed=0) == out
    assert mix(current, previous, 0.05, seed=1)[30:] != replayed  # the seed picks the sample
    # all of the earlier data at ratio 1, none at ratio 0 or without earlier data
    assert mix(["c"], ["p0", "p1", "p2"], 1.0, seed=7) == ["c", "p0", "p1", "p2"]
    assert mix(current, previous, 0.0, seed=0) == current
    assert mix(current, [], 0.5, seed=0) == current


def test_mix_samples_every_earlier_example_equally_often():
    """3 of 10 earlier examples per seed: over 3000 seeds each is replayed about 900 times (binomial sd ~ 25)."""
    previous = list(range(10))
    counts = [0] * 10
    for seed in range(3000):
        replayed = mix([], previous, 0.3, seed=seed)
        assert len(replayed) == 3 and len(set(replayed)) == 3
        for item in replayed:
            counts[item] += 1
    assert all(abs(c - 900) < 130 for c in counts), counts


def test_interpolate_model_dirs_writes_beside_out_dir_into_new_parents(model_dirs, tmp_path, monkeypatch):
    """The output is assembled in a hidden temporary directory next to `out_dir` (same file system: the final rename
    is atomic), whose missing parents are created; an empty `out_dir` is taken over."""
    import forgetray.methods.wiseft as wiseft

    dirs, params = model_dirs
    out = tmp_path / "a" / "b" / "out"
    seen = []

    def spying(theta0, theta1, alpha):
        seen.append(sorted(p.name for p in out.parent.iterdir()))
        return interpolate_state_dicts(theta0, theta1, alpha)

    monkeypatch.setattr(wiseft, "interpolate_state_dicts", spying)
    assert interpolate_model_dirs(dirs["m0"], dirs["m1"], 1.0, out) == out
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].startswith(".out.wiseft-")
    assert [p.name for p in out.parent.iterdir()] == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    interpolate_model_dirs(dirs["m0"], dirs["m1"], 0.0, empty)
    assert (empty / "model.safetensors").is_file()


def test_interpolate_model_dirs_errors_name_what_is_wrong(model_dirs, tmp_path):
    dirs, _ = model_dirs
    with pytest.raises(FileNotFoundError, match=f"^model directory not found: {tmp_path / 'nope'}$"):
        interpolate_model_dirs(tmp_path / "nope", dirs["m1"], 0.5, tmp_path / "out")
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(FileNotFoundError, match=r"bare: no model.safetensors or model.safetensors.index.json \(only "
                                                r"safetensors checkpoints are supported\)$"):
        interpolate_model_dirs(bare, dirs["m1"], 0.5, tmp_path / "out")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match=f"^output directory already exists and is not empty: {a_file}$"):
        interpolate_model_dirs(dirs["m0"], dirs["m1"], 0.5, a_file)


def test_interpolate_model_dirs_shape_mismatch_names_the_key(tmp_path):
    from safetensors.torch import save_file

    for name, shape in (("d0", (2, 3)), ("d1", (3, 2))):
        (tmp_path / name).mkdir()
        save_file({"w": torch.zeros(shape), "b": torch.zeros(2)}, str(tmp_path / name / "model.safetensors"))
    with pytest.raises(ValueError, match=r"^shape mismatch for 'w': theta0 \[2, 3\] vs theta1 \[3, 2\]$"):
        interpolate_model_dirs(tmp_path / "d0", tmp_path / "d1", 0.5, tmp_path / "out")


def test_alpha_endpoints_return_the_input_tensors_themselves():
    """The documented identity at the endpoints: alpha = 1 returns theta1's tensors, alpha = 0 theta0's (same dtype)
    or theta0's cast to theta1's dtype, never a recomputed (1 - a) * t0 + a * t1 (which would turn -0.0 + 0 * inf
    into nan, or 0 * nan into nan)."""
    theta0 = {"w": torch.tensor([1.0, -0.0]), "d": torch.tensor([0.25, 1.0 + 2.0**-40], dtype=torch.float64)}
    theta1 = {"w": torch.tensor([math.inf, math.nan]), "d": torch.tensor([0.5, 2.0])}
    at1 = interpolate_state_dicts(theta0, theta1, 1.0)
    assert at1["w"] is theta1["w"] and at1["d"] is theta1["d"]
    at0 = interpolate_state_dicts(theta0, theta1, 0.0)
    assert at0["w"] is theta0["w"]
    assert at0["d"].dtype == torch.float32 and at0["d"].tolist() == [0.25, 1.0]  # cast to theta1's float32


def test_wiseft_errors_by_message():
    w = torch.zeros(2)
    with pytest.raises(ValueError, match=r"^alpha must be a number in \[0, 1\], got 'half'$"):
        interpolate_state_dicts({"w": w}, {"w": w}, "half")
    with pytest.raises(ValueError, match=r"^theta0 and theta1 have different keys \(different architectures, or tied "
                                         r"weights saved in one model only\): 1 key\(s\) of theta1 missing from "
                                         r"theta0, first 'b'; 2 key\(s\) of theta0 not in theta1, first 'c'$"):
        interpolate_state_dicts({"a": w, "c": w, "d": w}, {"a": w, "b": w}, 0.5)


def test_interpolate_model_dirs_copies_subdirectories_of_dir1(model_dirs, tmp_path):
    import shutil

    dirs, _ = model_dirs
    dir1 = tmp_path / "m1"
    shutil.copytree(dirs["m1"], dir1)
    (dir1 / "tokenizer").mkdir()
    (dir1 / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    out = interpolate_model_dirs(dirs["m0"], dir1, 0.5, tmp_path / "out")
    assert (out / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
