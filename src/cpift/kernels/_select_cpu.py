# Fused CPU kernels of kernels/select.py, compiled by numba and imported lazily by it. magnitude_cut's
# two histogram passes are kernels/_scores_cpu.py's (per-worker histograms, added on the host); this
# file finds the r-th tie: one parallel pass counts the scores equal to v per work block of BLOCK
# entries, the host adds the counts in block order up to the block holding the r-th, and one
# sequential scan of that block gives its flat index. Scores are the float32 |x − base| of
# abs_delta, bit-identical to the torch backend's, so the index is the same.
#
# bracket_select_cpu selects in one pass instead of those two or three: given a bracket [lo, hi] that
# a sample says holds the k-th largest score, one parallel pass counts per work block the scores
# above hi and writes each score inside the bracket as one key, its float32 bits above its flat index
# (a non-negative float orders like its bits), into that block's slot of a reused buffer (CAP keys per
# block: 1/8 of it). Sorted, the keys order the candidates by (score, index): the k-th largest, the
# counts above and equal to it and the flat index of its r-th tie are read off them (about 2% of the
# entries). It reports a miss (the caller falls back to radix select) when the bracket does not hold
# the k-th largest or a block's slot overflows.
# Bytes: 2x the storage size read per entry, once, and ~0.2 byte written (8 per candidate).
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ._cpu import BLOCK, SPAN, addresses, as_array, blocks, claim, f32_bits, load_abs_delta, sync_threads, workers
from ._scores_cpu import abs_delta

CAP = BLOCK // 8  # bracket candidates a work block may hold
_S32 = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)


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
def _bracket_block(x, xk, b, bk, has_base, s, e, lo, hi, keys, slot, bx, bb):
    a = 0
    c = 0
    for i0 in range(s, e, SPAN):  # a span's scores in a float32 buffer first (vectorised)
        m = min(SPAN, e - i0)
        load_abs_delta(x, xk, b, bk, has_base, i0, m, bx, bb)
        for j in range(m):
            a += np.int64(bx[j] > hi)
        for j in range(m):  # branch-free: bf16 deltas crowd ties into the bracket, the compares are unpredictable
            v = bx[j]
            keys[slot + min(c, CAP - 1)] = (np.uint64(f32_bits(v)) << _S32) | np.uint64(i0 + j)  # kept if inside
            c += np.int64(v >= lo) & np.int64(v <= hi)
    return a, c


@njit(parallel=True, cache=True, nogil=True)
def _bracket_kernel(x, xk, b, bk, has_base, n, lo, hi, above, counts, keys, nworkers, counter):
    nwork = counts.size
    for t in prange(nworkers):
        bx = np.empty(SPAN, dtype=np.float32)
        bb = np.empty(SPAN, dtype=np.float32)
        while True:
            w = claim(counter)
            if w >= nwork:
                break
            s = w * BLOCK
            e = min(n, s + BLOCK)
            above[w], counts[w] = _bracket_block(x, xk, b, bk, has_base, s, e, lo, hi, keys, w * CAP, bx, bb)


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
def _gather(keys, counts, out):
    m = 0
    for w in range(counts.size):
        for j in range(w * CAP, w * CAP + counts[w]):
            out[m] = keys[j]
            m += 1


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
    ptrs, kinds = addresses([x] if base is None else [x, base])
    above = np.empty(nwork, dtype=np.int64)
    counts = np.empty(nwork, dtype=np.int64)
    keys = scratch("select.bracket_keys", nwork * CAP, torch.int64).numpy().view(np.uint64)
    _bracket_kernel(ptrs[0], kinds[0], ptrs[-1], kinds[-1], base is not None, n, np.float32(lo), np.float32(hi),
                    above, counts, keys, workers(nwork), np.zeros(1, dtype=np.int64))
    need = k - int(above.sum())
    total = int(counts.sum())
    if int(counts.max()) > CAP or not 0 < need <= total:
        return None
    cand = np.empty(total, dtype=np.uint64)  # in block order: index order
    _gather(keys, counts, cand)
    scores = (cand >> _S32).astype(np.uint32).view(np.float32)
    scores.sort()  # float32: SIMD-sorted (uint64 keys sort 12x slower; np.partition crawls on bf16's many ties)
    value = scores[total - need]  # the need-th largest candidate
    end = int(np.searchsorted(scores, value, side="right"))
    equal = end - int(np.searchsorted(scores, value, side="left"))
    greater = k - need + (total - end)
    ties = k - greater
    if ties == equal:
        return float(value), greater, equal, 0 if high_ties else n - 1
    r = equal - ties + 1 if high_ties else ties  # the r-th tie from the lowest index
    return float(value), greater, equal, int(_nth_key(cand, np.uint64(value.view(np.uint32)), r))


@njit(cache=True, nogil=True)
def _nth_key(cand, bits, r):
    for j in range(cand.size):
        if (cand[j] >> _S32) == bits:
            r -= 1
            if r == 0:
                return cand[j] & _LOW32
    return -1
