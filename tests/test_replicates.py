"""Replicates as a first-class axis (docs/methods.md §10): the `Sweep(replicates=n)` API, and the pooled stage rule
(`forgetray.metrics.pooled`) on constructed outcomes against hand computations. The report's pooled table and band
figures are tested in tests/test_report.py."""

from __future__ import annotations

import numpy as np
import pytest

from forgetray import Sweep, TrialConfig, grid, replicate_group
from forgetray.cli import load_sweep
from forgetray.grids import parse_override
from forgetray.metrics.pooled import ReplicateOutcome, classify_pooled, pooled_mcnemar, transition_summary
from forgetray.metrics.stage import classify_checkpoint
from forgetray.spec import SpecError

# --- the API --------------------------------------------------------------------------------------------------------


def test_replicates_run_each_grid_point_with_consecutive_seeds():
    sweep = Sweep("r", epochs=grid([1, 2]), seed=5, replicates=3)
    assert sweep.size == 6 and sweep.replicates == 3
    assert [(t.epochs, t.seed) for t in sweep.trials] == [(1, 5), (1, 6), (1, 7), (2, 5), (2, 6), (2, 7)]
    groups = sweep.replicate_groups
    assert list(groups.values()) == [sweep.trials[:3], sweep.trials[3:]]
    assert list(groups) == [replicate_group(TrialConfig(epochs=1)), replicate_group(TrialConfig(epochs=2))]
    assert sweep.axes == {"epochs": (1, 2)}  # the hidden seed axis is not one of the user's axes
    assert sweep.to_dict()["replicates"] == 3


def test_replicates_are_the_trials_a_seed_grid_gives():
    """Same configs and config hashes (so the same runs and checkpoints); only the declaration differs: the seed grid's
    trials are independent (no replicate groups), the replicates' are pooled."""
    replicated = Sweep("r", lr=grid([1e-3, 2e-3]), seed=0, replicates=3)
    seeds = Sweep("s", lr=grid([1e-3, 2e-3]), seed=grid([0, 1, 2]))
    assert sorted(t.config_hash() for t in replicated.trials) == sorted(t.config_hash() for t in seeds.trials)
    assert seeds.replicate_groups == {} and seeds.replicates == 1
    assert len(replicated.replicate_groups) == 2


def test_replicate_group_is_the_config_hash_without_the_seed():
    a, b = TrialConfig(seed=0), TrialConfig(seed=9)
    assert a.config_hash() != b.config_hash() and replicate_group(a) == replicate_group(b)
    assert replicate_group(TrialConfig(lr=2e-3)) != replicate_group(a)
    assert len(replicate_group(a)) == 10


@pytest.mark.parametrize("kwargs, message", [
    ({"replicates": 0}, "replicates must be an int >= 1"),
    ({"replicates": -2}, "replicates must be an int >= 1"),
    ({"replicates": True}, "replicates must be an int >= 1"),
    ({"replicates": 2.0}, "replicates must be an int >= 1"),
    ({"replicates": "3"}, "replicates must be an int >= 1"),
    ({"replicates": 3, "seed": grid([0, 10])}, "give 'seed' one value"),
])
def test_bad_replicates_are_one_clear_error(kwargs, message):
    with pytest.raises(SpecError, match=message):
        Sweep("r", **kwargs)


def test_set_replicates_on_the_command_line(tmp_path):
    file = tmp_path / "sweep.py"
    file.write_text("from forgetray import Sweep, grid\nsweep = Sweep('cli', epochs=grid([1, 2]), seed=3)\n")
    sweep = load_sweep(str(file), ["replicates=3"])
    assert sweep.replicates == 3 and [t.seed for t in sweep.trials] == [3, 4, 5, 3, 4, 5]
    assert parse_override("replicates=2") == ("replicates", 2)
    with pytest.raises(SpecError, match=r"replicates must be an int >= 1 .*got \[2, 3\]"):
        load_sweep(str(file), ["replicates=[2, 3]"])
    with pytest.raises(SpecError, match="give 'seed' one value"):
        load_sweep(str(file), ["replicates=2", "seed=[0, 10]"])
    assert load_sweep(str(file), ["replicates=1"]).size == 2


# --- the pooled rule ------------------------------------------------------------------------------------------------

def _replicate(rows, base_ppl=10.0, restored_ppl=10.2) -> ReplicateOutcome:
    """Questions from (count, base, sft, restored) correctness rows."""
    base, sft, restored = (np.repeat([row[i] for row in rows], [row[0] for row in rows]).astype(bool)
                           for i in (1, 2, 3))
    return ReplicateOutcome(base, sft, restored, base_ppl, restored_ppl)


# Per replicate, 20 questions: 5 that SFT drops (R restores them), 1 that only R drops, 10 right and 4 wrong in all.
SMALL_DROPS = [(5, 1, 0, 1), (1, 1, 1, 0), (10, 1, 1, 1), (4, 0, 0, 0)]


