"""Progressive intervention (Jiang et al., arXiv 2406.12227; not in the released code): the degree of the vector
injected into the reference model during IV-guided training.

The degree is 1 until `start` of training, 0 from `end` on, and steps down in `levels` equal steps in between: the
window [start, end) is cut into `levels` equal parts and part i (0-based) has degree 1 - i/levels. So with the
defaults (0.25, 0.75, 10) every tenth 1.0, 0.9, ..., 0.1 is held for 5% of training and then 0.0: at 25% the degree
is still 1.0 (the first part), at 50% it is 0.5, at 75% and after it is 0. Progress is step / total_steps.
"""

from __future__ import annotations

import math

_EPS = 1e-9  # progress exactly on a part boundary must not fall into the previous part by rounding


def degree(step: int, total_steps: int, start: float = 0.25, end: float = 0.75, levels: int = 10) -> float:
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"need 0 <= start <= end <= 1, got start={start}, end={end}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    progress = step / total_steps
    if progress >= end - _EPS:
        return 0.0
    if progress < start - _EPS:
        return 1.0
    part = min(levels - 1, math.floor((progress - start) * levels / (end - start) + _EPS))
    return (levels - part) / levels
