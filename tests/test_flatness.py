"""forgetray.flatness (docs/methods.md §7): SC / AG / MAG on surfaces with hand-derived answers, and loss_surface on tiny
torch models (parameters restored bit-identically, centre = unperturbed loss, determinism, exact quadratic)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from forgetray.flatness import contour_figure, contour_png, directions, grid_coordinates, loss_surface, surface_metrics


def grid(n: int, radius: float):
    """Coordinates -r..r with n (odd) points; X varies along columns (a), Y along rows (b)."""
    m = n // 2
    h = radius / m
    xs = (np.arange(n) - m) * h
    X, Y = np.meshgrid(xs, xs)
    return xs, X, Y, h


def naive_mag(F: np.ndarray) -> float:
    diffs = []
    rows, cols = F.shape
    for i in range(rows):
        for j in range(cols):
            if j + 1 < cols:
                diffs.append(abs(F[i, j + 1] - F[i, j]))
            if i + 1 < rows:
                diffs.append(abs(F[i + 1, j] - F[i, j]))
    return sum(diffs) / len(diffs)


# --- surface_metrics on analytic surfaces -------------------------------------------------------------------------


def test_plane_exact():
    # Dyadic spacing and coefficients: every value and difference is exact in floating point, so SC is exactly 0.
    c1, c2 = 3.0, -2.0
    _, X, Y, h = grid(9, 1.0)  # h = 0.25
    F = c1 * X + c2 * Y
    m = surface_metrics(F, h)
    assert m["sc"] == 0.0
    # central and one-sided differences are both exact for a plane: grad = (c1, c2) everywhere
    assert m["ag"] == pytest.approx(math.sqrt(c1**2 + c2**2), rel=1e-15)
    # square grid: as many horizontal pairs (each |c1| h) as vertical ones (each |c2| h)
    assert m["mag"] == (abs(c1) + abs(c2)) / 2 * h
    assert m["flatness"] == pytest.approx((m["sc"] + m["ag"] + m["mag"]) / 3, rel=1e-15)


def test_plane_default_grid():
    c1, c2 = 0.7, 1.3
    _, X, Y, h = grid(21, 1.0)  # h = 0.1, not exact in binary
    m = surface_metrics(c1 * X + c2 * Y, h)
    assert m["sc"] == pytest.approx(0.0, abs=1e-12)
    assert m["ag"] == pytest.approx(math.hypot(c1, c2), rel=1e-12)
    assert m["mag"] == pytest.approx((c1 + c2) / 2 * h, rel=1e-12)


def test_plane_rectangular_pools_pairs():
    c1, c2 = 2.0, 0.5
    h = 0.25
    xs = np.arange(7) * h  # 7 columns
    ys = np.arange(5) * h  # 5 rows
    X, Y = np.meshgrid(xs, ys)
    F = c1 * X + c2 * Y
    m = surface_metrics(F, h)
    # 5*6 horizontal pairs of c1 h and 4*7 vertical pairs of c2 h, pooled
    expected = (5 * 6 * c1 * h + 4 * 7 * c2 * h) / (5 * 6 + 4 * 7)
    assert m["mag"] == pytest.approx(expected, rel=1e-15)
    assert m["mag"] == pytest.approx(naive_mag(F), rel=1e-15)
    assert m["sc"] == 0.0
    assert m["ag"] == pytest.approx(math.hypot(c1, c2), rel=1e-15)


@pytest.mark.parametrize("n,radius,k", [(9, 1.0, 0.5), (21, 1.0, 1.7), (11, 2.5, -0.3)])
def test_paraboloid(n, radius, k):
    xs, X, Y, h = grid(n, radius)
    F = k * (X**2 + Y**2)
    m = surface_metrics(F, h)

    # SC: ((x+h)^2 - 2x^2 + (x-h)^2) / h^2 = 2 exactly, so the Laplacian is 4k at every interior point.
    assert m["sc"] == pytest.approx(4 * abs(k), rel=1e-9)

    # AG: central differences are exact for x^2: (k(x+h)^2 - k(x-h)^2) / 2h = 2kx. The one-sided edge difference
    # is not: (k(x0+h)^2 - k x0^2) / h = 2k(x0 + h/2), the derivative at the half-step point (likewise 2k(x_end - h/2)
    # at the far edge). So the gradient is 2k * (x_eff, y_eff) with the edge coordinates pulled in by h/2.
    eff = xs.copy()
    eff[0] += h / 2
    eff[-1] -= h / 2
    EX, EY = np.meshgrid(eff, eff)
    expected_ag = float(np.mean(2 * abs(k) * np.sqrt(EX**2 + EY**2)))
    assert m["ag"] == pytest.approx(expected_ag, rel=1e-9)
    # ...which differs from the analytic mean of 2|k| sqrt(x^2 + y^2) only through the edge points
    analytic = 2 * abs(k) * np.sqrt(X**2 + Y**2)
    assert m["ag"] < float(np.mean(analytic))
    inner_grad = np.hypot(*np.gradient(F, h))[1:-1, 1:-1]
    np.testing.assert_allclose(inner_grad, analytic[1:-1, 1:-1], rtol=1e-9, atol=1e-12)

    # MAG: a horizontal pair differs by |k| |x_{j+1}^2 - x_j^2| = |k| h |x_j + x_{j+1}| = |k| h^2 |2j + 1 - 2m|;
    # over j = 0..2m-1 these are the odd numbers 1, 3, ..., 2m-1 twice, summing to 2m^2 over 2m pairs: mean m.
    # So the mean is |k| h^2 m = |k| h r in every row, and the same vertically.
    assert m["mag"] == pytest.approx(abs(k) * h * radius, rel=1e-9)
    assert m["mag"] == pytest.approx(naive_mag(F), rel=1e-9)


def test_constant_surface_is_flat():
    m = surface_metrics(np.full((21, 21), 3.25), 0.1)
    assert m == {"sc": 0.0, "ag": 0.0, "mag": 0.0, "flatness": 0.0}


def test_metrics_by_hand_on_an_irregular_rectangular_surface():
    """Every metric worked out by hand on a 3 x 4 surface of small integers (float32 in), h = 0.5.

    Nothing here is polynomial, so no value comes out right by accident: a wrong power of h, a wrong edge rule in
    the gradient, per-axis instead of pooled MAG means, or a flatness that is not the mean of the three all change a
    number below."""
    F = np.array(
        [
            [0, 1, 3, 6],
            [1, 3, 4, 8],
            [4, 4, 7, 9],
        ],
        dtype=np.float32,
    )
    m = surface_metrics(F, 0.5)

    # SC: two interior points, Laplacian = (left + right + up + down - 4 F) / h^2 with 1 / h^2 = 4.
    #   (1, 1): F = 3, neighbours 1 + 4 + 1 + 4 = 10 -> (10 - 12) * 4 = -8
    #   (1, 2): F = 4, neighbours 3 + 8 + 3 + 7 = 21 -> (21 - 16) * 4 = 20
    sc = (8 + 20) / 2  # = 14

    # AG: with h = 0.5 a one-sided edge difference is (F[k+1] - F[k]) * 2 and a central one is F[k+1] - F[k-1].
    #   d/da (along each row):    row 0: 2, 3, 5, 6   row 1: 4, 3, 5, 8   row 2: 0, 3, 5, 4
    #   d/db (along each column): col 0: 2, 4, 6      col 1: 4, 3, 2      col 2: 2, 4, 6      col 3: 4, 3, 2
    #   |grad|^2 at (row, col):   row 0: 8, 25, 29, 52   row 1: 32, 18, 41, 73   row 2: 36, 13, 61, 20
    squared = [8, 25, 29, 52, 32, 18, 41, 73, 36, 13, 61, 20]
    ag = sum(math.sqrt(v) for v in squared) / 12

    # MAG: 9 horizontal pairs |1|,|2|,|3|, |2|,|1|,|4|, |0|,|3|,|2| (sum 18) and 8 vertical pairs |1|,|3|, |2|,|1|,
    # |1|,|3|, |2|,|1| (sum 14), pooled: 32 / 17 (averaging the two directions' means, 2 and 1.75, would give 1.875).
    mag = 32 / 17

    assert set(m) == {"sc", "ag", "mag", "flatness"}
    assert all(type(v) is float for v in m.values())  # plain floats for MLflow, also from float32 input
    assert m["sc"] == 14.0 and sc == 14.0
    assert m["ag"] == pytest.approx(ag, rel=1e-12)
    assert m["mag"] == pytest.approx(mag, rel=1e-12)
    assert m["flatness"] == pytest.approx((14 + ag + mag) / 3, rel=1e-12)  # 7.1596...


@pytest.mark.parametrize(
    "F,h,match",
    [
        (np.zeros(9), 0.1, "2-D"),
        (np.zeros((3, 3, 3)), 0.1, "2-D"),
        (np.zeros((2, 5)), 0.1, "at least 3 x 3"),
        (np.zeros((5, 2)), 0.1, "at least 3 x 3"),
        (np.array([[0.0, 1, 2], [0, np.nan, 2], [0, 1, 2]]), 0.1, "non-finite"),
        (np.array([[0.0, 1, 2], [0, 1, 2], [0, 1, np.inf]]), 0.1, "non-finite"),
        (np.array([["a"] * 3] * 3), 0.1, "real numbers"),
        (np.zeros((3, 3)), 0.0, "spacing"),
        (np.zeros((3, 3)), -0.1, "spacing"),
        (np.zeros((3, 3)), float("nan"), "spacing"),
    ],
)
def test_surface_metrics_rejects(F, h, match):
    with pytest.raises(ValueError, match=match):
        surface_metrics(F, h)


# --- directions -------------------------------------------------------------------------------------------------


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    with torch.no_grad():
        model[2].bias.zero_()  # a zero-norm tensor: its direction must be zero
    return model


def test_directions_filter_normalised():
    model = small_model()
    named = list(model.named_parameters())
    d1, d2 = directions(named, seed=3)
    assert len(d1) == len(d2) == len(named)
    for (name, p), u, v in zip(named, d1, d2):
        assert u.shape == p.shape and u.dtype == p.dtype and u.device == p.device
        if p.norm() == 0:
            assert torch.count_nonzero(u) == 0 and torch.count_nonzero(v) == 0, name
        else:
            assert u.norm().item() == pytest.approx(p.norm().item(), rel=1e-6), name
            assert v.norm().item() == pytest.approx(p.norm().item(), rel=1e-6), name
            assert not torch.equal(u, v)


def test_directions_seeded_and_independent_of_global_state():
    """Same seed -> the same directions, whatever torch's global RNG holds, and the global RNG is left alone."""
    model = small_model()
    named = list(model.named_parameters())
    torch.manual_seed(1)
    d1, d2 = directions(named, seed=11)
    torch.manual_seed(12345)
    torch.randn(100)  # move the global generator on
    state = torch.get_rng_state()
    e1, e2 = directions(named, seed=11)
    assert torch.equal(torch.get_rng_state(), state), "directions() must not draw from torch's global generator"
    # bare tensors work as well as (name, tensor) pairs, and another call in between changes nothing
    directions(named, seed=12)
    f1, f2 = directions([p for _, p in named], seed=11)
    for u, v, w in zip(d1 + d2, e1 + e2, f1 + f2):
        assert torch.equal(u, v) and torch.equal(u, w)
    # another seed gives other directions (for every non-zero tensor)
    g1, _ = directions(named, seed=12)
    for (name, p), u, g in zip(named, d1, g1):
        if p.norm() > 0:
            assert not torch.allclose(u, g), name


