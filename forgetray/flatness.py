"""Flatness of the loss landscape (docs/methods.md §7): the 2-D loss surface around a model and its SC / AG / MAG metrics.

Pure computation: numpy and torch only (matplotlib is imported inside `contour_png`), no Ray, DeepSpeed or MLflow.

The surface is f(a, b) = L(theta + a*d1 + b*d2) on a `steps` x `steps` grid with a, b in [-radius, radius]. d1 and d2
are Gaussian directions from a fixed seed, filter-normalised per parameter tensor (||d_W|| = ||W||, Li et al. 2018;
per whole tensor is our choice). The grid array F is indexed F[row, col] = F[b-index, a-index]: rows follow b (the
y axis, d2), columns follow a (the x axis, d1), both in increasing order, so F[mid, mid] is the unperturbed model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

__all__ = ["surface_metrics", "directions", "grid_coordinates", "loss_surface", "contour_figure", "contour_png"]


def _validate_surface(F: np.ndarray) -> np.ndarray:
    F = np.asarray(F)
    if F.ndim != 2:
        raise ValueError(f"surface must be a 2-D array, got {F.ndim}-D with shape {F.shape}")
    if F.shape[0] < 3 or F.shape[1] < 3:
        raise ValueError(f"surface must be at least 3 x 3 (second differences need an interior), got {F.shape}")
    if not np.issubdtype(F.dtype, np.number) or np.iscomplexobj(F):
        raise ValueError(f"surface must hold real numbers, got dtype {F.dtype}")
    F = F.astype(np.float64)
    if not np.all(np.isfinite(F)):
        bad = int(np.size(F) - np.count_nonzero(np.isfinite(F)))
        raise ValueError(f"surface has {bad} non-finite value(s) (NaN or inf); the loss diverged on the grid")
    return F


def surface_metrics(F: np.ndarray, h: float) -> dict[str, float]:
    """SC, AG, MAG and the flatness degree of a surface F sampled on a grid with spacing h (the same on both axes).

    - sc: mean over the interior points of |f_xx + f_yy|, each from the central second difference
      (F[i, j+1] - 2 F[i, j] + F[i, j-1]) / h^2 (and likewise along the rows).
    - ag: mean over all grid points of ||grad f||_2, the gradient as `np.gradient(F, h)` with its default
      edge_order=1: central differences (F[j+1] - F[j-1]) / 2h inside, first-order one-sided differences
      (F[1] - F[0]) / h and (F[-1] - F[-2]) / h at the edges.
    - mag: mean |F_p - F_q| over all pairs of horizontally or vertically adjacent points, both directions pooled into
      one mean (raw differences, not divided by h).
    - flatness: mean(sc, ag, mag). Larger means sharper. All values are raw, unnormalised.

    F may be rectangular (at least 3 x 3) and must be finite.
    """
    F = _validate_surface(F)
    h = float(h)
    if not (math.isfinite(h) and h > 0):
        raise ValueError(f"grid spacing h must be a positive finite number, got {h}")

    inner = F[1:-1, 1:-1]
    laplacian = (F[1:-1, 2:] + F[1:-1, :-2] + F[2:, 1:-1] + F[:-2, 1:-1] - 4.0 * inner) / h**2
    sc = float(np.mean(np.abs(laplacian)))

    d_rows, d_cols = np.gradient(F, h)  # axis 0 = b (y), axis 1 = a (x)
    ag = float(np.mean(np.hypot(d_cols, d_rows)))

    pairs = np.concatenate([np.abs(np.diff(F, axis=1)).ravel(), np.abs(np.diff(F, axis=0)).ravel()])
    mag = float(np.mean(pairs))

    return {"sc": sc, "ag": ag, "mag": mag, "flatness": (sc + ag + mag) / 3.0}


def _tensors(params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    out = []
    for item in params:
        tensor = item[1] if isinstance(item, tuple) else item
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"expected tensors or (name, tensor) pairs, got {type(item).__name__}")
        out.append(tensor)
    return out


def directions(
    params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]], seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two filter-normalised Gaussian directions (d1, d2), each a list aligned with `params`.

    `params` are tensors or (name, tensor) pairs, e.g. `model.named_parameters()`. Draws come from one CPU
    torch.Generator seeded with `seed`, in float32, all of d1 in the order given and then all of d2, so the same
    architecture and seed give the same directions on any device. Each drawn tensor is rescaled to the norm of its
    parameter (a parameter of norm zero, e.g. zero biases, gets a zero direction), then moved to the parameter's
    device and dtype.
    """
    tensors = _tensors(params)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    result: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for out in result:
        for p in tensors:
            d = torch.randn(p.shape, generator=generator, dtype=torch.float32, device="cpu")
            p_norm = torch.linalg.vector_norm(p.detach(), dtype=torch.float64).item()
            d_norm = torch.linalg.vector_norm(d, dtype=torch.float64).item()
            if p_norm == 0.0 or d_norm == 0.0:
                d.zero_()
            else:
                d.mul_(p_norm / d_norm)
            out.append(d.to(device=p.device, dtype=p.dtype))
    return result


