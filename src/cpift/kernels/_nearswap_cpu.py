# Fused CPU kernel of kernels/nearswap.py (w = clamp(t / max(|a − b|, 1e-6), 0, 1), out = w·b + (1 − w)·a),
# compiled by numba and imported lazily by it.
#
# One pass: each BLOCK of entries (a prange over blocks) reads a and b once and writes out once:
# 2·s bytes read and s written per entry (s the storage size); no temporaries.
# Exactness: the torch path's float32 operations in its order (reciprocal, ·t, clamp, w·b, 1 − w,
# (1 − w)·a, sum), each rounded once and never fused (numba does not contract without fastmath), so
# results are its bits. Returns whether every stored entry is finite (kernels/finite.py).
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ._cpu import BLOCK, addresses, blocks, load_at, store_at, sync_threads


@njit(parallel=True, cache=True, nogil=True)
def _nearswap_kernel(a_addr, a_kind, b_addr, b_kind, t, eps, out, out_kind, n, bad):
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for blk in prange(bad.shape[0]):
        s = blk * BLOCK
        e = min(s + BLOCK, n)
        flag = 0
        for i in range(s, e):
            a = load_at(a_addr, i, a_kind)
            b = load_at(b_addr, i, b_kind)
            d = np.float32(abs(np.float32(a - b)))
            if d < eps:
                d = eps
            w = np.float32(np.float32(one / d) * t)
            if w < zero:
                w = zero
            if w > one:
                w = one
            r = np.float32(np.float32(w * b) + np.float32(np.float32(one - w) * a))
            flag |= store_at(out, i, r, out_kind)
        bad[blk] = flag


def nearswap_cpu(a: torch.Tensor, b: torch.Tensor, t: float, *, out: torch.Tensor) -> bool:
    """Fused CPU nearswap on validated contiguous CPU tensors; True when every output entry is finite."""
    n = out.numel()
    sync_threads()
    (pa, pb, po), (ka, kb, ko) = addresses([a, b, out])
    bad = np.zeros(blocks(n), dtype=np.int64)
    _nearswap_kernel(pa, ka, pb, kb, np.float32(t), np.float32(1e-6), po, ko, n, bad)
    return not bad.any()
