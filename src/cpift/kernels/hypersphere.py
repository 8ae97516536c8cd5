# The hypersphere merges of mergekit 0.1.5 (nuslerp, multislerp, karcher) as Σ c_i x_i (or b + Σ c_i δ_i
# with a base): the N×N Gram matrix in one read (kernels/gram.py), mergekit's coefficients on the host
# in float64 from it alone, then one blend pass (weighted_sum or delta_merge); nuslerp's row forms in
# torch ops per block of rows.
# Precision: float32 per element (float64 inputs: float64), float64 coefficients, one rounding on store.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernelshyperspherepy
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._scratch import CHUNK, check_flat, compute_dtype
from .gram import buffer, gram, gram_ref
from .linear import weighted_sum
from .threads import serial_reductions
from .ties import delta_merge

NORM_FLOOR = 1e-7  # nuslerp's _normalize clamp
NUSLERP_EPS = 1e-8  # nuslerp's colinearity eps
WEIGHT_GUARD = 1e-6  # nuslerp: |w_0 + w_1| below this gives t = 0.5
# nuslerp's colinearity test, 1 − cos² ≤ eps², holds in mergekit's float32 exactly when cos rounds to
# ±1 (|cos| > 1 − 3e-8). cpift's cos comes from float32-accurate reductions (~1e-7), so it takes
# 1 − cos² ≤ 1e-6 (θ < 1e-3 or θ > π − 1e-3) as colinear: near 0 the lerp and the slerp differ by
# less than θ²/8 relative (< 1.3e-7); near π mergekit's slerp (c ~ 1/sin θ) is ill-conditioned in float32,
# and exact opposites (a 1-element tensor of opposite signs, x and −2x) get its lerp, as in mergekit.
NEAR_COLINEAR = 1e-6
MULTISLERP_EPS = 1e-8
KARCHER_ITER, KARCHER_TOL = 10, 1e-5
# karcher: a unit vector opposite the mean (cos θ within this of −1) gives no step. Its tangent
# direction is undefined; mergekit's float32 u − cos θ·m is exactly 0 for exact opposites, while here
# cos θ from the Gram matrix is −1 only to float64 rounding, and θ/sin θ ~ 1e16 would blow that up.
ANTIPODAL = 1e-12
# karcher: cosines within this of −1 count as exact opposites (u_j = −u_i). The float32 reductions'
# error (~1e-7 relative, more on the torch path) would otherwise leave a mean of two opposites with a
# norm just above tol, and its normalisation multiplies that noise into huge, cancelling coefficients;
# mergekit's float32 iteration gets exact opposites exactly (the mean falls back to u_0).
OPPOSITE = 1e-4


class ZeroMean(ValueError):
    """multislerp: the weighted mean of the unit vectors is (within eps of) zero, N > 2."""


def nuslerp_t(w0: float, w1: float) -> float:
    total = w0 + w1
    return 0.5 if abs(total) < WEIGHT_GUARD else w1 / total


def nuslerp_coefficients(g: torch.Tensor, t: float, eps: float = NUSLERP_EPS) -> torch.Tensor:
    """(c_0, c_1) with nuslerp = c_0 δ_0 + c_1 δ_1, from Gram matrices g of shape (..., 2, 2)."""
    g = g.double()
    n0 = g[..., 0, 0].clamp(min=0.0).sqrt().clamp(min=NORM_FLOOR)
    n1 = g[..., 1, 1].clamp(min=0.0).sqrt().clamp(min=NORM_FLOOR)
    cos = (g[..., 0, 1] / (n0 * n1)).clamp(-1.0, 1.0)
    colinear = (1.0 - cos * cos) <= max(eps * eps, NEAR_COLINEAR)
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin = torch.where(colinear, 1.0, torch.sin(theta))
    c0 = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / sin)
    c = torch.stack([c0, c1], -1)
    return torch.where(torch.isfinite(g).all(-1).all(-1, keepdim=True), c, math.nan)