def test_directions_depend_on_shapes_and_seed_only():
    """Two models of one architecture with different weights get the same directions up to each tensor's norm: the
    draw is fixed by the shapes and the seed, the values only set the scale (||d_W|| = ||W||)."""
    a, b = small_model(0), small_model(1)
    da, db = directions(a.named_parameters(), seed=5), directions(b.named_parameters(), seed=5)
    for pa, pb, ua, ub in zip(list(a.parameters()) * 2, list(b.parameters()) * 2, da[0] + da[1], db[0] + db[1]):
        assert not torch.equal(pa, pb) or pa.norm() == 0
        if pa.norm() > 0:
            torch.testing.assert_close(ua / pa.norm(), ub / pb.norm(), rtol=1e-5, atol=1e-7)


def test_directions_are_two_independent_gaussian_draws():
    """On a large tensor: d1 and d2 are nearly orthogonal (|cos| ~ 1/sqrt(n) for independent draws) and their
    entries are standard normal once scaled back (about 68.3% within one standard deviation; a uniform draw has
    57.7%, and the same draw twice has cos = 1)."""
    n = 40_000
    w = torch.full((200, 200), 0.5)  # ||w|| = 0.5 * 200 = 100
    (u,), (v,) = directions([w], seed=2)
    assert u.norm().item() == pytest.approx(100.0, rel=1e-6) and v.norm().item() == pytest.approx(100.0, rel=1e-6)
    cos = (u.double().flatten() @ v.double().flatten()).item() / (100.0 * 100.0)
    assert abs(cos) < 5 / math.sqrt(n)  # 5 sigma
    for d in (u, v):
        z = d.double().flatten() * math.sqrt(n) / 100.0  # unit variance entries
        assert abs(z.mean().item()) < 5 / math.sqrt(n)
        assert (z.abs() < 1).double().mean().item() == pytest.approx(0.6827, abs=0.012)


