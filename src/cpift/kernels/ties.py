# The element-wise core of task arithmetic, TIES, DARE and breadcrumbs (delta_merge): per entry δ_i = x_i − b,
# trimmed by a Cut or a Band and/or dropped by the DARE mask (÷ density), then b + λ Σ w_i δ_i, or with sign
# election b + λ Σ_{agreeing i} w_i δ_i / Σ_{agreeing i} w_i (normalize=False: no division).
# One pass, (N + 1) inputs read and 1 output written per entry; no mask is read.
# Precision: float32 per chunk (float64 inputs: float64), one rounding on store; torch, fused CPU and
# Triton are bit-identical. delta_merge_ref is the float64 oracle.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernelstiespy
from __future__ import annotations

from collections.abc import Sequence

import torch

from ._scratch import check_flat, chunks, compute_dtype, scratch
from .backend import resolve
from .band import Band, band_mask
from .dare import keep_factor, keep_mask
from .finite import note_written
from .select import Cut, cut_keep, cut_mask


def _validate(
    base: torch.Tensor,
    xs: Sequence[torch.Tensor],
    weights: Sequence[float],
    cuts: Sequence[Cut] | None,
    drop_density: float | Sequence[float] | None,
    drop_seeds: Sequence[int] | None,
    bands: Sequence[Band] | None = None,
) -> list[float] | None:
    """Raise ValueError on inconsistent arguments; return the per-model drop densities (or None)."""
    n = base.numel()
    check_flat("base", base)
    if len(xs) == 0:
        raise ValueError("delta_merge: need at least one task tensor")
    for i, x in enumerate(xs):
        check_flat(f"xs[{i}]", x, n)
    if len(weights) != len(xs):
        raise ValueError(f"delta_merge: {len(xs)} tensors but {len(weights)} weights; give one per tensor")
    if cuts is not None and len(cuts) != len(xs):
        raise ValueError(f"delta_merge: {len(xs)} tensors but {len(cuts)} cuts; give one per tensor")
    if bands is not None and (cuts is not None or len(bands) != len(xs)):
        raise ValueError(f"delta_merge: {len(xs)} tensors; give one band per tensor, and no cuts with bands")
    if drop_density is None:
        return None
    if isinstance(drop_density, (int, float)):
        densities = [float(drop_density)] * len(xs)
    else:
        densities = [float(p) for p in drop_density]
    if len(densities) != len(xs):
        raise ValueError(f"delta_merge: {len(xs)} tensors but {len(densities)} drop densities")
    for p in densities:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"delta_merge: drop_density must be in (0, 1], got {p}")
    if drop_seeds is None or len(drop_seeds) != len(xs):
        raise ValueError("delta_merge: drop_density needs one drop seed per tensor (drop_seeds)")
    return densities


