"""The lr schedules (forgetray.train.schedule) on hand-computed values, and their wiring into the plan and spec."""

from __future__ import annotations

import pytest

from forgetray import plan as planning
from forgetray.spec import SpecError, TrialConfig
from forgetray.train.schedule import lr_factor


def test_step_schedule_decays_once_per_epoch():
    # 4 steps per epoch, decay 0.5: epoch 1 (steps 0-3) at 1, epoch 2 at 0.5, epoch 3 at 0.25
    assert [lr_factor(s, 12, 0, "step", 4, 0.5) for s in range(12)] == [1.0] * 4 + [0.5] * 4 + [0.25] * 4
    # CF's 0.85: the third epoch at 0.85^2 = 0.7225
    assert lr_factor(8, 12, 0, "step", 4, 0.85) == pytest.approx(0.7225)


def test_step_schedule_ignores_the_total():
    # A prefix of a longer run: the factors of a 1-epoch run are the first epoch's of a 3-epoch run.
    assert [lr_factor(s, 4, 0, "step", 4, 0.85) for s in range(4)] == \
        [lr_factor(s, 12, 0, "step", 4, 0.85) for s in range(4)]
    assert lr_factor(7, 100, 0, "constant") == lr_factor(7, 8, 0, "constant") == 1.0


def test_step_schedule_after_warmup_and_its_errors():
    # warm-up 2 steps: 1/2, 1; then the epoch index of the step itself (step 4 is epoch 2's first)
    assert [lr_factor(s, 8, 2, "step", 4, 0.5) for s in range(6)] == [0.5, 1.0, 1.0, 1.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr_factor(0, 8, 0, "step")
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor(0, 8, 0, "linear")


def test_lr_decay_reaches_the_ift_optimizer_and_is_validated():
    trial = TrialConfig(lr_schedule="step", lr_decay=0.85, warmup_ratio=0.0)
    ift = planning.ift_phase(trial)
    assert (ift.optimizer.schedule, ift.optimizer.lr_decay) == ("step", 0.85)
    assert planning.Phase.from_dict(ift.to_dict()) == ift
    assert ift.params()["ift.optimizer.lr_decay"] == 0.85
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(SpecError, match="lr_decay"):
            TrialConfig(lr_decay=bad)
