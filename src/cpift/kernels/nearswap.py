# NearSwap (mergekit 0.1.5's `nearswap`) of a base a and a model b: w = clamp(t / max(|a − b|, 1e-6), 0, 1),
# out = w·b + (1 − w)·a. One pass, 2 read and 1 written per entry.
# Precision: float32 (float64 inputs: float64), mergekit's operations in its order, each rounded once and
# never fused: bit-identical to mergekit in float32 and across backends. nearswap_ref is the float64 oracle.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernelsnearswappy
from __future__ import annotations

import math

import torch

from ._scratch import check_flat, chunks, compute_dtype, scratch
from .backend import resolve
from .finite import note_written

EPS = 1e-6  # mergekit's floor under |a − b|


def _check(a: torch.Tensor, b: torch.Tensor, t: float) -> None:
    check_flat("a", a)
    check_flat("b", b, a.numel())
    if not (math.isfinite(t) and t >= 0.0):
        raise ValueError(f"nearswap: t must be a finite number ≥ 0, got {t}")


def nearswap(a: torch.Tensor, b: torch.Tensor, t: float, *, out: torch.Tensor,
             backend: str | None = None) -> torch.Tensor:
    """Write w·b + (1 − w)·a, w = clamp(t / max(|a − b|, 1e-6), 0, 1), into out (1-D tensors)."""
    _check(a, b, t)
    n = a.numel()
    check_flat("out", out, n)
    dt = compute_dtype(a, b)
    be = resolve(backend, a, b, out)
    if be == "cpu" and dt == torch.float32:
        from ._cpu import supports

        if supports(a, b, out):
            from ._nearswap_cpu import nearswap_cpu

            note_written(out, nearswap_cpu(a, b, float(t), out=out))
            return out
    if be == "triton" and dt == torch.float32:
        from ._nearswap_triton import nearswap_triton

        return nearswap_triton(a, b, float(t), out=out)
    for s, e in chunks(n):
        m = e - s
        fa = scratch("nearswap.a", m, dt, a.device).copy_(a[s:e])
        fb = scratch("nearswap.b", m, dt, a.device).copy_(b[s:e])
        w = scratch("nearswap.w", m, dt, a.device)
        torch.sub(fa, fb, out=w).abs_().clamp_(min=EPS).reciprocal_().mul_(t).clamp_(0.0, 1.0)
        fb.mul_(w)  # w·b
        w.neg_().add_(1.0).mul_(fa)  # (1 − w)·a
        out[s:e].copy_(fb.add_(w))
    return out


def nearswap_ref(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """float64 oracle of nearswap (returns float64)."""
    _check(a, b, t)
    a64, b64 = a.double(), b.double()
    w = (t / (a64 - b64).abs().clamp(min=EPS)).clamp(0.0, 1.0)
    return w * b64 + (1.0 - w) * a64