def delta_merge(
    base: torch.Tensor,
    xs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    lam: float = 1.0,
    cuts: Sequence[Cut] | None = None,
    bands: Sequence[Band] | None = None,
    drop_density: float | Sequence[float] | None = None,
    drop_seeds: Sequence[int] | None = None,
    elect_sign: bool,
    normalize: bool = True,
    scales: Sequence[float] | None = None,
    out: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """Write base + λ·(merged, optionally trimmed/banded/dropped/sign-elected task deltas) into out.

    ``backend``: 'torch', 'cpu', 'triton' or 'auto' (default: $CPIFT_BACKEND, else auto = Triton on
    CUDA, the fused CPU kernel on the CPU); float64 inputs run on the torch path whatever the backend,
    and bands on CUDA run on it too.
    """
    densities = _validate(base, xs, weights, cuts, drop_density, drop_seeds, bands)
    n = base.numel()
    check_flat("out", out, n)
    dt = compute_dtype(base, *xs)
    # DARE's 1/p_i rescale and the scales c_i are folded into the numerator weights; the TIES
    # denominator keeps w_i.
    num_w = _numerator_weights(weights, densities, scales)
    be = resolve(backend, base, *xs, out)
    if be == "cpu" and dt == torch.float32:
        from ._cpu import supports

        if supports(base, *xs, out):
            from ._ties_cpu import delta_merge_cpu

            finite = delta_merge_cpu(base, list(xs), [float(w) for w in weights], num_w, lam=lam,
                                     cuts=None if cuts is None else list(cuts),
                                     bands=None if bands is None else list(bands), densities=densities,
                                     drop_seeds=None if drop_seeds is None else list(drop_seeds),
                                     elect_sign=elect_sign, normalize=normalize, out=out)
            note_written(out, finite)
            return out
    if be == "triton" and dt == torch.float32 and bands is None:
        from ._ties_triton import delta_merge_triton

        return delta_merge_triton(base, list(xs), [float(w) for w in weights], num_w, lam=lam,
                                  cuts=None if cuts is None else list(cuts), densities=densities,
                                  drop_seeds=None if drop_seeds is None else list(drop_seeds),
                                  elect_sign=elect_sign, normalize=normalize, out=out)
    for s, e in chunks(n):
        m = e - s
        fb = scratch("ties.base", m, dt, base.device)
        acc = scratch("ties.acc", m, dt, base.device)
        keep = scratch("ties.keep", m, torch.float32, base.device)
        fb.copy_(base[s:e])
        acc.zero_()
        deltas = []
        for i, x in enumerate(xs):
            d = scratch(f"ties.d{i}" if elect_sign else "ties.d", m, dt, base.device)
            d.copy_(x[s:e]).sub_(fb)
            # Masks as 0/1 float factors: float ops cost a fraction of bool compares + fills here.
            if cuts is not None or bands is not None:
                score = torch.abs(d, out=keep) if dt == torch.float32 else d.abs()
                # band_mask returns a new bool mask before keep (the scores' buffer) is overwritten
                d.mul_(cut_keep(score, cuts[i], s, out=keep) if cuts is not None
                       else keep.copy_(band_mask(score, bands[i], s)))
            if densities is not None:
                d.mul_(keep_factor(drop_seeds[i], s, m, densities[i], out=keep))
            acc.add_(d, alpha=num_w[i])
            deltas.append(d)
        if elect_sign:
            acc = _elect(acc, deltas, num_w, weights, m, dt, normalize)
        fb.add_(acc, alpha=float(lam))
        out[s:e].copy_(fb)
    return out


def _numerator_weights(weights: Sequence[float], densities: list[float] | None,
                       scales: Sequence[float] | None) -> list[float]:
    """w_i · c_i / p_i: the weights of the deltas in the numerator sums."""
    if scales is not None and len(scales) != len(weights):
        raise ValueError(f"delta_merge: {len(weights)} weights but {len(scales)} scales; give one per tensor")
    return [float(w) * (float(scales[i]) if scales is not None else 1.0) / (densities[i] if densities else 1.0)
            for i, w in enumerate(weights)]


def _elect(
    acc: torch.Tensor, deltas: list[torch.Tensor], num_w: list[float], weights: Sequence[float],
    m: int, dt: torch.dtype, normalize: bool,
) -> torch.Tensor:
    """TIES election on one chunk: Σ_agree w_i' δ_i / Σ_agree w_i, 0 where that sum is 0."""
    sign = acc.sign_()  # acc is free again: reuse it as s
    num = scratch("ties.num", m, dt, acc.device).zero_()
    if not normalize:
        tmp = scratch("ties.tmp", m, dt, acc.device)
        for d, wn in zip(deltas, num_w):
            num.add_(torch.mul(d, sign, out=tmp).clamp_(min=0.0), alpha=wn)
        return num.mul_(sign)
    den = scratch("ties.den", m, dt, acc.device).zero_()
    tmp = scratch("ties.tmp", m, dt, acc.device)
    for d, wn, w in zip(deltas, num_w, weights):
        # δ_i·s is |δ_i| where model i agrees, ≤ 0 where it does not: clamp keeps the former.
        torch.mul(d, sign, out=tmp).clamp_(min=0.0)
        num.add_(tmp, alpha=wn)
        den.add_(tmp.sign_(), alpha=float(w))
    nonzero = scratch("ties.nz", m, dt, acc.device)
    torch.abs(den, out=nonzero).sign_()
    # den ← 1 where it is 0 (adding exactly 0 elsewhere), then zero those entries afterwards.
    den.add_(torch.sub(1.0, nonzero, out=tmp))
    return num.mul_(sign).div_(den).mul_(nonzero)


def delta_merge_ref(
    base: torch.Tensor,
    xs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    lam: float = 1.0,
    cuts: Sequence[Cut] | None = None,
    bands: Sequence[Band] | None = None,
    drop_density: float | Sequence[float] | None = None,
    drop_seeds: Sequence[int] | None = None,
    elect_sign: bool,
    normalize: bool = True,
    scales: Sequence[float] | None = None,
    precision: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Oracle of delta_merge, whole-tensor, in `precision` (float64 by default); returns that dtype."""
    densities = _validate(base, xs, weights, cuts, drop_density, drop_seeds, bands)
    n = base.numel()
    b = base.to(precision)
    deltas = []
    for i, x in enumerate(xs):
        d = x.to(precision) - b
        if cuts is not None:
            # The trim score is the float32 |δ| that magnitude_cut ranks.
            score = d.abs().float()
            d = torch.where(cut_mask(score, cuts[i], 0), d, 0.0)
        if bands is not None:
            d = torch.where(band_mask(d.abs().float(), bands[i], 0), d, 0.0)
        if densities is not None:
            d = torch.where(keep_mask(drop_seeds[i], 0, n, densities[i]), d / densities[i], 0.0)
        deltas.append(d)
    c = torch.tensor([1.0] * len(xs) if scales is None else [float(v) for v in scales], dtype=precision,
                     device=b.device).unsqueeze(1)
    w = torch.tensor([float(v) for v in weights], dtype=precision, device=b.device).unsqueeze(1)
    stacked = torch.stack(deltas)
    weighted = (w * c * stacked).sum(0)
    if not elect_sign:
        return b + lam * weighted
    elected = torch.sign(weighted)
    agree = (torch.sign(stacked) == elected) & (elected != 0)
    numerator = (w * c * stacked * agree).sum(0)
    if not normalize:
        return b + lam * numerator
    denominator = (w * agree).sum(0)
    merged = torch.where(denominator != 0, numerator / torch.where(denominator != 0, denominator, 1.0), 0.0)
    return b + lam * merged
