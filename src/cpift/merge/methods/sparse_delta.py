"""Sparsified delta methods of mergekit 0.1.5 (``breadcrumbs``, ``breadcrumbs_ties``, ``della``,
``della_linear``) over a base b, inputs x_i, weights w_i, deltas δ_i = x_i − b (n entries each):

- breadcrumbs (Davari & Belilovsky 2023, magnitude outliers): with density < 1, t = floor(density·n),
  top = floor(gamma·n), bot = max(0, n − t − top); rank the entries by |δ_i| ascending (ties: lower
  flat index first, as torch's CPU sort orders them) and keep ranks bot .. bot + t − 1: the smallest
  and the ``gamma`` share of the largest are dropped (fewer of the largest when t + top > n).
- della (Deep et al. 2024, MagPrune): with density < 1, in each row (the last dimension of a 2-D
  tensor; a 1-D tensor is one row) entry j of rank r (0-based, ascending |δ|, ties lower index first)
  in a row of C entries is kept with probability p = (density − ε) + 2ε·r/(C − 1), drawn from the
  seeded Philox stream of kernels/dare.py (u < p, u the entry's uniform); mergekit draws from torch's
  global RNG: the same distribution, other values. A row of one entry keeps it with probability
  density (mergekit fails there: 0/0 reaches torch.bernoulli).
- rescale (mergekit's: the L1 norm, not DELLA's 1/p): the kept delta is scaled by Σ|δ_i| / Σ|kept δ_i|
  (unscaled when either sum is below 1e-7); density ≥ 1 keeps δ_i whole and unscaled.
- then: breadcrumbs, della_linear: b + λ Σ w_i δ_i' (normalize: divided by Σ w_i, a sum below 1e-8
  in magnitude counting as 1); breadcrumbs_ties, della: TIES sign election on the w_i δ_i'
  (kernels/ties.py; normalize: divided by the agreeing weights' sum).

Per tensor and model the drop becomes x_i' = where(keep, x_i, b) (exact: a dropped entry's delta is
b − b = 0) and the rescale a numerator scale, so the merge itself is kernels/ties.py's fused
delta_merge (CPU numba or Triton). Breadcrumbs' band is two magnitude_cut radix selects (no sort) on
the reversed tensor (ties to the higher index there = lower index first in ascending order); DELLA's
per-entry ranks are a stable sort per row (a rank for every entry is a sort's output, not a select's).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from cpift.errors import ParameterError
from cpift.kernels.dare import philox_uniform, tensor_seed
from cpift.kernels.select import cut_mask, magnitude_cut, magnitude_scores
from cpift.kernels.ties import delta_merge
from cpift.merge.engine import MergeResult, stream_merge
from cpift.merge.io.dryrun import MergePlan
from cpift.merge.options import MergeOptions, merge_options

from .delta import l1_scale, open_delta_inputs
from .params import Param, PathLike, per_model, value

NORMALIZE_EPS = 1e-8  # mergekit's divisor guard of a plain (non-TIES) sum of weights


def breadcrumbs_keep(x: torch.Tensor, b: torch.Tensor, density: float, gamma: float, *,
                     backend: str | None = None) -> torch.Tensor:
    """Bool mask of the entries breadcrumbs keeps (flat tensors; density < 1)."""
    n = x.numel()
    t, top = int(density * n), int(gamma * n)
    bot = max(0, n - t - top)
    xf, bf = x.flip(0), b.flip(0)  # ascending, lower index first = descending, higher index first
    scores = magnitude_scores(xf, bf, 0, n).clone()  # a scratch buffer that magnitude_cut reuses
    upper = cut_mask(scores, magnitude_cut(xf, bf, n - bot, backend=backend), 0)
    above = cut_mask(scores, magnitude_cut(xf, bf, n - bot - t, backend=backend), 0)
    return (upper & ~above).flip(0)


_DELLA_BLOCK = 1 << 20  # entries ranked at a time: slices along dim 0 are independent, so memory is a block's


def della_keep(x: torch.Tensor, b: torch.Tensor, shape: Sequence[int], density: float, epsilon: float,
               seed: int) -> torch.Tensor:
    """Bool mask of the entries DELLA keeps (flat tensors of a tensor of ``shape``; density < 1).

    Ranks run along dim 1 (mergekit's), so blocks of whole dim-0 slices are ranked one at a time:
    the same mask as ranking the tensor at once, with the temporaries of one block."""
    n = x.numel()
    if len(shape) < 2 or n == 0:
        return _ranked_keep(x, b, (1, n), density, epsilon, seed, 0)
    per = n // shape[0]
    step = max(1, _DELLA_BLOCK // per)
    keep = torch.empty(n, dtype=torch.bool, device=x.device)
    for r0 in range(0, shape[0], step):
        r1 = min(shape[0], r0 + step)
        s, e = r0 * per, r1 * per
        keep[s:e] = _ranked_keep(x[s:e], b[s:e], (r1 - r0, *shape[1:]), density, epsilon, seed, s)
    return keep


def _ranked_keep(x: torch.Tensor, b: torch.Tensor, shape: Sequence[int], density: float, epsilon: float,
                 seed: int, start: int) -> torch.Tensor:
    """della_keep of the entries start .. start + numel − 1 of a tensor, a whole number of dim-0 slices."""
    mag = torch.abs(x.float() - b.float())
    rows = mag.view(*shape)
    cols = rows.shape[1]
    # |δ| ≥ 0 (NaN too, its sign bit cleared): its float32 bits as int32 sort in the same order, faster
    order = torch.sort(rows.view(torch.int32), dim=1, stable=True).indices
    rank = torch.empty_like(rows).scatter_(1, order, _arange_like(order))
    norm = rank / (cols - 1) if cols > 1 else torch.full_like(rank, 0.5)
    p = (density - epsilon) + norm * (2 * epsilon)
    u = philox_uniform(seed, start, x.numel()).view(rows.shape).to(rows.device)
    return (u < p).reshape(-1)


def _arange_like(order: torch.Tensor) -> torch.Tensor:
    """0 .. C − 1 along dim 1 of an index tensor of any rank ≥ 2 (mergekit ranks along dim 1)."""
    view = [1] * order.dim()
    view[1] = order.shape[1]
    return torch.arange(order.shape[1], dtype=torch.float32).view(view).expand_as(order).contiguous()


def _sparse_method(method: str, base: PathLike, models: Sequence[PathLike], out: PathLike, *, weights, lam,
                   density, extra: Param | Sequence[Param], extra_name: str, elect_sign: bool, normalize: bool,
                   rescale: bool, seed: int = 0, options: MergeOptions | None = None,
                   **overrides: Any) -> MergeResult | MergePlan:
    if len(models) < 1:
        raise ParameterError(f"models: {method} needs at least 1 model besides the base")
    for fld, flag in (("normalize", normalize), ("rescale", rescale)):
        if not isinstance(flag, bool):
            raise ParameterError(f"{fld}: expected true or false, got {flag!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ParameterError(f"seed: expected a non-negative integer, got {seed!r}")
    lam, ws, ckpts, names = open_delta_inputs(method, base, models, weights, lam)
    ds = per_model(density, len(models), "density")
    es = per_model(extra, len(models), extra_name)
    della = extra_name == "epsilon"

    def field(p, name, i):
        return f"{name}[{i}]" if isinstance(p, (list, tuple)) else name

    def resolve(name: str) -> tuple[list[float], list[float]]:
        d = [value(p, name, field(density, "density", i), lo=0.0, hi=1.0, lo_open=True) for i, p in enumerate(ds)]
        e = [value(p, name, field(extra, extra_name, i), **({} if della else {"lo": 0.0, "hi": 1.0}))
             for i, p in enumerate(es)]
        if della:
            for i, (di, ei) in enumerate(zip(d, e)):
                if di < 1 and not (0 < di - ei and di + ei < 1):
                    where = f" for tensor '{name}'" if callable(ds[i]) or callable(es[i]) else ""
                    raise ParameterError(f"{field(extra, 'epsilon', i)}: density ± epsilon must lie in (0, 1), got "
                                         f"density {di:g}, epsilon {ei:g}{where}")
        return d, e

    for n in names if any(callable(p) for p in (*ds, *es)) else names[:1]:
        resolve(n)
    opts = merge_options(options, overrides)
    be = opts.backend
    shapes = {n: ckpts[0].info(n).shape for n in ckpts[0].names()}

    def combine(name, xs, out_t):
        b, rest = xs[0], list(xs[1:])
        d, e = resolve(name)
        w = [value(p, name, "weights") for p in ws]
        scales = [1.0] * len(rest)
        for i, x in enumerate(rest):
            if d[i] >= 1:
                continue
            keep = (della_keep(x, b, shapes[name], d[i], e[i], tensor_seed(seed, name, i)) if della
                    else breadcrumbs_keep(x, b, d[i], e[i], backend=be))
            if rescale:
                scales[i] = l1_scale(x, b, keep)
            rest[i] = torch.where(keep, x, b)
        if normalize and not elect_sign:
            total = sum(w)
            scales = [c / (1.0 if abs(total) < NORMALIZE_EPS else total) for c in scales]
        delta_merge(b, rest, w, lam=lam, elect_sign=elect_sign, normalize=normalize, scales=scales,
                    out=out_t, backend=be)

    params = {"weights": ws, "density": ds, extra_name: es, "lambda": lam, "normalize": normalize,
              "rescale": rescale, **({"seed": seed} if della else {})}
    return stream_merge(method, ckpts, out, combine, params=params, options=opts)


def breadcrumbs(base: PathLike, models: Sequence[PathLike], out: PathLike, *,
                weights: Sequence[Param] | None = None, density: Param | Sequence[Param] = 0.9,
                gamma: Param | Sequence[Param] = 0.01, lam: float = 1.0, normalize: bool = False,
                rescale: bool = False, options: MergeOptions | None = None,
                **overrides: Any) -> MergeResult | MergePlan:
    """Model Breadcrumbs: drop each delta's smallest and its ``gamma`` share of largest entries (keeping
    a ``density`` share), then task arithmetic b + λ Σ w_i δ_i'.

    Example:
        >>> breadcrumbs("base", ["math", "code"], "out", density=0.9, gamma=0.01)
    """
    return _sparse_method("breadcrumbs", base, models, out, weights=weights, lam=lam, density=density,
                          extra=gamma, extra_name="gamma", elect_sign=False, normalize=normalize, rescale=rescale,
                          options=options, **overrides)


def breadcrumbs_ties(base: PathLike, models: Sequence[PathLike], out: PathLike, *,
                     weights: Sequence[Param] | None = None, density: Param | Sequence[Param] = 0.9,
                     gamma: Param | Sequence[Param] = 0.01, lam: float = 1.0, normalize: bool = False,
                     rescale: bool = False, options: MergeOptions | None = None,
                     **overrides: Any) -> MergeResult | MergePlan:
    """Breadcrumbs' sparsification, then TIES sign election (``normalize``: the disjoint mean)."""
    return _sparse_method("breadcrumbs_ties", base, models, out, weights=weights, lam=lam, density=density,
                          extra=gamma, extra_name="gamma", elect_sign=True, normalize=normalize, rescale=rescale,
                          options=options, **overrides)


