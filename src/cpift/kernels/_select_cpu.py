# Fused CPU kernels of kernels/select.py, compiled by numba and imported lazily by it. magnitude_cut's
# two histogram passes are kernels/_scores_cpu.py's (per-worker histograms, added on the host); this
# file finds the r-th tie: one parallel pass counts the scores equal to v per work block of BLOCK
# entries, the host adds the counts in block order up to the block holding the r-th, and one
# sequential scan of that block gives its flat index. Scores are the float32 |x − base| of
# abs_delta, bit-identical to the torch backend's, so the index is the same.
#
# bracket_select_cpu selects in one pass instead of those two or three: given a bracket [lo, hi] that
# a sample says holds the k-th largest score, one parallel pass counts per work block the scores
# above hi and writes the scores inside the bracket, with their offsets in the block, into that
# block's slot of a reused buffer (CAP entries per block: 1/8 of it). The k-th largest, the counts
# above and equal to it and the flat index of its r-th tie are then found in the buffer alone (about
# 2% of the entries), in block order, so lowest index first. It reports a miss (the caller falls back
# to radix select) when the bracket does not hold the k-th largest or a block's slot overflows.
# Bytes: 2x the storage size read per entry, once, and ~0.1 byte written (8 per candidate).
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ._cpu import BF16, BLOCK, as_array, blocks, claim, sync_threads, workers
from ._scores_cpu import abs_delta

CAP = BLOCK // 8  # bracket candidates a work block may hold


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
    index = _nth_tie(xa, xk, ba, bk, base is not None, w * BLOCK, min(n, w * BLOCK + BLOCK), v, r - before)
    return index, int(seen[-1])


@njit(inline="always", cache=True)
def _bracket_block(x, xk, b, bk, has_base, s, e, lo, hi, vals, offs, slot):
    a = 0
    c = 0
    for i in range(s, e):  # branch-free: the compares are unpredictable
        v = abs_delta(x, xk, b, bk, has_base, i)
        j = slot + min(c, CAP - 1)  # written every time, kept only when v is a candidate
        vals[j] = v
        offs[j] = i - s
        a += np.int64(v > hi)
        c += np.int64(v >= lo) & np.int64(v <= hi)
    return a, c


@njit(parallel=True, cache=True, nogil=True)
def _bracket_kernel(x, xk, b, bk, has_base, n, lo, hi, above, counts, vals, offs, nworkers, counter):
    nwork = counts.size
    for t in prange(nworkers):
        while True:
            w = claim(counter)
            if w >= nwork:
                break
            s = w * BLOCK
            e = min(n, s + BLOCK)
            if has_base and xk == BF16 and bk == BF16:  # the common case, its kinds constants
                above[w], counts[w] = _bracket_block(x, BF16, b, BF16, True, s, e, lo, hi, vals, offs, w * CAP)
            else:
                above[w], counts[w] = _bracket_block(x, xk, b, bk, has_base, s, e, lo, hi, vals, offs, w * CAP)


@njit(cache=True, nogil=True)
def _sample_kernel(x, xk, b, bk, has_base, stride, out):
    for j in range(out.size):
        out[j] = abs_delta(x, xk, b, bk, has_base, j * stride)
    out.sort()


def sample_scores_cpu(x: torch.Tensor, base: torch.Tensor | None, stride: int, m: int) -> np.ndarray:
    """The sorted float32 scores of entries 0, stride, ..., (m − 1)·stride: one thread, no torch op (each
    of which waits on a thread barrier, 20-50 ms apiece on a busy machine)."""
    xa, xk = as_array(x)
    ba, bk = as_array(base) if base is not None else (xa, xk)
    out = np.empty(m, dtype=np.float32)
    _sample_kernel(xa, xk, ba, bk, base is not None, stride, out)
    return out


@njit(cache=True, nogil=True)
def _gather(vals, counts, out):
    m = 0
    for w in range(counts.size):
        for j in range(w * CAP, w * CAP + counts[w]):
            out[m] = vals[j]
            m += 1


@njit(cache=True, nogil=True)
def _nth_equal(vals, offs, counts, value, r):
    for w in range(counts.size):
        for j in range(w * CAP, w * CAP + counts[w]):
            if vals[j] == value:
                r -= 1
                if r == 0:
                    return w * BLOCK + offs[j]
    return -1


def bracket_select_cpu(x: torch.Tensor, base: torch.Tensor | None, k: int, lo: float, hi: float, *,
                       high_ties: bool = False) -> tuple[float, int, int, int] | None:
    """(k-th largest score v, #scores > v, #scores == v, tie index) if v lies in [lo, hi] (bounds included:
    bf16 deltas take few distinct values, and the sample's quantiles are often the k-th largest itself)
    and every block's candidates fit its slot; else None. The tie index: the flat index of the last tie
    kept, lowest index first (n − 1 when every tie is kept); with high_ties, of the first tie kept,
    highest index first (0 when every tie is kept)."""
    from ._scratch import scratch

    n = x.numel()
    nwork = blocks(n)
    sync_threads()
    xa, xk = as_array(x)
    ba, bk = as_array(base) if base is not None else (xa, xk)
    above = np.empty(nwork, dtype=np.int64)
    counts = np.empty(nwork, dtype=np.int64)
    vals = scratch("select.bracket_vals", nwork * CAP, torch.float32).numpy()
    offs = scratch("select.bracket_offs", nwork * CAP, torch.int32).numpy()
    _bracket_kernel(xa, xk, ba, bk, base is not None, n, np.float32(lo), np.float32(hi), above, counts, vals, offs,
                    workers(nwork), np.zeros(1, dtype=np.int64))
    need = k - int(above.sum())
    total = int(counts.sum())
    if int(counts.max()) > CAP or not 0 < need <= total:
        return None
    cand = np.empty(total, dtype=np.float32)
    _gather(vals, counts, cand)
    value = np.partition(cand, total - need)[total - need]  # the need-th largest candidate
    greater = k - need + int(np.count_nonzero(cand > value))
    equal = int(np.count_nonzero(cand == value))
    ties = k - greater
    if ties == equal:
        return float(value), greater, equal, 0 if high_ties else n - 1
    r = equal - ties + 1 if high_ties else ties  # the r-th tie from the lowest index
    return float(value), greater, equal, int(_nth_equal(vals, offs, counts, value, r))