def test_directions_follow_param_dtype():
    w = torch.randn(10, dtype=torch.float64)
    (u,), (v,) = directions([w], seed=0)
    assert u.dtype == v.dtype == torch.float64
    (u32,), _ = directions([w.float()], seed=0)
    torch.testing.assert_close(u.float(), u32)  # same draws whatever the dtype


def test_directions_rejects_non_tensors():
    with pytest.raises(ValueError, match="tensors"):
        directions([[1.0, 2.0]], seed=0)


# --- loss_surface -----------------------------------------------------------------------------------------------

X_BATCH = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
Y_BATCH = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))


def mse(model: nn.Module) -> torch.Tensor:
    return ((model(X_BATCH) - Y_BATCH) ** 2).mean()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_bit_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_loss_surface_shape_centre_and_restore():
    model = small_model()
    model.train()
    before = snapshot(model)
    with torch.no_grad():
        base = mse(model).item()

    F, h = loss_surface(model, mse, steps=5, radius=0.5, seed=0)
    assert F.shape == (5, 5) and F.dtype == np.float64
    assert h == pytest.approx(0.25)
    assert F[2, 2] == base  # the centre is theta exactly, so the same loss to the bit
    assert np.all(np.isfinite(F)) and np.ptp(F) > 0
    assert_bit_identical(model, before)
    assert model.training and all(m.training for m in model.modules())


