"""The pure knowledge/perplexity metrics against values worked out by hand."""

import math
import warnings

import numpy as np
import pytest
import torch

from forgetray import metrics

torch.set_num_threads(1)


def test_letter_probabilities_sum_the_variants_of_each_letter():
    # Logits that are log-probabilities (plus any constant) give exactly these probabilities back.
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    logits = probs.log() + 7.0
    # Letter 0 has two variants (tokens 0 and 2), letter 1 one (token 1), letter 2 one (token 3).
    got = metrics.letter_probabilities(logits, [[0, 2], [1], [3]])
    expected = torch.tensor([[0.1 + 0.3, 0.2, 0.4], [0.5, 0.25, 0.25]], dtype=torch.float64)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=0)


def test_letter_probabilities_are_a_share_of_the_whole_vocabulary():
    # Four letters, one token each, in a vocabulary of 10 uniform tokens: each letter gets 1/10, not 1/4.
    got = metrics.letter_probabilities(torch.zeros(10), [[0], [1], [2], [3]])
    torch.testing.assert_close(got, torch.full((4,), 0.1, dtype=torch.float64))


def test_format_probability_is_the_mass_on_the_options():
    got = metrics.format_probability(torch.tensor([[0.4, 0.2, 0.3], [0.0, 0.0, 0.01]]))
    torch.testing.assert_close(got, torch.tensor([0.9, 0.01], dtype=torch.float64))


def test_entropy_vocab_in_nats():
    assert float(metrics.entropy_vocab(torch.zeros(8))) == pytest.approx(math.log(8))
    # Two tokens at 1/2, the rest impossible (logit -inf, which must not give nan): ln 2.
    two = torch.tensor([0.0, 0.0, -math.inf, -math.inf])
    assert float(metrics.entropy_vocab(two)) == pytest.approx(math.log(2))
    # A certain token: 0.
    assert float(metrics.entropy_vocab(torch.tensor([0.0, -math.inf, -math.inf]))) == pytest.approx(0.0, abs=1e-12)
    # p = (0.5, 0.25, 0.25): 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2.
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    assert metrics.entropy_vocab(logits).tolist() == pytest.approx([1.5 * math.log(2)])


def test_entropy_options_renormalises_the_options():
    # Four options at 0.1 each renormalise to uniform: ln 4, whatever mass is off the options.
    assert float(metrics.entropy_options(torch.tensor([0.1, 0.1, 0.1, 0.1]))) == pytest.approx(math.log(4))
    # (0.3, 0.1) -> (0.75, 0.25): -(0.75 ln 0.75 + 0.25 ln 0.25).
    h = float(metrics.entropy_options(torch.tensor([0.3, 0.1])))
    assert h == pytest.approx(0.5623351446188083)
    # A zero-probability option contributes nothing (no nan): (0.2, 0) -> (1, 0) -> 0.
    assert float(metrics.entropy_options(torch.tensor([0.2, 0.0]))) == pytest.approx(0.0, abs=1e-12)


def test_acc_norm_can_flip_the_decision_because_of_lengths():
    # Option 0: -6 over 2 characters (-3 per char); option 1: -8 over 10 characters (-0.8 per char).
    acc, acc_norm = metrics.option_likelihood_predictions([[-6.0, -8.0], [-1.0, -9.0]], [[2, 10], [5, 5]])
    assert acc.tolist() == [0, 0]
    assert acc_norm.tolist() == [1, 0]


def test_option_likelihood_predictions_with_padded_options_and_ties():
    # Question 0 has two options (third padded with -inf); question 1 ties and takes the first option.
    acc, acc_norm = metrics.option_likelihood_predictions([[-4.0, -2.0, -math.inf], [-3.0, -3.0, -3.0]],
                                                          [[1, 1, 1], [4, 4, 4]])
    assert acc.tolist() == [1, 0]
    assert acc_norm.tolist() == [1, 0]


def test_option_likelihood_predictions_rejects_bad_shapes_and_lengths():
    with pytest.raises(ValueError, match="shape"):
        metrics.option_likelihood_predictions([[-1.0, -2.0]], [[1, 2, 3]])
    with pytest.raises(ValueError, match="positive"):
        metrics.option_likelihood_predictions([[-1.0, -2.0]], [[0, 2]])


def test_perplexity():
    # Three tokens at probability 1/4 each: NLL 3 ln 4, perplexity 4.
    assert metrics.perplexity(3 * math.log(4), 3) == pytest.approx(4.0)
    assert metrics.perplexity(0.0, 5) == 1.0
    assert metrics.perplexity(10.0, 5) == pytest.approx(math.exp(2.0))
    assert metrics.perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        metrics.perplexity(1.0, 0)


def test_accuracy():
    assert metrics.accuracy([True, False, True, True]) == 0.75
    assert metrics.accuracy(np.array([0, 1])) == 0.5
    assert math.isnan(metrics.accuracy([]))


