# Fused CPU kernel of kernels/linear.py (out = Σ w_i·x_i with host-normalised weights), compiled by numba
# and imported lazily by it.
#
# One pass: each BLOCK of entries (a prange over blocks) reads the N inputs once and writes the output
# once: N·s bytes read and s written per entry (s the storage size); float32 buffers of one SPAN only.
# Exactness: the torch path's float32 operations in its order, so results are its bits: acc = x_0·w_0,
# then acc = fma(x_i, w_i, acc) (torch's add_(alpha=) is a fused multiply-add), one rounding on store;
# weights rounded to float32 as torch rounds a float32 op's Python scalars.
# It also returns, per block, whether a stored entry is NaN/±inf (the engine's finiteness check).
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ._cpu import BLOCK, SPAN, addresses, blocks, fma, load_span, store_span, sync_threads


@njit(parallel=True, cache=True, nogil=True)
def _linear_kernel(xs, kinds, ws, out, out_kind, n, bad):
    m = xs.shape[0]
    for blk in prange(bad.shape[0]):
        s = blk * BLOCK
        e = min(s + BLOCK, n)
        acc = np.empty(SPAN, dtype=np.float32)
        x = np.empty(SPAN, dtype=np.float32)
        flag = 0
        for i0 in range(s, e, SPAN):
            L = min(SPAN, e - i0)
            load_span(xs[0], kinds[0], i0, L, acc)
            for j in range(L):
                acc[j] = acc[j] * ws[0]
            for k in range(1, m):
                load_span(xs[k], kinds[k], i0, L, x)
                for j in range(L):
                    acc[j] = fma(x[j], ws[k], acc[j])
            flag |= store_span(out, out_kind, i0, L, acc)
        bad[blk] = flag


def linear_cpu(xs: list[torch.Tensor], weights: list[float], *, out: torch.Tensor) -> bool:
    """Fused CPU linear on validated contiguous CPU tensors and normalised weights; returns True when
    every output entry is finite."""
    n = out.numel()
    sync_threads()
    ptrs, kinds = addresses(xs)
    (o_ptr,), (o_kind,) = addresses([out])
    bad = np.zeros(blocks(n), dtype=np.int64)
    _linear_kernel(ptrs, kinds, np.array(weights, dtype=np.float32), o_ptr, o_kind, n, bad)
    return not bad.any()
