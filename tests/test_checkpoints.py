"""Checkpoints that fit (README "Checkpoints and storage"): which checkpoints keep DeepSpeed state, the storage
formula by hand. A real sweep resuming exactly from the one state it kept is test_faults.py's worker-kill test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forgetray.spec import SpecError, TrialConfig
from forgetray.train.retention import drop_older_states, storage_per_trial


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


def _checkpoint(path, kind: str, epoch: int, state: bool = True):
    from ray.train import Checkpoint

    if state:
        (path / "deepspeed" / "state").mkdir(parents=True)
    path.mkdir(exist_ok=True)
    (path / "state.json").write_text(json.dumps({"epoch": epoch, "metrics": {"kind": kind, "epoch": epoch}}))
    return Checkpoint.from_directory(str(path))


def test_one_run_of_ift_and_its_restorations_resumes_from_either_kind(tmp_path):
    """restore_group=0: the IFT phase's Ray Train run also reports R_e. A restart resumes from the newest
    checkpoint of either kind: the IFT phase counts only its own epochs, a restoration only restored ones; and the
    state pruner never touches an IFT state on a restoration's report (nor prunes restorations' states)."""
    from forgetray.train.checkpoints import checkpoint_epoch

    sft = [_checkpoint(tmp_path / f"epoch_{e:03d}", "epoch", e, state=e == 3) for e in (1, 2, 3)]
    restored = _checkpoint(tmp_path / "restored_epoch_002", "restored", 2)
    assert [checkpoint_epoch(c) for c in (*sft, restored)] == [1, 2, 3, 2]
    assert checkpoint_epoch(sft[2], "epoch") == 3 and checkpoint_epoch(sft[2], "restored") == 0
    assert checkpoint_epoch(restored, "restored") == 2 and checkpoint_epoch(restored, "epoch") == 0
    # R_2 reported after SFT_3: epoch 2 < 3, yet nothing is pruned (SFT_3's state is the IFT phase's newest)
    assert drop_older_states(tmp_path / "restored_epoch_002") == []
    assert (tmp_path / "epoch_003" / "deepspeed").is_dir() and (tmp_path / "restored_epoch_002" / "deepspeed").is_dir()


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


def test_readme_storage_table_is_the_functions():
    from forgetray.train.retention import storage_table

    assert storage_table() in (Path(__file__).resolve().parents[1] / "README.md").read_text()
