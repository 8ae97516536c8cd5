# SLERP of two flattened tensors (docs/cpi-ft.md#slerp, mergekit 0.1.5's constants) in two passes:
# slerp_reduce (‖a‖², ‖b‖², ⟨a,b⟩, optionally over non-excluded entries), host coefficients in float64,
# slerp_blend (ca·a + cb·b, optionally keeping masked entries of b: CPI's transplant).
# Precision: float32 per chunk (float64 inputs: float64), float64 fold of the partials, one rounding on
# store. slerp_ref is the float64 oracle.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernelsslerppy
from __future__ import annotations

import math

import torch

from ._scratch import check_flat, chunks, compute_dtype, scratch
from .backend import resolve
from .finite import note_written

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def _fused_cpu(*tensors: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """True when the fused CPU kernels take these tensors (float64 ones stay on the torch path)."""
    from ._cpu import supports

    return supports(*tensors) and (mask is None or (mask.dtype == torch.bool and mask.device.type == "cpu"
                                                    and mask.is_contiguous()))


def slerp_reduce(
    a: torch.Tensor, b: torch.Tensor, *, exclude: torch.Tensor | None = None, backend: str | None = None
) -> tuple[float, float, float]:
    """Return (‖a‖², ‖b‖², ⟨a,b⟩), leaving out entries where the bool tensor `exclude` is True.

    ``backend``: 'torch', 'cpu', 'triton' or 'auto' (default: $CPIFT_BACKEND, else auto = Triton on
    CUDA, the fused CPU kernels on the CPU). float64 inputs always take the torch path.
    """
    n = a.numel()
    check_flat("a", a)
    check_flat("b", b, n)
    if exclude is not None:
        check_flat("exclude", exclude, n)
    dt = compute_dtype(a, b)
    be = resolve(backend, a, b)
    if be == "cpu" and _fused_cpu(a, b, mask=exclude):
        from ._slerp_cpu import slerp_reduce_cpu

        return slerp_reduce_cpu(a, b, exclude=exclude)
    if dt == torch.float32 and be == "triton":
        from ._slerp_triton import slerp_reduce_triton

        return slerp_reduce_triton(a, b, exclude=exclude)
    aa = bb = ab = 0.0
    for s, e in chunks(n):
        fa = scratch("slerp.a", e - s, dt, a.device)
        fb = scratch("slerp.b", e - s, dt, a.device)
        fa.copy_(a[s:e])
        fb.copy_(b[s:e])
        if exclude is not None:
            # Zeroing in the scratch copy (never the input) drops the entry from all three sums.
            fa.masked_fill_(exclude[s:e], 0.0)
            fb.masked_fill_(exclude[s:e], 0.0)
        aa += torch.dot(fa, fa).item()
        bb += torch.dot(fb, fb).item()
        ab += torch.dot(fa, fb).item()
    return aa, bb, ab


def slerp_coefficients(
    aa: float,
    bb: float,
    ab: float,
    t: float,
    *,
    dot_threshold: float = DOT_THRESHOLD,
    eps: float = EPS,
) -> tuple[float, float]:
    """Return (ca, cb) such that SLERP(a, b, t) = ca·a + cb·b, from the three sums of slerp_reduce."""
    na = math.sqrt(aa)
    nb = math.sqrt(bb)
    # mergekit leaves a (near) zero vector unnormalised: its norm counts as 1.
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    d = min(1.0, max(-1.0, ab / (na * nb)))
    if abs(d) > dot_threshold:
        return 1.0 - t, t
    omega = math.acos(d)
    sin_omega = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


def slerp_blend(
    a: torch.Tensor,
    b: torch.Tensor,
    ca: float,
    cb: float,
    *,
    out: torch.Tensor,
    keep: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Write ca·a + cb·b into out; where the bool tensor `keep` is True, copy a unchanged."""
    n = a.numel()
    check_flat("a", a)
    check_flat("b", b, n)
    check_flat("out", out, n)
    if keep is not None:
        check_flat("keep", keep, n)
    dt = compute_dtype(a, b)
    be = resolve(backend, a, b, out)
    if be == "cpu" and _fused_cpu(a, b, out, mask=keep):
        from ._slerp_cpu import slerp_blend_cpu

        note_written(out, slerp_blend_cpu(a, b, ca, cb, out=out, keep=keep))
        return out
    if dt == torch.float32 and out.dtype != torch.float64 and be == "triton":
        from ._slerp_triton import slerp_blend_triton

        return slerp_blend_triton(a, b, ca, cb, out=out, keep=keep)
    for s, e in chunks(n):
        fa = scratch("slerp.a", e - s, dt, a.device)
        fb = scratch("slerp.b", e - s, dt, a.device)
        fa.copy_(a[s:e])
        fb.copy_(b[s:e])
        # fb ← cb·b + ca·a, leaving fa = a (exact: the widening copy loses nothing) for `keep`.
        fb.mul_(cb).add_(fa, alpha=ca)
        if keep is not None:
            torch.where(keep[s:e], fa, fb, out=fb)
        out[s:e].copy_(fb)
    return out


def slerp(
    a: torch.Tensor, b: torch.Tensor, t: float, *, out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """SLERP of two same-length 1-D tensors (weight 1−t on a, t on b), stored in out (a's dtype)."""
    if out is None:
        out = torch.empty_like(a)
    ca, cb = slerp_coefficients(*slerp_reduce(a, b, backend=backend), t)
    return slerp_blend(a, b, ca, cb, out=out, backend=backend)


def slerp_ref(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    *,
    exclude: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 oracle of docs/cpi-ft.md#slerp (with the same optional exclude/keep masks); returns float64."""
    a64 = a.double()
    b64 = b.double()
    ra, rb = a64, b64
    if exclude is not None:
        ra = torch.where(exclude, 0.0, a64)
        rb = torch.where(exclude, 0.0, b64)
    na = torch.linalg.vector_norm(ra)
    nb = torch.linalg.vector_norm(rb)
    ua = ra / na if na > EPS else ra
    ub = rb / nb if nb > EPS else rb
    d = torch.dot(ua, ub).clamp(-1.0, 1.0)
    if d.abs() > DOT_THRESHOLD:
        res = (1.0 - t) * a64 + t * b64
    else:
        omega = torch.acos(d)
        res = (torch.sin((1.0 - t) * omega) * a64 + torch.sin(t * omega) * b64) / torch.sin(omega)
    if keep is not None:
        res = torch.where(keep, a64, res)
    return res