def della(base: PathLike, models: Sequence[PathLike], out: PathLike, *,
          weights: Sequence[Param] | None = None, density: Param | Sequence[Param] = 0.5,
          epsilon: Param | Sequence[Param] = 0.15, lam: float = 1.0, seed: int = 0, normalize: bool = True,
          rescale: bool = True, options: MergeOptions | None = None, **overrides: Any) -> MergeResult | MergePlan:
    """DELLA: drop entries with a probability that falls with their magnitude rank in the row (keep
    probabilities density ± epsilon), L1 rescale, then TIES sign election and the disjoint mean.

    The drop mask depends only on (seed, tensor name, model index, flat index, the row's ranks).
    """
    return _sparse_method("della", base, models, out, weights=weights, lam=lam, density=density,
                          extra=epsilon, extra_name="epsilon", elect_sign=True, normalize=normalize,
                          rescale=rescale, seed=seed, options=options, **overrides)


def della_linear(base: PathLike, models: Sequence[PathLike], out: PathLike, *,
                 weights: Sequence[Param] | None = None, density: Param | Sequence[Param] = 0.5,
                 epsilon: Param | Sequence[Param] = 0.15, lam: float = 1.0, seed: int = 0, normalize: bool = False,
                 rescale: bool = True, options: MergeOptions | None = None,
                 **overrides: Any) -> MergeResult | MergePlan:
    """DELLA's drop and rescale, then task arithmetic b + λ Σ w_i δ_i'."""
    return _sparse_method("della_linear", base, models, out, weights=weights, lam=lam, density=density,
                          extra=epsilon, extra_name="epsilon", elect_sign=False, normalize=normalize,
                          rescale=rescale, seed=seed, options=options, **overrides)

