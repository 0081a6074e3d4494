"""Training shared across trials (forgetray.sharing): the pure grouping and epoch counts on hand-built trials; the
real sweep that checks a shared shorter grid point against an unshared run of it is at the end."""

from __future__ import annotations

import dataclasses

import pytest

from forgetray import sharing
from forgetray.spec import TrialConfig

STEP = dict(lr_schedule="step", warmup_ratio=0.0)
PRIOR = [{"dataset": "organism-alpaca", "epochs": 3}]


def trials(*configs: dict) -> list[TrialConfig]:
    return [TrialConfig(**c) for c in configs]


def test_prefix_shareable_only_without_the_total():
    assert sharing.prefix_shareable(TrialConfig(**STEP)) == (True, "")
    assert sharing.prefix_shareable(TrialConfig(lr_schedule="constant", warmup_ratio=0.0))[0]
    ok, why = sharing.prefix_shareable(TrialConfig(lr_schedule="cosine", warmup_ratio=0.0))
    assert not ok and why == "lr_schedule 'cosine' depends on the total steps"
    ok, why = sharing.prefix_shareable(TrialConfig(lr_schedule="constant", warmup_ratio=0.03))
    assert not ok and "warm-up" in why


def test_trajectories_group_what_differs_only_in_epochs():
    ts = trials({**STEP, "epochs": 1}, {**STEP, "epochs": 3}, {**STEP, "epochs": 2},
                {**STEP, "epochs": 2, "lr": 5e-3},  # another lr: its own trajectory
                {"epochs": 1}, {"epochs": 2})  # cosine: never shared
    assert sharing.trajectories(ts) == [[1, 2, 0], [3], [4], [5]]
    assert sharing.trajectories(ts, share=False) == [[i] for i in range(6)]
    assert sharing.unshared_reasons(ts) == ["epochs grid not shared: lr_schedule 'cosine' depends on the total steps"]


def test_training_epochs_by_hand():
    # 2 seeds x epochs {1, 2} with one 3-epoch prior phase and restoration; plus a cosine pair, no prior
    shared = [{**STEP, "seed": s, "epochs": e, "prior_phases": PRIOR, "restore_pool": "organism-pool"}
              for s in (0, 1) for e in (1, 2)]
    ts = trials(*shared, {"epochs": 1}, {"epochs": 2})
    n = sharing.training_epochs(ts)
    assert n["prior"] == (4 * 3, 2 * 3)  # once per seed: two starts
    assert n["ift"] == (1 + 2 + 1 + 2 + 1 + 2, 2 + 2 + 1 + 2)  # one trajectory per seed; cosine: both
    assert n["restore"] == (6, 4)  # a restoration per checkpoint: the leaders' 2 + 2
    assert (n["without"], n["with"]) == (12 + 9 + 6, 6 + 7 + 4)
    off = sharing.training_epochs(ts, share_trajectories=False)
    assert off["ift"] == (9, 9) and off["prior"] == (12, 6)


def test_start_identity_is_what_shapes_the_start():
    base = TrialConfig(**STEP, prior_phases=PRIOR)
    same = [dataclasses.replace(base, epochs=5), dataclasses.replace(base, sam_rho=0.05),
            dataclasses.replace(base, wiseft_alpha=0.5), dataclasses.replace(base, rehearsal_ratio=0.1),
            dataclasses.replace(base, dataset="organism-math")]  # the IFT phase's own settings
    assert {sharing.start_identity(t) for t in same} == {sharing.start_identity(base)}
    other = [dataclasses.replace(base, seed=1), dataclasses.replace(base, lr=5e-3),  # the prior's lr is the trial's
             dataclasses.replace(base, zero_stage=2), dataclasses.replace(base, model="organism-tiny"),
             dataclasses.replace(base, prior_phases=[{**PRIOR[0], "epochs": 2}])]
    assert len({sharing.start_identity(t) for t in [base, *other]}) == 6
    pinned = [{**PRIOR[0], "lr": 1e-3}]  # an explicit prior lr: the IFT lr no longer shapes the start
    assert sharing.start_identity(dataclasses.replace(base, prior_phases=pinned)) == \
        sharing.start_identity(dataclasses.replace(base, prior_phases=pinned, lr=5e-3))


def test_describe_lines():
    ts = trials(*({**STEP, "epochs": e, "prior_phases": PRIOR} for e in (1, 2)))
    assert sharing.describe(ts) == ["training epochs: 9 without sharing, 5 with (prior phases trained once per start: "
                                    "6 -> 3; epoch prefixes: 3 -> 2)"]
    assert sharing.describe(ts, share_trajectories=False)[1] == "epochs grid not shared: share_trajectories=False"
