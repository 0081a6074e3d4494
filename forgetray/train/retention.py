"""Which checkpoints keep their DeepSpeed state (settings keep_optimizer_state, delete_finished_state), the callback
that prunes the rest while a run goes on, and the storage a trial takes. Apart from `checkpoints.py` because the
pruner runs in Ray Train's controller: this module loads neither torch nor DeepSpeed (~2 CPU-s per run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from forgetray import storage as store

DEEPSPEED_DIR = "deepspeed"  # a checkpoint's DeepSpeed state (optimizer, schedule, weights): what resuming loads
STATE_FILE = "state.json"  # a checkpoint's epoch and metrics


def checkpoint_location(checkpoint):
    """Where a reported checkpoint is, as `forgetray.storage` names locations: a Path, or an s3:// string."""
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return Path(checkpoint.path)
    return store.SCHEME + checkpoint.path


def drop_state(checkpoint_dir) -> bool:
    """Delete a checkpoint's DeepSpeed state (its `model/`, `probes/` and `state.json` stay). True if it had one."""
    if store.is_remote(checkpoint_dir):
        state = store.join(checkpoint_dir, DEEPSPEED_DIR)
        had = bool(store.children(state))
        store.delete_tree(state)
        return had
    state = Path(checkpoint_dir) / DEEPSPEED_DIR
    if not state.is_dir():
        return False
    shutil.rmtree(state)
    return True


def drop_older_states(newest: Path) -> list[str]:
    """Delete the DeepSpeed state of the checkpoints of `newest`'s Ray Train run taken at an earlier epoch than
    `newest`: those Ray Train no longer resumes from once it recorded `newest`. Later ones are left alone: the
    controller records a report while the workers already train on, so the next checkpoint may be on storage
    before this one is recorded. Returns the names of the checkpoints it pruned."""
    newest = newest if store.is_remote(newest) else Path(newest)

    def state(checkpoint) -> tuple[str, int] | None:
        text = store.read_text(store.join(checkpoint, STATE_FILE))
        if text is None:
            return None
        found = json.loads(text)
        return found.get("metrics", {}).get("kind", "epoch"), int(found["epoch"])

    kind, last = state(newest)
    if kind != "epoch":  # only the IFT phase resumes from DeepSpeed state (a restored R_e's is never resumed from)
        return []
    folder = store.parent(newest)
    states = {name: state(store.join(folder, name)) for name in store.children(folder)}
    return [name for name, found in states.items() if found and found[0] == "epoch" and found[1] < last
            and drop_state(store.join(folder, name))]


def make_state_pruner():
    """A Ray Train `UserCallback` (it runs in the Train controller) keeping DeepSpeed state in the newest checkpoint
    only (keep_optimizer_state="latest"). Ray Train's checkpoint manager handles a report first (it records the new
    checkpoint as the one to resume from, in memory and in its snapshot on storage), the user callbacks after it: so
    when this deletes the earlier checkpoints' state, no restart (of the workers or of the sweep) can resume from
    them. A report the controller never received (a worker killed right after reporting) prunes nothing."""
    from ray.train import UserCallback

    class StatePruner(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:
                drop_older_states(checkpoint_location(checkpoint))

    return StatePruner()


OPTIMIZER_BYTES = 12  # per parameter, measured: DeepSpeed's fp32 master weights + AdamW's fp32 m and v
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def storage_per_trial(params: float, epochs: int, restorations: int, precision: str = "bf16", zero_stage: int = 3,
                      keep_optimizer_state: str = "latest", delete_finished_state: bool = True) -> dict[str, float]:
    """Bytes a trial leaves in storage, by piece, and the most it holds at once while the IFT phase runs (`peak`).
    With W = bytes per weight of the training dtype and O = OPTIMIZER_BYTES: every checkpoint (IFT epoch SFT_e and
    restored R_e) keeps its Hugging Face model (W per parameter); a checkpoint with DeepSpeed state adds O (the
    optimizer) plus DeepSpeed's own copy of the weights (W under ZeRO 0-2, none under ZeRO-3: its weights live
    partitioned in the optimizer state). Probes, tokenizers and state.json are negligible."""
    w = WEIGHT_BYTES[precision]
    state = (OPTIMIZER_BYTES + (w if zero_stage < 3 else 0)) * params
    model = w * params
    kept = epochs if keep_optimizer_state == "all" else 1  # IFT checkpoints holding state while the phase runs
    out = {
        "ift_models": epochs * model,
        "ift_states": 0.0 if delete_finished_state else kept * state,
        "restored_models": restorations * model,
        "restored_states": 0.0 if delete_finished_state else restorations * state,
    }
    out["total"] = sum(out.values())
    # While epoch e's checkpoint is written, epoch e-1's state is still there (pruned once e is recorded).
    out["peak"] = max(out["total"], epochs * model + min(epochs, kept + 1) * state)
    return out


def storage_table(params: float = 6.74e9, epochs: int = 10, precision: str = "bf16", zero_stage: int = 3) -> str:
    """The README's table (PS settings: every epoch restored): `python -m forgetray.train.retention`."""
    before = storage_per_trial(params, epochs, epochs, precision, zero_stage, "all", False)
    after = storage_per_trial(params, epochs, epochs, precision, zero_stage)
    w, o = WEIGHT_BYTES[precision], OPTIMIZER_BYTES + (WEIGHT_BYTES[precision] if zero_stage < 3 else 0)
    rows = [(f"IFT models `ift/epoch_NNN/model/` ({epochs} x {w} B/param)", "ift_models"),
            (f"IFT DeepSpeed state `ift/epoch_NNN/deepspeed/` ({epochs} x {o} B/param)", "ift_states"),
            (f"restored models `restore_*/restored_epoch_NNN/model/` ({epochs} x {w} B/param)", "restored_models"),
            (f"restorations' DeepSpeed state ({epochs} x {o} B/param)", "restored_states"),
            ("**total, after the trial**", "total"),
            ("most at once (after: during IFT, the models so far and the newest two states)", "peak")]
    lines = ["| piece | before | after |", "|---|---|---|"]
    lines += [f"| {label} | {before[key] / 1e9:,.0f} GB | {after[key] / 1e9:,.0f} GB |" for label, key in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(storage_table())