def _quad(a: torch.Tensor, g: torch.Tensor, b: torch.Tensor | None = None) -> float:
    return float(a @ g @ (a if b is None else b))


def multislerp_coefficients(g: torch.Tensor, weights: Sequence[float], *, normalize_weights: bool = True,
                            eps: float = MULTISLERP_EPS) -> list[float]:
    """c with multislerp = Σ c_i δ_i, from the N×N Gram matrix (N ≥ 2). Raises ZeroMean."""
    g = g.double()
    if not torch.isfinite(g).all():
        return [math.nan] * g.shape[0]
    w = torch.tensor([float(v) for v in weights], dtype=torch.float64, device=g.device)
    if normalize_weights:
        w = w / w.sum()
    norms = g.diagonal().clamp(min=0.0).sqrt()
    scale = norms + eps
    gu = g / torch.outer(scale, scale)  # the Gram matrix of u_i = δ_i / (‖δ_i‖ + eps)
    mean_norm = math.sqrt(max(_quad(w, gu), 0.0))
    if mean_norm < eps:
        if g.shape[0] == 2:
            return [float(v) for v in w]  # mergekit's fallback: the linear interpolation
        raise ZeroMean("the weighted mean of the unit vectors is zero (antipodal inputs whose weights "
                       "balance out, e.g. a and −a with equal weights); give them different weights")
    a = w / mean_norm  # m̂
    dots = gu @ a  # ⟨u_i, m̂⟩
    tau = w - float(w @ dots) * a  # Σ w_i (u_i − ⟨u_i, m̂⟩ m̂)
    s = math.sqrt(max(_quad(tau, gu), 0.0)) + eps
    r = a * math.cos(s) + tau * (math.sin(s) / s)
    r = r * float((norms * w).sum())
    return [float(v) for v in r / scale]


def karcher_coefficients(g: torch.Tensor, *, max_iter: int = KARCHER_ITER, tol: float = KARCHER_TOL) -> list[float]:
    """c with karcher = Σ c_i x_i, from the N×N Gram matrix (weights 1/N, as mergekit's karcher)."""
    g = g.double()
    k = g.shape[0]
    if not torch.isfinite(g).all():
        return [math.nan] * k
    norms = g.diagonal().clamp(min=0.0).sqrt()
    valid = [i for i in range(k) if float(norms[i]) > tol]
    if not valid:
        return [0.0] * k
    # Gram matrix of the unit vectors; ⟨u_i, u_i⟩ = 1 exactly, and (near-)opposites give −1 exactly.
    gu = torch.zeros(k, k, dtype=torch.float64, device=g.device)
    for i in valid:
        for j in valid:
            cos = float(g[i, j]) / math.sqrt(float(g[i, i]) * float(g[j, j]))
            gu[i, j] = 1.0 if i == j else (-1.0 if cos <= OPPOSITE - 1.0 else min(cos, 1.0))
    alpha = 1.0 / len(valid)
    m = torch.zeros(k, dtype=torch.float64, device=g.device)
    m[valid] = alpha
    mean_norm = math.sqrt(max(_quad(m, gu), 0.0))
    if mean_norm < tol:
        m = torch.zeros(k, dtype=torch.float64, device=g.device)
        m[valid[0]] = 1.0
    else:
        m = m / mean_norm
    for _ in range(max_iter):
        dots = (gu @ m).clamp(-1.0, 1.0)
        tau = torch.zeros(k, dtype=torch.float64, device=g.device)
        for i in valid:
            theta = math.acos(float(dots[i]))
            if theta < tol or float(dots[i]) <= ANTIPODAL - 1.0:
                continue
            step = torch.zeros(k, dtype=torch.float64, device=g.device)
            step[i] = 1.0
            tau += alpha * (theta / math.sin(theta)) * (step - float(dots[i]) * m)
        tn = math.sqrt(max(_quad(tau, gu), 0.0))
        if tn < tol:
            break
        m = math.cos(tn) * m + math.sin(tn) * (tau / tn)
        un = math.sqrt(max(_quad(m, gu), 0.0))
        if un > tol:
            m = m / un
    scale = float(norms.sum()) / k
    return [scale * float(m[i]) / float(norms[i]) if i in valid else 0.0 for i in range(k)]


