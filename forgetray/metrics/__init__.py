"""Pure metric functions on tensors/arrays: no model, no Ray, no MLflow, no I/O.

The names below are loaded from their submodules on first use (PEP 562), not when the package is imported: a plain
data module that needs only `forgetray.metrics.registry` (`forgetray.sharing`, `forgetray.keys`) must not load torch
through `knowledge`.
"""

import importlib
from typing import Any

_SUBMODULE = {
    # knowledge
    "accuracy": "knowledge",
    "entropy_options": "knowledge",
    "entropy_vocab": "knowledge",
    "format_probability": "knowledge",
    "letter_probabilities": "knowledge",
    "option_likelihood_predictions": "knowledge",
    "perplexity": "knowledge",
    "token_logprobs": "knowledge",
    # memorization
    "IGNORE_INDEX": "memorization",
    "em_ratio": "memorization",
    "exact_memorization": "memorization",
    # pooled
    "PooledMcNemar": "pooled",
    "PooledStage": "pooled",
    "ReplicateOutcome": "pooled",
    "TransitionSummary": "pooled",
    "classify_pooled": "pooled",
    "pooled_mcnemar": "pooled",
    "transition_summary": "pooled",
    # significance
    "BootstrapResult": "significance",
    "McNemarResult": "significance",
    "mcnemar": "significance",
    "paired_bootstrap": "significance",
    "significant_drop": "significance",
    # stage
    "ACTUAL_FORGETTING": "stage",
    "INCONCLUSIVE": "stage",
    "NO_FORGETTING": "stage",
    "NOT_RESTORED": "stage",
    "PSEUDO_FORGETTING": "stage",
    "STAGE_CODES": "stage",
    "STAGES": "stage",
    "StageResult": "stage",
    "classify_checkpoint": "stage",
    "classify_fixed": "stage",
    "is_restored": "stage",
    "stage_from_drops": "stage",
    "transition_epoch": "stage",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULE:
        value = getattr(importlib.import_module(f"{__name__}.{_SUBMODULE[name]}"), name)
        globals()[name] = value  # once: later lookups find it without this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULE))


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