def test_token_logprobs():
    # Row 0: p = (1/4, 3/4), target 1 -> ln 0.75; row 1: uniform over 2, target 0 -> ln 0.5.
    logits = torch.tensor([[math.log(1.0), math.log(3.0)], [0.0, 0.0]])
    got = metrics.token_logprobs(logits, [1, 0])
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([math.log(0.75), math.log(0.5)], abs=1e-7)


# --- the reductions run over the last axis only, whatever the leading shape (and their exact inputs) -------------


def test_option_and_vocabulary_reductions_run_over_the_last_axis_of_a_3d_batch():
    # [2, 2, 3]: two prompts x two positions x three options, each row worked out alone by hand.
    probs = torch.tensor([[[0.4, 0.2, 0.3], [0.0, 0.0, 0.01]], [[0.1, 0.1, 0.2], [0.5, 0.25, 0.25]]])
    torch.testing.assert_close(metrics.format_probability(probs),
                               torch.tensor([[0.9, 0.01], [0.4, 1.0]], dtype=torch.float64))
    # renormalised per row: (4, 2, 3)/9, (0, 0, 1), (1, 1, 2)/4, (2, 1, 1)/4
    def h(*p):
        return -sum(x * math.log(x) for x in p if x > 0)
    expected = [[h(4 / 9, 2 / 9, 3 / 9), 0.0], [h(0.25, 0.25, 0.5), h(0.5, 0.25, 0.25)]]
    got = metrics.entropy_options(probs)
    assert got.shape == (2, 2)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_token_logprobs_of_a_longer_sequence_and_narrow_inputs():
    # Three positions over a vocabulary of 4: each row's log-softmax worked out alone (numpy, float64).
    rows = np.array([[0.0, 1.0, 2.0, 3.0], [5.0, -1.0, 0.5, 0.5], [-2.0, 0.0, 0.0, 4.0]])
    targets = np.array([2, 0, 3], dtype=np.int32)  # int32 ids (a tokenizer's numpy output) index like int64 ones
    expected = [r[t] - math.log(np.exp(r).sum()) for r, t in zip(rows, targets)]
    got = metrics.token_logprobs(torch.tensor(rows, dtype=torch.float32), targets)
    assert got.dtype == torch.float64 and got.shape == (3,)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    # bf16 logits: the log-softmax runs in float32 on the bf16 values (no second rounding to bf16)
    low = torch.tensor(rows, dtype=torch.bfloat16)
    wide = low.double().numpy()
    expected_low = [r[t] - math.log(np.exp(r).sum()) for r, t in zip(wide, targets)]
    assert metrics.token_logprobs(low, targets).tolist() == pytest.approx(expected_low, abs=1e-6)


def test_option_likelihood_predictions_refuses_one_dimensional_and_zero_length_options():
    with pytest.raises(ValueError, match=r"must be the same \[N, K\] shape"):
        metrics.option_likelihood_predictions([-1.0, -2.0], [1, 2])  # one question, not a batch
    with pytest.raises(ValueError, match=r"^char_lengths must be positive \(acc_norm divides by them\)$"):
        metrics.option_likelihood_predictions([[-1.0, -2.0], [-1.0, -2.0]], [[1, 2], [3, 0]])  # one zero length


def test_perplexity_and_accuracy_edge_cases():
    with pytest.raises(ValueError, match="at least one scored token, got n_tokens=0"):
        metrics.perplexity(1.0, 0)
    with pytest.raises(ValueError, match="n_tokens=-2"):
        metrics.perplexity(1.0, -2)
    assert metrics.perplexity(2.0, 1) == pytest.approx(math.exp(2.0))
    assert metrics.accuracy([2, 0, 0, 0]) == 0.25  # truthiness, not the mean of the numbers
    assert metrics.accuracy(np.array([0.5, 0.0])) == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty input is nan without numpy's "mean of empty slice" warning
        assert math.isnan(metrics.accuracy(np.array([], dtype=bool)))


def test_package_names_load_from_their_submodules_on_first_use(monkeypatch):
    import importlib

    # a name not used yet in this process: looked up in its submodule once, then kept in the package's namespace
    monkeypatch.delitem(vars(metrics), "em_ratio", raising=False)
    assert metrics.em_ratio is importlib.import_module("forgetray.metrics.memorization").em_ratio
    assert vars(metrics)["em_ratio"] is metrics.em_ratio
    assert metrics.__getattr__("transition_epoch") is importlib.import_module("forgetray.metrics.stage").transition_epoch
    names = dir(metrics)
    assert names == sorted(names)
    assert set(metrics.__all__) <= set(names)
    assert metrics.em_ratio is importlib.import_module("forgetray.metrics.memorization").em_ratio
    assert metrics.STAGE_CODES is importlib.import_module("forgetray.metrics.stage").STAGE_CODES
    with pytest.raises(AttributeError, match="module 'forgetray.metrics' has no attribute 'nonesuch'"):
        metrics.nonesuch
