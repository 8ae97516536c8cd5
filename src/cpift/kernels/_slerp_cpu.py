# Fused CPU kernels of kernels/slerp.py's two passes (numba, imported lazily): the reduction sums exact
# float64 products in float64 per block (closer to exact than the torch path's float32 partials, so the
# two agree to that error, not bit for bit); the blend is fma(a, ca, b·cb), bit-identical to torch.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernels_slerp_cpupy
from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._cpu import BLOCK, SPAN, addresses, blocks, fma, load_span, store_span, sync_threads

LANES = 8  # independent accumulators per sum: hides the float64 add latency


@intrinsic
def _fold_span(typingctx, xa, xb, groups, acc):
    """acc (3·LANES float64: ‖a‖², ‖b‖², ⟨a,b⟩ lanes) += the float64 products of xa and xb, entry LANES·q + j
    to lane j, for q < groups: per lane the same multiplies and adds, in the same order, as a scalar loop,
    written as LLVM vectors of LANES doubles (numba does not vectorise the lanes of a tuple by itself)."""
    if not all(isinstance(t, types.Array) for t in (xa, xb, acc)):
        return None
    sig = types.void(xa, xb, types.int64, acc)

    def codegen(context, builder, signature, args):
        f32v, f64v = ir.VectorType(ir.FloatType(), LANES), ir.VectorType(ir.DoubleType(), LANES)
        pa, pb, pacc = (context.make_array(signature.args[k])(context, builder, args[k]).data for k in (0, 1, 3))
        lanes = [builder.bitcast(builder.gep(pacc, [ir.Constant(ir.IntType(64), LANES * k)]), f64v.as_pointer())
                 for k in range(3)]
        sums = [cgutils.alloca_once_value(builder, builder.load(p, align=8)) for p in lanes]
        with cgutils.for_range(builder, args[2]) as loop:
            at = builder.mul(loop.index, ir.Constant(ir.IntType(64), LANES))
            va, vb = (builder.fpext(builder.load(builder.bitcast(builder.gep(p, [at]), f32v.as_pointer()), align=4),
                                    f64v) for p in (pa, pb))
            for slot, (x, y) in zip(sums, ((va, va), (vb, vb), (va, vb))):
                builder.store(builder.fadd(builder.load(slot), builder.fmul(x, y)), slot)
        for slot, p in zip(sums, lanes):
            builder.store(builder.load(slot), p, align=8)
        return context.get_dummy_value()

    return sig, codegen


@njit(parallel=True, cache=True, nogil=True)
def _reduce_kernel(a, a_kind, b, b_kind, mask, has_mask, n, parts):
    for blk in prange(parts.shape[0]):
        s = blk * BLOCK
        e = min(s + BLOCK, n)
        xa = np.zeros(SPAN + LANES, dtype=np.float32)  # + LANES: a last partial group reads zeros
        xb = np.zeros(SPAN + LANES, dtype=np.float32)
        acc = np.zeros(3 * LANES, dtype=np.float64)  # the lanes of ‖a‖², ‖b‖², ⟨a,b⟩
        for i0 in range(s, e, SPAN):
            m = min(SPAN, e - i0)
            load_span(a, a_kind, i0, m, xa)
            load_span(b, b_kind, i0, m, xb)
            for j in range(m, m + LANES):
                xa[j] = 0.0  # a product 0·0 = +0 adds nothing to a lane (whose sum is never −0)
                xb[j] = 0.0
            if has_mask:
                for j in range(m):
                    if mask[i0 + j]:
                        xa[j] = 0.0
                        xb[j] = 0.0
            _fold_span(xa, xb, (m + LANES - 1) // LANES, acc)  # entry i0 + LANES·q + j to lane j (SPAN: a multiple)
        sa = 0.0
        sb = 0.0
        sab = 0.0
        for j in range(LANES):
            sa += acc[j]
            sb += acc[LANES + j]
            sab += acc[2 * LANES + j]
        parts[blk, 0] = sa
        parts[blk, 1] = sb
        parts[blk, 2] = sab


@njit(parallel=True, cache=True, nogil=True)
def _blend_kernel(a, a_kind, b, b_kind, ca, cb, mask, has_mask, out, out_kind, n, bad):
    for blk in prange(bad.shape[0]):
        s = blk * BLOCK
        e = min(s + BLOCK, n)
        xa = np.empty(SPAN, dtype=np.float32)
        xb = np.empty(SPAN, dtype=np.float32)
        flag = 0
        for i0 in range(s, e, SPAN):
            m = min(SPAN, e - i0)
            load_span(a, a_kind, i0, m, xa)
            load_span(b, b_kind, i0, m, xb)
            if has_mask:  # two loops: the one without a mask vectorises
                for j in range(m):
                    v = fma(xa[j], ca, xb[j] * cb)
                    xb[j] = xa[j] if mask[i0 + j] else v
            else:
                for j in range(m):
                    xb[j] = fma(xa[j], ca, xb[j] * cb)
            flag |= store_span(out, out_kind, i0, m, xb)
        bad[blk] = flag


def _mask(m: torch.Tensor | None) -> tuple[np.ndarray, bool]:
    if m is None:
        return np.zeros(1, dtype=np.uint8), False
    return m.view(torch.uint8).numpy(), True


def slerp_reduce_cpu(a: torch.Tensor, b: torch.Tensor, *, exclude: torch.Tensor | None) -> tuple[float, float, float]:
    """(‖a‖², ‖b‖², ⟨a,b⟩) over the entries not excluded (validated contiguous CPU tensors)."""
    n = a.numel()
    sync_threads()
    ptrs, kinds = addresses([a, b])
    mask, has_mask = _mask(exclude)
    parts = np.zeros((blocks(n), 3), dtype=np.float64)
    _reduce_kernel(ptrs[0], kinds[0], ptrs[1], kinds[1], mask, has_mask, n, parts)
    aa = bb = ab = 0.0
    for pa, pb, pab in parts.tolist():  # block order: deterministic for any thread count
        aa += pa
        bb += pb
        ab += pab
    return aa, bb, ab


def slerp_blend_cpu(a: torch.Tensor, b: torch.Tensor, ca: float, cb: float, *, out: torch.Tensor,
                    keep: torch.Tensor | None) -> bool:
    """out ← ca·a + cb·b (a where keep); returns True when every output entry is finite."""
    n = a.numel()
    sync_threads()
    ptrs, kinds = addresses([a, b, out])
    mask, has_mask = _mask(keep)
    bad = np.zeros(blocks(n), dtype=np.int64)
    _blend_kernel(ptrs[0], kinds[0], ptrs[1], kinds[1], np.float32(ca), np.float32(cb), mask, has_mask,
                  ptrs[2], kinds[2], n, bad)
    return not bad.any()
