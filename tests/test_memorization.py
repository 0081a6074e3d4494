"""Exact memorization (docs/methods.md §3) against a hand-worked batch and a naive Python loop."""

import math

import pytest
import torch

from forgetray import metrics

torch.set_num_threads(1)


def naive_em(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Reference: loop over every position t >= 1 with a label, compare with the argmax one position earlier."""
    memorized = scored = 0
    for i in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            label = int(labels[i, t])
            if label == -100:
                continue
            scored += 1
            row = logits[i, t - 1].tolist()
            memorized += int(row.index(max(row)) == label)
    return memorized, scored


def test_hand_worked_batch_uses_the_causal_shift():
    predictions = torch.tensor([[5, 6, 7, 8]])
    labels = torch.tensor([[-100, 5, 9, 7]])
    # t=1: prediction 5 (made at t=0) vs 5 yes; t=2: 6 vs 9 no; t=3: 7 vs 7 yes. Unshifted, none would match.
    assert metrics.exact_memorization(predictions, labels) == (2, 3)
    assert metrics.em_ratio(2, 3) == pytest.approx(2 / 3)


def test_matches_a_naive_loop_on_random_logits():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 11, generator=generator)
    labels = torch.randint(0, 11, (3, 9), generator=generator)
    # Make some labels memorized, and ignore some positions (a prompt prefix, padding at the end, one inside).
    labels[:, 3:6] = logits[:, 2:5].argmax(dim=-1)
    labels[0, :3] = -100
    labels[1, 7:] = -100
    labels[2, 4] = -100
    expected = naive_em(logits, labels)
    assert expected[0] >= 3 and expected[1] == 3 * 8 - 2 - 2 - 1
    assert metrics.exact_memorization(logits, labels) == expected
    assert metrics.exact_memorization(logits.argmax(dim=-1), labels) == expected


def test_label_at_position_zero_is_never_scored():
    predictions = torch.tensor([[1, 2], [3, 4]])
    assert metrics.exact_memorization(predictions, torch.tensor([[1, -100], [3, -100]])) == (0, 0)
    assert metrics.exact_memorization(predictions, torch.tensor([[7, 1], [7, 3]])) == (2, 2)


def test_em_ratio_and_validation():
    assert math.isnan(metrics.em_ratio(0, 0))
    assert metrics.em_ratio(0, 4) == 0.0
    with pytest.raises(ValueError):
        metrics.em_ratio(5, 4)
    with pytest.raises(ValueError, match="must be \\[B, L\\]"):
        metrics.exact_memorization(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token predictions"):
        metrics.exact_memorization(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))


def test_em_ratio_refuses_impossible_counts_by_name():
    assert metrics.em_ratio(3, 4) == 0.75 and metrics.em_ratio(4, 4) == 1.0
    with pytest.raises(ValueError, match="need 0 <= n_memorized <= n_positions, got 5 and 4"):
        metrics.em_ratio(5, 4)
    with pytest.raises(ValueError, match="got -1 and 4"):
        metrics.em_ratio(-1, 4)


def test_input_errors_by_message():
    with pytest.raises(ValueError, match=r"^two-dimensional input must be integer token predictions; pass logits as "
                                         r"\[B, L, V\]$"):
        metrics.exact_memorization(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^expected logits \[B, L, V\] or predictions \[B, L\], got shape \(4,\)$"):
        metrics.exact_memorization(torch.zeros(4), torch.zeros(1, 4, dtype=torch.long))
