# Triton kernels of kernels/sce.py (variance scores, kept square sums, the erase/combine), imported
# lazily by it. Maths, order of operations and precision: see its header. Bytes per entry as in the
# fused CPU kernels (_sce_cpu.py). The combine does the torch path's float32 operations in its order
# (τ_i·w_i rounded, then added; the division by div_rn), with no mul+add contraction
# (enable_fp_fusion=False on the GPU), so its results are the torch backend's bits; the variance is
# float64 rounded once to float32, the square sums float64 partials per program, folded on the host.
# The selection's last tie index reaches the kernels in a one-entry int64 tensor (Triton specializes
# integer arguments, which would compile a kernel per value).
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import bf16_bits_rne, launch_options
from .select import Cut

_BLOCK = 1024


@triton.jit
def _kept(sc_ptr, offs, mask, cut_v, tie_ptr, HAS_CUT: tl.constexpr):
    if HAS_CUT:
        v = tl.load(sc_ptr + offs, mask=mask, other=0.0)
        last_tie = tl.load(tie_ptr)
        return mask & ((v > cut_v) | ((v == cut_v) & (offs <= last_tie)))
    return mask


@triton.jit
def _variance_kernel(base_ptr, xs, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.zeros([BLOCK], dtype=tl.float64)
    for k in tl.static_range(len(xs)):
        d = tl.load(xs[k] + offs, mask=mask, other=0.0).to(tl.float32) - b
        mean = mean + d.to(tl.float64)
    mean = mean / len(xs)
    var = tl.zeros([BLOCK], dtype=tl.float64)
    for k in tl.static_range(len(xs)):
        d = (tl.load(xs[k] + offs, mask=mask, other=0.0).to(tl.float32) - b).to(tl.float64) - mean
        var = var + d * d
    tl.store(out_ptr + offs, (var / len(xs)).to(tl.float32), mask=mask)


@triton.jit
def _square_sums_kernel(base_ptr, xs, sc_ptr, tie_ptr, part_ptr, n, cut_v, HAS_CUT: tl.constexpr,
                        BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = _kept(sc_ptr, offs, offs < n, cut_v, tie_ptr, HAS_CUT)
    b = tl.load(base_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    for k in tl.static_range(len(xs)):
        d = (tl.load(xs[k] + offs, mask=keep, other=0.0).to(tl.float32) - b).to(tl.float64)
        tl.store(part_ptr + pid * len(xs) + k, tl.sum(d * d, axis=0))


@triton.jit
def _combine_kernel(base_ptr, xs, ws, sc_ptr, tie_ptr, out_ptr, n, cut_v, eps, HAS_CUT: tl.constexpr,
                    OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    keep = _kept(sc_ptr, offs, mask, cut_v, tie_ptr, HAS_CUT)
    # The torch path's 0/1 keep factor, multiplied in: a dropped NaN or ±inf delta becomes NaN there,
    # not 0, and so it does here.
    kf = tl.where(keep, 1.0, 0.0)
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    pos_num = tl.zeros([BLOCK], dtype=tl.float32)
    neg_num = tl.zeros([BLOCK], dtype=tl.float32)
    pos_den = tl.zeros([BLOCK], dtype=tl.float32)
    neg_den = tl.zeros([BLOCK], dtype=tl.float32)
    pos_nan = tl.zeros([BLOCK], dtype=tl.int1)  # a non-finite τ_i·w_i the elected sign zeroes: NaN
    neg_nan = tl.zeros([BLOCK], dtype=tl.int1)
    for k in tl.static_range(len(xs)):
        d = (tl.load(xs[k] + offs, mask=mask, other=0.0).to(tl.float32) - b) * kf
        total = total + d
        wd = d * ws[k]
        pos_num = tl.where(d > 0.0, pos_num + wd, pos_num)
        pos_den = tl.where(d > 0.0, pos_den + ws[k], pos_den)
        neg_num = tl.where(d < 0.0, neg_num + wd, neg_num)
        neg_den = tl.where(d < 0.0, neg_den + ws[k], neg_den)
        odd = (wd != wd) | (tl.abs(wd) == float("inf"))
        pos_nan = pos_nan | (odd & ~(d > 0.0))
        neg_nan = neg_nan | (odd & ~(d < 0.0))
    up = total >= 0.0
    num = tl.where(up, pos_num, neg_num)
    den = tl.where(up, pos_den, neg_den)
    den = tl.where(den < eps, eps, den)
    r = b + tl.math.div_rn(num, den)
    r = tl.where(tl.where(up, pos_nan, neg_nan), float("nan"), r)
    if OUT_BF16:
        tl.store(out_ptr + offs, bf16_bits_rne(r), mask=mask)
    else:
        tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=mask)


def _cut_args(base: torch.Tensor, scores: torch.Tensor | None, cut: Cut | None):
    tie = torch.tensor([cut.last_tie if cut is not None else -1], dtype=torch.int64, device=base.device)
    return (scores if scores is not None else base), tie, float(cut.value) if cut is not None else 0.0


def variance_triton(base: torch.Tensor, xs: list[torch.Tensor], *, out: torch.Tensor) -> torch.Tensor:
    n = base.numel()
    if n:
        _variance_kernel[(triton.cdiv(n, _BLOCK),)](base, tuple(xs), out, n, BLOCK=_BLOCK, **launch_options())
    return out


def square_sums_triton(base: torch.Tensor, xs: list[torch.Tensor], scores: torch.Tensor | None,
                       cut: Cut | None) -> list[float]:
    n = base.numel()
    if n == 0:
        return [0.0] * len(xs)
    programs = triton.cdiv(n, _BLOCK)
    parts = torch.zeros(programs * len(xs), dtype=torch.float64, device=base.device)
    sc, tie, cut_v = _cut_args(base, scores, cut)
    _square_sums_kernel[(programs,)](base, tuple(xs), sc, tie, parts, n, cut_v, HAS_CUT=cut is not None,
                                     BLOCK=_BLOCK, **launch_options())
    return parts.view(programs, len(xs)).sum(0).tolist()


def combine_triton(base: torch.Tensor, xs: list[torch.Tensor], weights: list[float], scores: torch.Tensor | None,
                   cut: Cut | None, *, out: torch.Tensor) -> torch.Tensor:
    n = base.numel()
    if n:
        bf16 = out.dtype == torch.bfloat16
        sc, tie, cut_v = _cut_args(base, scores, cut)
        _combine_kernel[(triton.cdiv(n, _BLOCK),)](
            base, tuple(xs), tuple(float(w) for w in weights), sc, tie, out.view(torch.int16) if bf16 else out,
            n, cut_v, 1e-6, HAS_CUT=cut is not None, OUT_BF16=bf16, BLOCK=_BLOCK, **launch_options())
    return out