def grid_coordinates(steps: int = 21, radius: float = 1.0) -> tuple[np.ndarray, float]:
    """The coordinates shared by both axes and their spacing h; the middle coordinate is exactly 0."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 3 or steps % 2 == 0:
        raise ValueError(f"steps must be an odd integer >= 3 (so the grid has a centre), got {steps!r}")
    radius = float(radius)
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a positive finite number, got {radius}")
    mid = steps // 2
    h = radius / mid
    return (np.arange(steps) - mid) * h, h


def loss_surface(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module], float | torch.Tensor],
    *,
    steps: int = 21,
    radius: float = 1.0,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """Loss at every point of the grid around the model's parameters: returns (F, h), F of shape (steps, steps).

    F[i, j] = loss_fn(model) with theta + a_j * d1 + b_i * d2 written into the parameters: row index i follows b
    (d2, y axis), column index j follows a (d1, x axis), both from -radius to radius; F[steps // 2, steps // 2] is
    the unperturbed loss. Only trainable parameters (requires_grad) are perturbed; d1, d2 come from
    `directions(..., seed)` over them in `named_parameters()` order.

    loss_fn gets the model in eval mode under torch.no_grad() and returns a scalar (float or one-element tensor);
    use one fixed held-out batch for every model compared. The parameters are overwritten in place, never copied per
    grid point: memory is one saved copy of the trainable parameters plus the two directions. In bf16/fp16 each
    point is computed in float32 from the saved weights and rounded once (in place it would round at every add).
    Afterwards, also when loss_fn raises, the saved originals are copied back (bit-identical) and every module's
    train/eval mode restored.
    """
    coords, h = grid_coordinates(steps, radius)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters (requires_grad) to perturb")
    params = [p for _, p in named]
    d1, d2 = directions(named, seed)

    modes = [(module, module.training) for module in model.modules()]
    F = np.empty((steps, steps), dtype=np.float64)
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        try:
            model.eval()
            for i, b in enumerate(coords):
                for j, a in enumerate(coords):
                    # Rebuild from theta at every point rather than stepping, so rounding never accumulates and the
                    # centre (a = b = 0) is theta exactly.
                    for p, theta, u, v in zip(params, saved, d1, d2):
                        if p.dtype in (torch.float32, torch.float64):
                            p.copy_(theta).add_(u, alpha=float(a)).add_(v, alpha=float(b))
                        else:  # bf16/fp16: the point in float32 from the saved weights, rounded once
                            p.copy_((theta.float() + float(a) * u.float() + float(b) * v.float()).to(p.dtype))
                    F[i, j] = float(loss_fn(model))
        finally:
            for p, theta in zip(params, saved):
                p.copy_(theta)
            for module, training in modes:
                module.training = training
    return F, h


def contour_figure(F: np.ndarray, radius: float, title: str = ""):
    """A filled contour plot of the surface F (rows = b, columns = a, both over [-radius, radius]) with a colorbar
    and the unperturbed model marked at the centre (CF's Figure 1): a matplotlib Figure with an Agg canvas, not
    shown or saved; its first axes is the plot, data coordinates (a, b). `contour_png` writes it to a file."""
    F = _validate_surface(F)
    radius = float(radius)
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a positive finite number, got {radius}")
    # Object-oriented matplotlib only: no pyplot global state, safe in worker processes without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xs = np.linspace(-radius, radius, F.shape[1])
    ys = np.linspace(-radius, radius, F.shape[0])
    fig = Figure(figsize=(5.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lo, hi = float(F.min()), float(F.max())
    if hi > lo:
        levels = np.linspace(lo, hi, 21)
        filled = ax.contourf(xs, ys, F, levels=levels, cmap="viridis")
        ax.contour(xs, ys, F, levels=levels[::2], colors="white", linewidths=0.5, alpha=0.6)
    else:  # a constant surface has no contour levels; show it as a single band
        filled = ax.contourf(xs, ys, F, levels=[lo - 0.5, lo + 0.5], cmap="viridis")
    fig.colorbar(filled, ax=ax, label="loss")
    ax.plot([0.0], [0.0], marker="*", markersize=12, color="red", linestyle="none", label="model")
    ax.set_xlabel("a (direction d1)")
    ax.set_ylabel("b (direction d2)")
    ax.set_aspect("equal")
    ax.locator_params(nbins=5)
    ax.legend(loc="upper right", fontsize="small")
    if title:
        ax.set_title(title)
    return fig


def contour_png(F: np.ndarray, radius: float, path: str | Path, title: str = "") -> Path:
    """Write `contour_figure(F, radius, title)` as a PNG (CF's Figure 1, one per checkpoint). Returns the path."""
    fig = contour_figure(F, radius, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
