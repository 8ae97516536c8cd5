# Fused CPU kernels of kernels/select.py, compiled by numba and imported lazily by it. magnitude_cut's
# two histogram passes are kernels/_scores_cpu.py's (per-worker histograms, added on the host); this
# file finds the r-th tie: one parallel pass counts the scores equal to v per work block of BLOCK
# entries, the host adds the counts in block order up to the block holding the r-th, and one
# sequential scan of that block gives its flat index. Scores are the float32 |x − base| of
# abs_delta, bit-identical to the torch backend's, so the index is the same.
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ._cpu import BLOCK, as_array, blocks, claim, sync_threads, workers
from ._scores_cpu import abs_delta


@njit(parallel=True, cache=True, nogil=True)
def _tie_counts_kernel(x, xk, b, bk, has_base, n, value, counts, nworkers, counter):
    nwork = counts.size
    for t in prange(nworkers):
        while True:
            w = claim(counter)
            if w >= nwork:
                break
            c = 0
            for i in range(w * BLOCK, min(n, w * BLOCK + BLOCK)):
                c += np.int64(abs_delta(x, xk, b, bk, has_base, i) == value)
            counts[w] = c


@njit(cache=True, nogil=True)
def _nth_tie(x, xk, b, bk, has_base, s, e, value, r):
    for i in range(s, e):
        if abs_delta(x, xk, b, bk, has_base, i) == value:
            r -= 1
            if r == 0:
                return i
    return -1


def tie_index_cpu(x: torch.Tensor, base: torch.Tensor | None, value: float, r: int) -> tuple[int, int]:
    """(flat index of the r-th score equal to value, lowest index first, or −1; number of such scores)."""
    n = x.numel()
    nwork = blocks(n)
    if not nwork:
        return -1, 0
    sync_threads()
    xa, xk = as_array(x)
    ba, bk = as_array(base) if base is not None else (xa, xk)
    v = np.float32(value)
    counts = np.empty(nwork, dtype=np.int64)
    _tie_counts_kernel(xa, xk, ba, bk, base is not None, n, v, counts, workers(nwork), np.zeros(1, dtype=np.int64))
    seen = np.cumsum(counts)
    w = int(np.searchsorted(seen, r))  # the first block whose running count reaches r
    if w == nwork:
        return -1, int(seen[-1])
    before = int(seen[w - 1]) if w else 0
    return _nth_tie(xa, xk, ba, bk, base is not None, w * BLOCK, min(n, w * BLOCK + BLOCK), v, r - before), int(seen[-1])
