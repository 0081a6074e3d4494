"""Checkpoints that fit (README "Checkpoints and storage"): which checkpoints keep DeepSpeed state, the storage
formula by hand, and a real sweep that resumes exactly from the one state it kept."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from forgetray.spec import SpecError, TrialConfig
from forgetray.train.checkpoints import drop_older_states, storage_per_trial


def test_settings_are_validated():
    assert TrialConfig().keep_optimizer_state == "latest" and TrialConfig().delete_finished_state is True
    with pytest.raises(SpecError, match="keep_optimizer_state.*one of"):
        TrialConfig(keep_optimizer_state="newest")
    with pytest.raises(SpecError, match="delete_finished_state=False"):
        TrialConfig(keep_optimizer_state="all")  # every state would be deleted when the phase finishes
    with pytest.raises(SpecError, match="delete_finished_state.*bool"):
        TrialConfig(delete_finished_state="no")
    assert TrialConfig(keep_optimizer_state="all", delete_finished_state=False).keep_optimizer_state == "all"


def test_storage_per_trial_by_hand():
    n = 1e9  # parameters
    # bf16, ZeRO-3, 10 epochs, every epoch restored, everything kept (what forgetray did before): every checkpoint
    # holds its bf16 model (2 B/param) and 12 B/param of optimizer state (fp32 master + m + v); ZeRO-3 keeps no
    # other copy of the weights in its state.
    before = storage_per_trial(n, 10, 10, "bf16", 3, "all", False)
    assert before["ift_models"] == 10 * 2 * n and before["ift_states"] == 10 * 12 * n
    assert before["restored_models"] == 10 * 2 * n and before["restored_states"] == 10 * 12 * n
    assert before["total"] == before["peak"] == 280 * n
    after = storage_per_trial(n, 10, 10, "bf16", 3)
    assert after["ift_states"] == after["restored_states"] == 0 and after["total"] == 40 * n
    assert after["peak"] == 20 * n + 2 * 12 * n  # during IFT: the models so far + the newest two states
    # ZeRO-2 keeps DeepSpeed's own bf16 copy of the weights too: 12 + 2 + 2 = 16 B/param an epoch (issue 10)
    zero2 = storage_per_trial(n, 10, 0, "bf16", 2, "all", False)
    assert zero2["total"] == 10 * 16 * n
    # keep the newest state, delete nothing: one IFT state and every restoration's stay
    latest = storage_per_trial(n, 10, 10, "bf16", 3, "latest", False)
    assert latest["ift_states"] == 12 * n and latest["restored_states"] == 10 * 12 * n
    assert storage_per_trial(n, 2, 0, "fp32", 0, "all", False)["total"] == 2 * (4 + 12 + 4) * n


def test_drop_older_states_keeps_models_and_probes(tmp_path):
    for epoch in (1, 2, 3, 4):
        ckpt = tmp_path / f"epoch_{epoch:03d}"
        for sub in ("deepspeed/state", "model", "probes"):
            (ckpt / sub).mkdir(parents=True)
        (ckpt / "deepspeed" / "state" / "optim_states.pt").write_bytes(b"x")
        (ckpt / "model" / "model.safetensors").write_bytes(b"x")
        (ckpt / "state.json").write_text(json.dumps({"epoch": epoch}))
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's own files are not touched
    # Epoch 3 was just recorded; epoch 4 is already on storage (the workers train on while the controller records
    # a report): it keeps its state, which the next resume needs. (Deleting it was a bug the sweep test caught.)
    assert drop_older_states(tmp_path / "epoch_003") == ["epoch_001", "epoch_002"]
    assert [p.parent.name for p in sorted(tmp_path.glob("*/deepspeed"))] == ["epoch_003", "epoch_004"]
    assert (tmp_path / "epoch_003" / "deepspeed" / "state" / "optim_states.pt").is_file()
    assert len(list(tmp_path.glob("epoch_*/model/model.safetensors"))) == 4 and len(list(tmp_path.glob(
        "epoch_*/probes"))) == 4
    assert drop_older_states(tmp_path / "epoch_003") == []
    assert drop_older_states(tmp_path / "epoch_004") == ["epoch_003"]


def _sweep_run(tmp_path, name, fixture_files, **settings):
    from forgetray import Sweep, run

    uri = f"sqlite:///{tmp_path / f'{name}.db'}"
    sweep = Sweep(name, model=str(fixture_files["model"]), dataset=str(fixture_files["dataset"]), epochs=3,
                  lr=3e-3, batch_size=8, workers=1, zero_stage=2, max_length=256,
                  benchmarks=[str(fixture_files["benchmark"])], probe_set=str(fixture_files["probe_set"]),
                  probe_passages=16, **settings)
    table = run(sweep, tracking_uri=uri, storage=tmp_path / name)
    assert table.attrs["failed_trials"] == 0
    (trial_dir,) = (tmp_path / name).glob(f"{name}/*/trials/*")
    return uri, trial_dir


@pytest.mark.slow
def test_resume_from_the_only_state_kept_is_exact(tmp_path, fixture_files, ray_session):
    from mlflow.tracking import MlflowClient
    from safetensors import safe_open

    from forgetray.train.worker import FAIL_ONCE_ENV

    import ray

    marker = tmp_path / "failed-once"
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "OMP_NUM_THREADS")}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {**env, FAIL_ONCE_ENV: f"{marker}:2"}})
    # Interrupted after epoch 2's checkpoint (the hook fails once: the marker then exists); its state is kept at
    # the end to be inspected.
    uri, trial_dir = _sweep_run(tmp_path, "interrupted", fixture_files, delete_finished_state=False)
    assert marker.exists(), "the injected failure did not happen"
    # The reference: uninterrupted (the marker exists), default settings (no DeepSpeed state left at the end).
    ref_uri, ref_dir = _sweep_run(tmp_path, "reference", fixture_files)

    epochs = [trial_dir / "ift" / f"epoch_{e:03d}" for e in (1, 2, 3)]
    # Only the newest checkpoint holds DeepSpeed state: the restart resumed from epoch 2's (epoch 1's was already
    # gone when it failed: had the pruning taken the wrong one, the restart could not have loaded it).
    assert [(c / "deepspeed").exists() for c in epochs] == [False, False, True]
    assert list((epochs[2] / "deepspeed" / "state").glob("*optim_states.pt")), "the optimizer state is missing"
    assert not list((ref_dir / "ift").glob("epoch_*/deepspeed")), "a finished phase kept its DeepSpeed state"
    for ckpt in epochs + sorted((ref_dir / "ift").glob("epoch_*")):
        assert (ckpt / "probes" / "bench.parquet").is_file() and (ckpt / "state.json").is_file()
        with safe_open(str(ckpt / "model" / "model.safetensors"), "pt") as f:  # the training dtype (fp32 on CPU)
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    # Ray Train's own bookkeeping still lists every epoch (every model stays for restoration).
    snapshot = json.loads((trial_dir / "ift" / "checkpoint_manager_snapshot.json").read_text())
    assert len(snapshot["checkpoint_results"]) == 3

    # The resumed run's metrics and final weights equal the uninterrupted run's.
    def history(tracking_uri):
        client = MlflowClient(tracking_uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        (run,) = [r for r in runs if r.data.tags.get("forgetray.kind") == "trial"]
        names = ("train/loss", "sft/bench/acc", "sft/bench/letter_acc", "sft/probe/ppl", "train/lr")
        return {n: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, n),
                                                       key=lambda m: m.step)] for n in names}

    mine, reference = history(uri), history(ref_uri)
    for name, values in reference.items():
        assert [s for s, _ in mine[name]] == [1, 2, 3], name  # each epoch logged once, also after the restart
        assert [v for _, v in mine[name]] == pytest.approx([v for _, v in values], rel=1e-6, abs=1e-9), name
    final, ref_final = (Path(d) / "ift" / "epoch_003" / "model" / "model.safetensors" for d in (trial_dir, ref_dir))
    with safe_open(str(final), "pt") as a, safe_open(str(ref_final), "pt") as b:
        worst = max(float((a.get_tensor(k) - b.get_tensor(k)).abs().max()) for k in a.keys())
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run's by {worst}"


def test_readme_storage_table_is_the_functions():
    from forgetray.train.checkpoints import storage_table

    assert storage_table() in (Path(__file__).resolve().parents[1] / "README.md").read_text()
