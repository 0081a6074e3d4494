"""Pure metric functions on tensors/arrays: no model, no Ray, no MLflow, no I/O."""

from forgetray.metrics.knowledge import (
    accuracy,
    entropy_options,
    entropy_vocab,
    format_probability,
    letter_probabilities,
    option_likelihood_predictions,
    perplexity,
    token_logprobs,
)

__all__ = [
    "accuracy",
    "entropy_options",
    "entropy_vocab",
    "format_probability",
    "letter_probabilities",
    "option_likelihood_predictions",
    "perplexity",
    "token_logprobs",
]
