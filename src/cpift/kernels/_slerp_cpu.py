# Fused CPU kernels of kernels/slerp.py's two passes (numba, imported lazily): the reduction sums exact
# float64 products in float64 per block (closer to exact than the torch path's float32 partials, so the
# two agree to that error, not bit for bit); the blend is fma(a, ca, b·cb), bit-identical to torch.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernels_slerp_cpupy
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ._cpu import BLOCK, SPAN, addresses, blocks, fma, load_span, store_span, sync_threads

LANES = 8  # independent accumulators per sum: hides the float64 add latency


@njit(inline="always", cache=True)
def _fold(t, v, w, j0):
    # The LANES running sums t (a tuple: kept in registers) plus the float64 products v[j0 + j]·w[j0 + j], lane j.
    return (t[0] + np.float64(v[j0]) * np.float64(w[j0]), t[1] + np.float64(v[j0 + 1]) * np.float64(w[j0 + 1]),
            t[2] + np.float64(v[j0 + 2]) * np.float64(w[j0 + 2]), t[3] + np.float64(v[j0 + 3]) * np.float64(w[j0 + 3]),
            t[4] + np.float64(v[j0 + 4]) * np.float64(w[j0 + 4]), t[5] + np.float64(v[j0 + 5]) * np.float64(w[j0 + 5]),
            t[6] + np.float64(v[j0 + 6]) * np.float64(w[j0 + 6]), t[7] + np.float64(v[j0 + 7]) * np.float64(w[j0 + 7]))


@njit(parallel=True, cache=True, nogil=True)
def _reduce_kernel(a, a_kind, b, b_kind, mask, has_mask, n, parts):
    for blk in prange(parts.shape[0]):
        s = blk * BLOCK
        e = min(s + BLOCK, n)
        xa = np.zeros(SPAN + LANES, dtype=np.float32)  # + LANES: a last partial group reads zeros
        xb = np.zeros(SPAN + LANES, dtype=np.float32)
        zero = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        aa, bb, ab = zero, zero, zero
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
            for j0 in range(0, m, LANES):  # entry s + LANES·q + j goes to lane j (SPAN is a multiple of LANES)
                aa = _fold(aa, xa, xa, j0)
                bb = _fold(bb, xb, xb, j0)
                ab = _fold(ab, xa, xb, j0)
        sa = 0.0
        sb = 0.0
        sab = 0.0
        for j in range(LANES):
            sa += aa[j]
            sb += bb[j]
            sab += ab[j]
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
            for j in range(m):
                v = fma(xa[j], ca, xb[j] * cb)
                if has_mask and mask[i0 + j]:
                    v = xa[j]
                xb[j] = v
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