def test_pooled_is_significant_where_no_replicate_alone_is():
    """Alone: dS has b = 5 drops, c = 0 gains: p = 2 * P[X <= 0], X ~ Bin(5, 1/2) = 2/32 = 0.0625 >= 0.05, no drop;
    dR: b = 1, c = 0: p = min(1, 2 * 1/2) = 1. Every replicate: no forgetting.
    Pooled over 3: dS has B = 15, C = 0: p = 2/2^15 = 6.103515625e-05 < 0.05, delta = -15/60 = -0.25; dR has B = 3:
    p = 2/2^3 = 0.25, delta = -3/60 = -0.05. Pooled stage: pseudo forgetting, 0 of 3 replicates agree."""
    replicates = [_replicate(SMALL_DROPS) for _ in range(3)]
    for r in replicates:
        alone = classify_checkpoint(r.base_correct, r.sft_correct, r.restored_correct, r.base_ppl, r.restored_ppl)
        assert alone.stage == "no_forgetting" and alone.p_sft == pytest.approx(0.0625) and alone.p_restored == 1.0
    pooled = classify_pooled(replicates)
    assert pooled.stage == "pseudo_forgetting"
    assert pooled.p_sft == pytest.approx(2 / 2**15) and pooled.d_sft == pytest.approx(-0.25)
    assert pooled.p_restored == pytest.approx(0.25) and pooled.d_restored == pytest.approx(-0.05)
    assert pooled.replicate_stages == ("no_forgetting",) * 3 and (pooled.agreeing, pooled.n) == (0, 3)
    assert pooled.restored_ok and pooled.n_restored == 3


def test_pooled_actual_forgetting_where_no_replicate_alone_has_it():
    """Per replicate: 4 questions dropped by SFT and R, 1 by SFT only, 11 right, 4 wrong. Alone: dS b = 5: p = 0.0625;
    dR b = 4: p = 2/16 = 0.125: no forgetting. Pooled: dR B = 12, C = 0: p = 2/2^12 = 0.00048828125, delta = -12/60:
    actual forgetting (it wins over the pooled dS drop, B = 15, p = 2/2^15)."""
    rows = [(4, 1, 0, 0), (1, 1, 0, 1), (11, 1, 1, 1), (4, 0, 0, 0)]
    pooled = classify_pooled([_replicate(rows) for _ in range(3)])
    assert pooled.stage == "actual_forgetting" and pooled.agreeing == 0
    assert pooled.p_restored == pytest.approx(2 / 2**12) and pooled.d_restored == pytest.approx(-0.2)
    assert pooled.p_sft == pytest.approx(2 / 2**15)


def test_replicates_that_disagree():
    """Replicate 1: SFT drops 8 of 20 (b = 8, c = 0): p = 2/2^8 = 0.0078125: pseudo. Replicate 2: 2 drops, 2 gains:
    p = min(1, 2 * (C(4,0) + C(4,1) + C(4,2)) / 2^4) = min(1, 22/16) = 1: no. Replicate 3: 3 gains, no drop: no.
    Pooled: B = 10, C = 5, N = 15: p = 2 * (1 + 15 + 105 + 455 + 1365 + 3003) / 2^15 = 9888/32768 = 0.3017578125,
    delta = (5 - 10)/60: no forgetting, which 2 of the 3 replicates' own tests agree with."""
    replicates = [_replicate([(8, 1, 0, 1), (12, 1, 1, 1)]),
                  _replicate([(2, 1, 0, 1), (2, 0, 1, 0), (16, 1, 1, 1)]),
                  _replicate([(3, 0, 1, 0), (17, 1, 1, 1)])]
    pooled = classify_pooled(replicates)
    assert pooled.replicate_stages == ("pseudo_forgetting", "no_forgetting", "no_forgetting")
    assert pooled.stage == "no_forgetting" and (pooled.agreeing, pooled.n) == (2, 3)
    assert pooled.p_sft == pytest.approx(9888 / 32768) and pooled.d_sft == pytest.approx(-5 / 60)
    assert pooled.p_restored == 1.0 and pooled.d_restored == 0.0


def test_one_unrestored_replicate_makes_the_checkpoint_not_restored():
    """Replicate 3's R_e probing PPL is 10.6 > 10.0 * 1.05: not restored, so the pooled R_e outcomes cannot be read as
    knowledge; the pooled stage is not_restored, with 2 of 3 restored. Only replicate 3 agrees (its own stage)."""
    replicates = [_replicate(SMALL_DROPS), _replicate(SMALL_DROPS), _replicate(SMALL_DROPS, restored_ppl=10.6)]
    pooled = classify_pooled(replicates)
    assert pooled.stage == "not_restored" and not pooled.restored_ok and pooled.n_restored == 2
    assert pooled.replicate_stages == ("no_forgetting", "no_forgetting", "not_restored") and pooled.agreeing == 1
    assert pooled.p_sft == pytest.approx(2 / 2**15)  # the tests are still reported