def blend(xs: Sequence[torch.Tensor], coefficients: Sequence[float], *, base: torch.Tensor | None,
          out: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Σ c_i x_i, or b + Σ c_i (x_i − b) with a base: one fused pass (CPU, Triton or torch)."""
    if base is None:
        return weighted_sum(xs, coefficients, out=out, backend=backend)
    return delta_merge(base, xs, list(coefficients), elect_sign=False, out=out, backend=backend)


def _gram(xs, base, backend):
    with serial_reductions():  # the same coefficients whatever the thread count
        return gram(xs, base=base, backend=backend)


def nuslerp(x0: torch.Tensor, x1: torch.Tensor, t: float, *, base: torch.Tensor | None = None,
            out: torch.Tensor, backend: str | None = None) -> tuple[float, float]:
    """Write the whole-tensor nuslerp (nuslerp_flatten: true) into out; return its coefficients."""
    c0, c1 = (float(c) for c in nuslerp_coefficients(_gram([x0, x1], base, backend), t))
    blend([x0, x1], [c0, c1], base=base, out=out, backend=backend)
    return c0, c1


def multislerp(xs: Sequence[torch.Tensor], weights: Sequence[float], *, base: torch.Tensor | None = None,
               normalize_weights: bool = True, eps: float = MULTISLERP_EPS, out: torch.Tensor,
               backend: str | None = None) -> list[float]:
    """Write multislerp into out (one input: a copy of it, as mergekit); return the coefficients."""
    if len(xs) == 1:
        out.copy_(xs[0])
        return [1.0]
    c = multislerp_coefficients(_gram(xs, base, backend), weights, normalize_weights=normalize_weights, eps=eps)
    blend(xs, c, base=base, out=out, backend=backend)
    return c


def karcher(xs: Sequence[torch.Tensor], *, max_iter: int = KARCHER_ITER, tol: float = KARCHER_TOL,
            out: torch.Tensor, backend: str | None = None) -> list[float]:
    """Write the Karcher mean into out (one input: a copy of it, as mergekit); return the coefficients."""
    if len(xs) == 1:
        out.copy_(xs[0])
        return [1.0]
    c = karcher_coefficients(_gram(xs, None, backend), max_iter=max_iter, tol=tol)
    blend(xs, c, base=None, out=out, backend=backend)
    return c


def _views(xs, base, s, e, shape, dt, dev):
    """float32 (x_i − b) of entries [s, e) in scratch, viewed as `shape`; and b (or None)."""
    fb = None if base is None else buffer("sphere.base", e - s, dt, dev).copy_(base[s:e]).view(shape)
    ds = []
    for i, x in enumerate(xs):
        d = buffer(f"sphere.d{i}", e - s, dt, dev).copy_(x[s:e]).view(shape)
        ds.append(d if fb is None else d.sub_(fb))
    return ds, fb


def _finish(ds, c0, c1, fb, out_piece):
    acc = ds[0].mul_(c0).add_(ds[1] * c1)
    if fb is not None:
        acc.add_(fb)
    out_piece.copy_(acc.reshape(-1))


def _row_blocks(x0, x1, base, out, cols, what):
    """Validate; the (start, end) of blocks of whole rows of ``cols`` entries, about CHUNK entries each."""
    n = x0.numel()
    for name, x in (("x0", x0), ("x1", x1), ("out", out)) + ((("base", base),) if base is not None else ()):
        check_flat(name, x, n)
    if n and (cols <= 0 or n % cols):
        raise ValueError(f"{what}: {n} entries are not rows of {cols}")
    per = max(1, CHUNK // cols) if n else 1
    return [(r0 * cols, min(n, (r0 + per) * cols)) for r0 in range(0, n // cols if n else 0, per)]


def nuslerp_rows(x0: torch.Tensor, x1: torch.Tensor, t: float, cols: int, *, base: torch.Tensor | None = None,
                 out: torch.Tensor) -> None:
    """nuslerp per row of ``cols`` entries (nuslerp_flatten: false), torch ops, a block of rows at a time."""
    dt, dev = compute_dtype(x0, x1, base), x0.device
    for s, e in _row_blocks(x0, x1, base, out, cols, "nuslerp_rows"):
        ds, fb = _views([x0, x1], base, s, e, ((e - s) // cols, cols), dt, dev)
        g = torch.empty(ds[0].shape[0], 2, 2, dtype=torch.float64, device=dev)
        g[:, 0, 0], g[:, 1, 1] = torch.linalg.vecdot(ds[0], ds[0]), torch.linalg.vecdot(ds[1], ds[1])
        g[:, 0, 1] = g[:, 1, 0] = torch.linalg.vecdot(ds[0], ds[1])
        c = nuslerp_coefficients(g, t).to(dt)
        _finish(ds, c[:, :1], c[:, 1:], fb, out[s:e])


def nuslerp_columns(x0: torch.Tensor, x1: torch.Tensor, t: float, cols: int, *,
                    base: torch.Tensor | None = None, out: torch.Tensor) -> None:
    """nuslerp per column of a (n / cols) × cols view (nuslerp_row_wise: the vectors along dimension 0),
    torch ops in two passes over blocks of rows: the column sums (float64), then the blend."""
    blocks = _row_blocks(x0, x1, base, out, cols, "nuslerp_columns")
    if not blocks:
        return
    dt, dev = compute_dtype(x0, x1, base), x0.device
    g = torch.zeros(cols, 2, 2, dtype=torch.float64, device=dev)
    for s, e in blocks:
        ds, _ = _views([x0, x1], base, s, e, ((e - s) // cols, cols), dt, dev)
        g[:, 0, 0] += (ds[0] * ds[0]).sum(0)
        g[:, 1, 1] += (ds[1] * ds[1]).sum(0)
        g[:, 0, 1] += (ds[0] * ds[1]).sum(0)
    g[:, 1, 0] = g[:, 0, 1]
    c = nuslerp_coefficients(g, t).to(dt)
    for s, e in blocks:
        ds, fb = _views([x0, x1], base, s, e, ((e - s) // cols, cols), dt, dev)
        _finish(ds, c[:, 0], c[:, 1], fb, out[s:e])


def _combine64(xs, c, base):
    """float64 Σ c_i x_i, or b + Σ c_i (x_i − b)."""
    b = None if base is None else base.double()
    acc = torch.zeros(xs[0].numel(), dtype=torch.float64, device=xs[0].device) if b is None else b.clone()
    for x, ci in zip(xs, c):
        acc += float(ci) * (x.double() if b is None else x.double() - b)
    return acc


def nuslerp_ref(x0, x1, t, *, base=None):
    """float64 oracle of the whole-tensor nuslerp (the coefficients from a float64 Gram matrix)."""
    c = nuslerp_coefficients(gram_ref([x0, x1], base=base), t)
    return _combine64([x0, x1], c.tolist(), base)


def multislerp_ref(xs, weights, *, base=None, normalize_weights=True, eps=MULTISLERP_EPS):
    """float64 oracle of multislerp (raises ZeroMean where mergekit raises)."""
    if len(xs) == 1:
        return xs[0].double().reshape(-1)
    c = multislerp_coefficients(gram_ref(xs, base=base), weights, normalize_weights=normalize_weights, eps=eps)
    return _combine64(xs, c, base)


def karcher_ref(xs, *, max_iter=KARCHER_ITER, tol=KARCHER_TOL):
    """float64 oracle of karcher."""
    if len(xs) == 1:
        return xs[0].double().reshape(-1)
    return _combine64(xs, karcher_coefficients(gram_ref(xs), max_iter=max_iter, tol=tol), None)
