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
from forgetray.metrics.memorization import IGNORE_INDEX, em_ratio, exact_memorization
from forgetray.metrics.pooled import (
    PooledMcNemar,
    PooledStage,
    ReplicateOutcome,
    TransitionSummary,
    classify_pooled,
    pooled_mcnemar,
    transition_summary,
)
from forgetray.metrics.significance import (
    BootstrapResult,
    McNemarResult,
    mcnemar,
    paired_bootstrap,
    significant_drop,
)
from forgetray.metrics.stage import (
    ACTUAL_FORGETTING,
    INCONCLUSIVE,
    NO_FORGETTING,
    NOT_RESTORED,
    PSEUDO_FORGETTING,
    STAGE_CODES,
    STAGES,
    StageResult,
    classify_checkpoint,
    classify_fixed,
    is_restored,
    stage_from_drops,
    transition_epoch,
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
    # memorization
    "IGNORE_INDEX",
    "em_ratio",
    "exact_memorization",
    # pooled over replicates
    "PooledMcNemar",
    "PooledStage",
    "ReplicateOutcome",
    "TransitionSummary",
    "classify_pooled",
    "pooled_mcnemar",
    "transition_summary",
    # significance
    "BootstrapResult",
    "McNemarResult",
    "mcnemar",
    "paired_bootstrap",
    "significant_drop",
    # stage
    "ACTUAL_FORGETTING",
    "INCONCLUSIVE",
    "NO_FORGETTING",
    "NOT_RESTORED",
    "PSEUDO_FORGETTING",
    "STAGE_CODES",
    "STAGES",
    "StageResult",
    "classify_checkpoint",
    "classify_fixed",
    "is_restored",
    "stage_from_drops",
    "transition_epoch",
]
