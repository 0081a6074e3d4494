"""forgetray: sweeps that tell pseudo from actual forgetting in instruction fine-tuning.

    from forgetray import Sweep, grid, run
    table = run(Sweep("demo", model=grid(["organism-tiny", "organism-small"]), epochs=3))
    Sweep("demo", model=grid(["organism-tiny", "organism-small"]), replicates=3)  # 3 seeds per point, pooled
"""

from forgetray.grids import Grid, Per, Sweep, grid, per, replicate_group
from forgetray.spec import SpecError, TrialConfig

__version__ = "0.1.0"


def run(sweep, **kwargs):
    """Run a sweep (Ray Tune over trials; Ray Train + DeepSpeed inside) and return the per-checkpoint table."""
    from forgetray.sweep import run_sweep  # heavy imports (ray, torch) only when actually running

    return run_sweep(sweep, **kwargs)


__all__ = ["Grid", "Per", "SpecError", "Sweep", "TrialConfig", "grid", "per", "replicate_group", "run", "__version__"]