@pytest.mark.parametrize("seed", range(5))
def test_one_replicate_is_the_single_trial_rule(seed):
    rng = np.random.default_rng(seed)
    base = rng.random(60) < 0.7
    sft = np.where(rng.random(60) < 0.3, ~base, base)
    restored = np.where(rng.random(60) < 0.1, ~base, base)
    ppl = 10.0 * (1 + rng.uniform(-0.02, 0.08))
    single = classify_checkpoint(base, sft, restored, 10.0, ppl)
    pooled = classify_pooled([ReplicateOutcome(base, sft, restored, 10.0, ppl)])
    assert (pooled.stage, pooled.p_sft, pooled.p_restored, pooled.d_sft, pooled.d_restored, pooled.restored_ok) == \
        (single.stage, single.p_sft, single.p_restored, single.d_sft, single.d_restored, single.restored_ok)
    assert pooled.agreeing == 1


def test_pooled_mcnemar_sums_discordant_pairs_over_strata_of_different_sizes():
    """Stratum 1 (4 questions): b10 = 2, b01 = 0; stratum 2 (6 questions): b10 = 1, b01 = 1. Pooled: B = 3, C = 1,
    N = 4: p = 2 * (C(4,0) + C(4,1)) / 2^4 = 10/16 = 0.625; delta = (1 - 3) / 10 = -0.2."""
    result = pooled_mcnemar([([1, 1, 1, 0], [0, 0, 1, 0]), ([1, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0])])
    assert (result.strata, result.n, result.b10, result.b01) == (2, 10, 3, 1)
    assert result.p_value == pytest.approx(0.625) and result.delta == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="at least one stratum"):
        pooled_mcnemar([])
    with pytest.raises(ValueError, match="same questions"):
        pooled_mcnemar([([1, 0], [1, 0, 1])])


@pytest.mark.parametrize("transitions, median, low, high", [
    ((2, 3, None), 3, 2, 3),  # sorted 2, 3, never: the middle is 3; range 2-3
    ((2, 3), 2.5, 2, 3),
    ((2, 4, 4, None), 4, 2, 4),  # middle two 4 and 4
    ((2, 3, None, None), None, 2, 3),  # middle two 3 and never: no median
    ((None, None, None), None, None, None),
])
def test_transition_summary(transitions, median, low, high):
    def stages(transition, epochs=4):
        return {e: "actual_forgetting" if transition is not None and e >= transition else "pseudo_forgetting"
                for e in range(1, epochs + 1)}

    summary = transition_summary([stages(t) for t in transitions])
    assert summary.epochs == transitions
    assert (summary.median, summary.low, summary.high) == (median, low, high)
    assert summary.reached == sum(t is not None for t in transitions)


def test_pooled_settings_reach_the_pooled_and_the_per_replicate_rules():
    """SMALL_DROPS alone: dS p = 0.0625 (5 drops), so at alpha 0.1 each replicate alone is pseudo; pooled over one
    replicate p = 0.0625 too: exactly alpha 0.0625 is no drop (p must be below it)."""
    one = [_replicate(SMALL_DROPS)]
    assert classify_pooled(one, alpha=0.0625).stage == "no_forgetting"
    assert classify_pooled(one, alpha=0.0626).stage == "pseudo_forgetting"
    pooled = classify_pooled([_replicate(SMALL_DROPS) for _ in range(2)], alpha=0.1)
    assert pooled.replicate_stages == ("pseudo_forgetting",) * 2 and pooled.agreeing == 2
    # R drops 4 questions it does not restore (p = 2/16 = 0.125): actual at alpha 0.13, not at 0.125
    rows = [(4, 1, 1, 0), (12, 1, 1, 1), (4, 0, 0, 0)]
    assert classify_pooled([_replicate(rows)], alpha=0.125).stage == "no_forgetting"
    assert classify_pooled([_replicate(rows)], alpha=0.13).stage == "actual_forgetting"
    # the PPL tolerance reaches every replicate's precondition: 10% above base is restored at 0.2 only
    loose = classify_pooled([_replicate(SMALL_DROPS, restored_ppl=11.0)] * 2, ppl_tolerance=0.2)
    assert loose.restored_ok and loose.n_restored == 2 and loose.replicate_stages == ("no_forgetting",) * 2
    assert classify_pooled([_replicate(SMALL_DROPS, restored_ppl=11.0)]).stage == "not_restored"


def test_significant_gains_are_no_drop():
    """SFT and R both answer 8 more questions than base (b = 0, c = 8 per replicate): p = 2/2^8, but the change is
    a gain, not forgetting."""
    pooled = classify_pooled([_replicate([(8, 0, 1, 1), (12, 1, 1, 1)]) for _ in range(2)])
    assert pooled.p_sft == pytest.approx(2 / 2**16) and pooled.d_sft == pytest.approx(0.4)
    assert pooled.stage == "no_forgetting"


def test_pooled_inputs_are_checked_by_message():
    with pytest.raises(ValueError, match="^pooled_mcnemar needs at least one stratum$"):
        pooled_mcnemar([])
    with pytest.raises(ValueError, match="^classify_pooled needs at least one replicate$"):
        classify_pooled([])
    for alpha in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"^alpha must be in \(0, 1\), got {alpha}$"):
            classify_pooled([_replicate(SMALL_DROPS)], alpha=alpha)
    with pytest.raises(ValueError, match="^transition_summary needs at least one replicate$"):
        transition_summary([])