def test_loss_surface_restores_when_loss_fn_raises():
    model = small_model()
    model[1].eval()  # mixed modes must come back module by module
    before = snapshot(model)
    calls = 0

    def flaky(m: nn.Module) -> torch.Tensor:
        nonlocal calls
        calls += 1
        assert not m.training and not torch.is_grad_enabled()
        if calls == 5:
            raise RuntimeError("boom")
        return mse(m)

    with pytest.raises(RuntimeError, match="boom"):
        loss_surface(model, flaky, steps=5, seed=0)
    assert calls == 5
    assert_bit_identical(model, before)
    assert model.training and model[0].training and not model[1].training and model[2].training


def test_loss_surface_deterministic_per_seed():
    model = small_model()
    F0, _ = loss_surface(model, mse, steps=5, seed=0)
    F0_again, _ = loss_surface(model, mse, steps=5, seed=0)
    F1, _ = loss_surface(model, mse, steps=5, seed=1)
    assert np.array_equal(F0, F0_again)
    assert not np.allclose(F0, F1)
    assert F0[2, 2] == F1[2, 2]  # only the directions changed


def test_loss_surface_exact_quadratic_and_orientation():
    """L(w) = ||w||^2 for a single parameter vector, so f(a, b) = ||w + a d1 + b d2||^2 in closed form."""
    w = nn.Parameter(torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    model = nn.Module()
    model.w = w
    steps, radius, seed = 7, 1.5, 4
    F, h = loss_surface(model, lambda m: (m.w**2).sum(), steps=steps, radius=radius, seed=seed)

    (d1,), (d2,) = directions([w], seed)
    w0 = w.detach()
    coords, h_ref = grid_coordinates(steps, radius)
    assert h == h_ref == pytest.approx(0.5)
    expected = np.empty((steps, steps))
    for i, b in enumerate(coords):  # rows follow b (d2)
        for j, a in enumerate(coords):  # columns follow a (d1)
            expected[i, j] = (
                w0.dot(w0)
                + 2 * a * w0.dot(d1)
                + 2 * b * w0.dot(d2)
                + a**2 * d1.dot(d1)
                + 2 * a * b * d1.dot(d2)
                + b**2 * d2.dot(d2)
            ).item()
    np.testing.assert_allclose(F, expected, rtol=1e-12, atol=1e-12)
    # the orientation matters: swapping a and b would give the transpose, which differs here
    assert not np.allclose(F, F.T)


def test_loss_surface_perturbs_only_trainable():
    """The frozen weight stays put at every grid point; the trainable ones are at theta + a d1 + b d2 there (so they
    did move, everywhere but the centre), and every parameter is back to the bit afterwards."""
    model = small_model()
    model[0].weight.requires_grad_(False)
    before = snapshot(model)
    frozen = model[0].weight.detach().clone()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert [name for name, _ in trainable] == ["0.bias", "2.weight", "2.bias"]
    d1, d2 = directions(trainable, 0)  # as loss_surface draws them: over the trainable parameters, in order
    seen, points = [], []

    def loss(m: nn.Module) -> torch.Tensor:
        seen.append(torch.equal(m[0].weight, frozen))
        points.append({name: p.detach().clone() for name, p in m.named_parameters() if name != "0.weight"})
        return mse(m)

    loss_surface(model, loss, steps=3, seed=0)
    assert len(seen) == 9 and all(seen)
    coords, _ = grid_coordinates(3, 1.0)
    expected_points = [(a, b) for b in coords for a in coords]  # rows follow b, columns a
    assert len(points) == len(expected_points)
    for (a, b), got in zip(expected_points, points):
        for (name, _), u, v in zip(trainable, d1, d2):
            want = before[name] + float(a) * u + float(b) * v
            torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=f"{name} at a={a}, b={b}")
        moved = max(float((got[name] - before[name]).abs().max()) for name, _ in trainable)
        if a == 0 and b == 0:
            assert moved == 0.0  # the centre is theta exactly
        else:  # the moves are of the weights' own size (filter-normalised directions), far above rounding
            assert moved > 0.05, (a, b, moved)
    assert_bit_identical(model, before)  # and back


