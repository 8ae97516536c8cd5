# Weighted average of N flattened tensors, out = Σ w_i·x_i / Σ w_i (weights normalised once on the host
# in float64), and weighted_sum (Σ c_i·x_i, coefficients as given). One pass, N read and 1 written per entry.
# Precision: float32 per chunk (float64 inputs: float64), one rounding on store. linear_ref is the float64
# oracle.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernelslinearpy
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._scratch import check_flat, chunks, compute_dtype, scratch
from .backend import resolve
from .finite import note_written


def _normalised(weights: Sequence[float], count: int) -> list[float]:
    if count == 0:
        raise ValueError("linear: need at least one tensor")
    if len(weights) != count:
        raise ValueError(f"linear: got {count} tensors but {len(weights)} weights; give one per tensor")
    total = math.fsum(float(w) for w in weights)
    if total == 0.0 or not math.isfinite(total):
        raise ValueError(f"linear: the weights must have a finite, non-zero sum (got {total})")
    return [float(w) / total for w in weights]


def linear(xs: Sequence[torch.Tensor], weights: Sequence[float], *, out: torch.Tensor,
           backend: str | None = None) -> torch.Tensor:
    """Write Σ w_i·x_i / Σ w_i into out (same length 1-D tensors, any float storage dtypes)."""
    ws = _normalised(weights, len(xs))
    _check(xs, out)
    if resolve(backend, *xs, out) != "triton":
        return weighted_sum(xs, ws, out=out, backend=backend)
    if len(xs) == 1:
        return out.copy_(xs[0])
    # Σ w_i x_i = x_0 + Σ_{i≥1} w_i (x_i − x_0) for normalised weights: the delta kernel's pass.
    from .ties import delta_merge

    return delta_merge(xs[0], xs[1:], ws[1:], elect_sign=False, out=out, backend="triton")


def _check(xs: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    n = xs[0].numel()
    for i, x in enumerate(xs):
        check_flat(f"xs[{i}]", x, n)
    check_flat("out", out, n)


def _sum_torch(xs: Sequence[torch.Tensor], ws: Sequence[float], out: torch.Tensor) -> torch.Tensor:
    dt = compute_dtype(*xs)
    for s, e in chunks(out.numel()):
        acc = scratch("linear.acc", e - s, dt, out.device)
        tmp = scratch("linear.x", e - s, dt, out.device)
        acc.copy_(xs[0][s:e]).mul_(ws[0])
        for x, w in zip(xs[1:], ws[1:]):
            tmp.copy_(x[s:e])
            acc.add_(tmp, alpha=w)
        out[s:e].copy_(acc)
    return out


def weighted_sum(xs: Sequence[torch.Tensor], coefficients: Sequence[float], *, out: torch.Tensor,
                 backend: str | None = None) -> torch.Tensor:
    """Write Σ c_i·x_i into out, the coefficients as given (not normalised: any finite values).

    The hypersphere methods' blend (kernels/hypersphere.py). torch and fused CPU: the passes of
    ``linear``. Triton: the delta kernel over a zero base, out = 0 + Σ c_i (x_i − 0) with out itself
    as that base (zeroed first: one more write and read of the output than a dedicated kernel; x_i − 0
    is exact). Triton and the fused CPU kernel both run the chain acc = fma(c_i, x_i, acc): bit-identical
    to each other, and to the torch path where its add_(alpha=) fuses (ATen's vectorized CPU kernels;
    not under its default capability, where it rounds c_i·x_i first).
    """
    if len(xs) == 0 or len(coefficients) != len(xs):
        raise ValueError(f"weighted_sum: got {len(xs)} tensors and {len(coefficients)} coefficients; give one "
                         f"coefficient per tensor, at least one tensor")
    cs = [float(c) for c in coefficients]
    _check(xs, out)
    be = resolve(backend, *xs, out)
    if be == "cpu":
        from ._cpu import supports

        if supports(*xs, out):
            from ._linear_cpu import linear_cpu

            note_written(out, linear_cpu(list(xs), cs, out=out))
            return out
    if be == "triton":
        from .ties import delta_merge

        return delta_merge(out.zero_(), xs, cs, elect_sign=False, out=out, backend="triton")
    return _sum_torch(xs, cs, out)


def linear_ref(xs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """float64 oracle: Σ w_i·x_i / Σ w_i, returned as float64."""
    if len(xs) == 0 or len(weights) != len(xs):
        raise ValueError("linear_ref: need one weight per tensor and at least one tensor")
    acc = torch.zeros(xs[0].numel(), dtype=torch.float64, device=xs[0].device)
    for x, w in zip(xs, weights):
        acc += float(w) * x.double()
    return acc / math.fsum(float(w) for w in weights)
