"""The per-rank context of a trial's phases (`RankContext`) and the helpers the phase recipes share with the worker
function: a leaf below `forgetray.train.worker` (which builds the context and runs the phases), `forgetray.train.ift`
and `forgetray.train.restore` (the recipes), so those import it and not the worker module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from forgetray.data import rehearsal
from forgetray.data.instruct import tokenize_dataset
from forgetray.models import load_model
from forgetray.plan import Phase
from forgetray.spec import TrialConfig
from forgetray.train.deepspeed_config import deepspeed_config
from forgetray.train.engine import zero3_scope

# Test hook: if this names a file that does not exist yet, the worker creates it and fails once after the given
# epoch's checkpoint ("path:epoch", or "path:epoch:seed" for the trial of that seed only). Lets tests exercise
# restart-from-checkpoint without mocking Ray.
FAIL_ONCE_ENV = "FORGETRAY_FAIL_ONCE"


@dataclass
class RankContext:
    """What every phase of this rank needs: the trial (a member of the Ray Train run), its resolved sources and
    folders, rank and device, the checkpoint the run resumes from; reports to Ray Train as that member."""

    trial: TrialConfig
    resolved: dict
    dirs: dict  # DIRS: the trial's folder and the sweep's shared ones (plain paths)
    rank: int
    world: int
    device: torch.device
    # The checkpoint this Ray Train run resumes from (None on a first start), taken once when the worker starts:
    # later in the run `ray.train.get_checkpoint()` may return a checkpoint this run just reported, possibly before
    # rank 0's files are on storage, and a phase must not mistake its own group's progress for a resume point.
    resume: object = None
    control_reported: bool = False  # R_0's report goes into the trial's run once per Ray Train run
    member: int = 0  # which trial of the Ray Train run this is (its reports carry it)
    prefix: str = ""  # its checkpoints' folder in the run ("<trial key>/" when the run serves several trials)

    def report(self, metrics: dict, checkpoint=None, name: str | None = None) -> None:
        """`ray.train.report` of this member: the report says whose it is, its checkpoint goes to its folder."""
        import ray.train

        ray.train.report({**metrics, "member": self.member}, checkpoint=checkpoint,
                         checkpoint_dir_name=None if name is None else self.prefix + name)

    def engine_config(self, phase: Phase) -> dict:
        return deepspeed_config(phase, self.trial.zero_stage, self.trial.precision)

    def load(self, source: dict, phase: Phase):
        """(model, ZeRO-3 scope) of a resolved model source: under ZeRO-3 the weights are partitioned at load time
        while the scope lives, and it must outlive the engine, so the caller keeps it."""
        scope = zero3_scope(self.engine_config(phase)) if self.trial.zero_stage == 3 else None
        return load_model(source, self.trial.precision), scope

    def source(self, key: str) -> dict:
        """A resolved source by the plan's key ("dataset", "prior_datasets/<i>")."""
        name, _, index = key.partition("/")
        return self.resolved[name][int(index)] if index else self.resolved[name]

    def instructions(self, key: str, tokenizer) -> list[dict]:
        """Tokenized instruction data as plain lists of ids (the epoch loop indexes them thousands of times)."""
        source = self.source(key)
        data = tokenize_dataset(source, tokenizer, self.trial.max_length).to_list()
        if len(data) < self.trial.batch_size:
            raise ValueError(f"dataset {source['name']!r}: only {len(data)} examples keep response tokens within "
                             f"max_length={self.trial.max_length}, fewer than batch_size={self.trial.batch_size}")
        return data

    def training_set(self, phase: Phase, tokenizer) -> list[dict]:
        """The phase's instruction examples plus, with rehearsal, a replayed sample of the previous phase's."""
        own = self.instructions(phase.data.source, tokenizer)
        if not phase.data.rehearse:
            return own
        previous = self.instructions(phase.data.rehearse, tokenizer)
        return rehearsal.mix(own, previous, phase.methods.rehearsal_ratio, seed=self.trial.seed)


def start_weights(model) -> dict:
    """theta_0 for Wise-FT: a CPU copy of the weights the phase starts from."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def maybe_fail_once(epoch: int, seed: int) -> None:
    spec = os.environ.get(FAIL_ONCE_ENV)
    if not spec:
        return
    marker, at_epoch, *at_seed = spec.rsplit(":", 2) if spec.count(":") >= 2 else spec.rsplit(":", 1)
    if int(at_epoch) == epoch and (not at_seed or int(at_seed[0]) == seed) and not Path(marker).exists():
        Path(marker).write_text(f"failed once after epoch {epoch}\n")
        raise RuntimeError(f"{FAIL_ONCE_ENV}: injected failure after epoch {epoch}")
