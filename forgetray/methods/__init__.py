"""Anti-forgetting methods (docs/methods.md §6) as pure functions: no Ray, no MLflow, no training loop.

`wiseft` interpolates weights between the model before a fine-tuning phase and after it; the rehearsal (replay buffer) sampling
lives with the data code, in `forgetray.data.rehearsal`.
"""

from forgetray.methods.wiseft import interpolate_model_dirs, interpolate_state_dicts

__all__ = ["interpolate_model_dirs", "interpolate_state_dicts"]