def test_loss_surface_accepts_float_loss():
    model = small_model()
    F, _ = loss_surface(model, lambda m: float(mse(m)), steps=3)
    G, _ = loss_surface(model, mse, steps=3)
    assert np.array_equal(F, G)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": 4}, "odd"),
        ({"steps": 1}, "odd"),
        ({"steps": 5.0}, "odd"),
        ({"radius": 0.0}, "radius"),
        ({"radius": -1.0}, "radius"),
        ({"radius": float("inf")}, "radius"),
    ],
)
def test_loss_surface_rejects_bad_grid(kwargs, match):
    model = small_model()
    with pytest.raises(ValueError, match=match):
        loss_surface(model, mse, **kwargs)


def test_loss_surface_rejects_frozen_model():
    model = small_model().requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        loss_surface(model, mse, steps=3)


# --- contour_png ------------------------------------------------------------------------------------------------


VIRIDIS_T = np.linspace(0.0, 1.0, 1001)


def viridis_t(rgb: np.ndarray) -> tuple[float, float]:
    """The viridis parameter t in [0, 1] whose colour is nearest to `rgb` (values in [0, 1]), and that distance."""
    from matplotlib import colormaps

    ref = colormaps["viridis"](VIRIDIS_T)[:, :3]
    dist = np.linalg.norm(ref - np.asarray(rgb)[None, :3], axis=1)
    return float(VIRIDIS_T[dist.argmin()]), float(dist.min())


