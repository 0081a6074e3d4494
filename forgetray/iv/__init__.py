"""Instruction vectors (issue 12; Jiang et al., arXiv 2406.12227, built on Todd et al.'s function vectors) as pure
computation on a model and tensors: no Ray, MLflow or DeepSpeed.

- `tasks`: an instruction task (examples, instruction, few-shot template), its clean and corrupted prompts, and a
  JSONL loader;
- `heads`: per-head o_proj inputs of Llama-like models: record them at one position per sequence, patch them;
- `vector`: mean head activations over clean prompts, causal indirect effects on corrupted prompts, the top heads,
  the vector, and its injection into the residual stream;
- `loss`: the IV-guided loss (CE + thresholded first-token and all-position KL + head MSE), each term returned;
- `schedule`: the progressive intervention degree;
- `dynamics`: a checkpoint's vector against the base's (cosine, head overlap), accuracy with a vector injected, and
  answer log-probabilities (P(y|x), P(y_c|c,x)).

Conventions (details and citations in each module): CIE is the first-answer-token probability difference (Todd et
al.; FvForgetting ranks heads by the answer NLL instead, not implemented); the vector leaves any o_proj bias out;
injection adds to a decoder layer's output (site="layer", Todd) or to its o_proj output (site="attn", FvForgetting's
trainer); the loss's KL is KL(p_model || p_ref) at temperature T without T^2, "batchmean" over the first dimension;
thresholds count x * [x > thr]; the progressive degree holds 1.0 through the first tenth of its window.

Orchestrated in `forgetray.train.iv_guided` (IV-guided training, the IFT phase's `iv_*` settings: extraction as a
sweep step with tokenisation, batching and the clean-prompt filter; the reference forward with LoRA adapters disabled
or a frozen copy; the degree per step; the terms logged to MLflow) and `forgetray.train.iv_probe` (the dynamics probe
of every model state, setting `iv_probe_task`). `builtin`: the organism's built-in tasks.
"""

import importlib
from typing import Any

from forgetray.iv.schedule import degree
from forgetray.iv.tasks import Example, Prompt, Task, Template, load_task, n_shot_prompts, zero_shot_prompts

# The names that need torch load on first use (PEP 562): importing the package, e.g. for the task schema or for
# the settings' validation (`forgetray.spec_iv`), stays light.
_LAZY = {
    "heads": ("HeadLayout", "head_layout", "last_prompt_positions", "last_token_positions", "patch_heads",
              "record_heads"),
    "loss": ("IVLossWeights", "iv_guided_loss", "kl_t"),
    "vector": ("answered_correctly", "causal_indirect_effect", "inject_vector", "instruction_vector",
               "mean_head_activations", "top_heads"),
}


def __getattr__(name: str) -> Any:
    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(f"forgetray.iv.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Example", "HeadLayout", "IVLossWeights", "Prompt", "Task", "Template", "answered_correctly",
           "causal_indirect_effect", "degree", "head_layout", "inject_vector", "instruction_vector", "iv_guided_loss",
           "kl_t", "last_prompt_positions", "last_token_positions", "load_task", "mean_head_activations",
           "n_shot_prompts", "patch_heads", "record_heads", "top_heads", "zero_shot_prompts"]