def pixels(fig):
    """Render the figure once; returns pixel(a, b): the RGB (0..1) at data coordinates (a, b) of its plot axes."""
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.float64) / 255.0
    to_display = fig.axes[0].transData

    def pixel(a: float, b: float) -> np.ndarray:
        x, y = to_display.transform((a, b))
        return img[img.shape[0] - 1 - int(round(y)), int(round(x))]

    return pixel


def test_contour_figure_draws_the_surface_in_place():
    """Read the rendered pixels back: at (a, b) the colour must be the viridis colour of f(a, b) = a + 3b.

    The plane runs from -4 (a = b = -1) to 4 (a = b = 1) over 20 equal bands, so t = (a + 3b + 4) / 8 is known by
    hand at every point. Only points well inside a band are sampled (not on a white contour line), away from the
    centre marker and the legend (upper right). A transposed surface (3a + b), rows flipped (a - 3b), a wrong extent
    or a constant surface all put the wrong colour at most of these points."""
    radius, n = 1.0, 21
    xs = np.linspace(-radius, radius, n)
    X, Y = np.meshgrid(xs, xs)  # X varies along columns (a), Y along rows (b)
    fig = contour_figure(X + 3 * Y, radius, title="ckpt 1")
    assert fig.axes[0].get_title() == "ckpt 1"
    pixel_at = pixels(fig)

    lattice = np.round(np.arange(-0.9, 0.91, 0.1), 10)
    checked = []
    for a in lattice:
        for b in lattice:
            if (abs(a) < 0.25 and abs(b) < 0.25) or (a > 0.2 and b > 0.4):
                continue  # the red star at the centre, the legend in the upper right
            t = (a + 3 * b + 4) / 8
            if not 0.3 <= (t * 20) % 1 <= 0.7:
                continue  # too near a band edge (and its contour line)
            got, dist = viridis_t(pixel_at(a, b))
            assert dist < 0.02, f"pixel at ({a}, {b}) is not a viridis colour (distance {dist:.3f})"
            assert got == pytest.approx(t, abs=0.04), f"at (a, b) = ({a}, {b}): colour t {got}, expected {t}"
            checked.append((a, b))
    assert len(checked) >= 40
    # low in the lower left, high at the top: the two ends of the colour scale really appear
    assert viridis_t(pixel_at(-0.75, -0.9))[0] < 0.1  # t = 0.0625
    assert viridis_t(pixel_at(-0.05, 0.9))[0] > 0.8  # t = 0.83125


def test_contour_figure_constant_surface_is_one_colour():
    fig = contour_figure(np.full((5, 5), 2.0), 1.0)  # no contour levels: must still draw, one band
    pixel_at = pixels(fig)
    colours = {tuple(np.round(pixel_at(a, b), 3)) for a in (-0.8, -0.4, 0.4) for b in (-0.8, -0.4, 0.4)}
    assert len(colours) == 1
    assert viridis_t(np.array(next(iter(colours))))[1] < 0.02
    with pytest.raises(ValueError, match="2-D"):
        contour_figure(np.zeros(5), 1.0)


def test_contour_png_writes_the_figure(tmp_path):
    from matplotlib import colormaps
    from matplotlib.image import imread

    _, X, Y, _ = grid(21, 1.0)
    out = contour_png(X + 3 * Y, 1.0, tmp_path / "sub" / "surface.png", title="ckpt 1")
    assert out == tmp_path / "sub" / "surface.png"
    flat = contour_png(np.zeros((5, 5)), 1.0, tmp_path / "flat.png")
    # 20 bands of the sloped surface (in the plot and its colorbar) against one for the constant surface
    for path, at_least, at_most in ((out, 20, None), (flat, 1, 3)):
        colours = np.unique(imread(path)[..., :3].reshape(-1, 3), axis=0)
        dist = np.linalg.norm(colours[:, None, :] - colormaps["viridis"](VIRIDIS_T)[None, :, :3], axis=2)
        near = dist.min(axis=1) < 0.01
        ts = {int(t * 20) for t in VIRIDIS_T[dist.argmin(axis=1)[near]]}  # the band each viridis colour is in
        assert len(ts) >= at_least, path
        if at_most is not None:
            assert len(ts) <= at_most, path
    with pytest.raises(ValueError, match="2-D"):
        contour_png(np.zeros(5), 1.0, tmp_path / "bad.png")
