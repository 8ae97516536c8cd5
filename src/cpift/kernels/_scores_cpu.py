# Fused CPU kernel of kernels/scores.py (maths, bytes per entry: see its header), compiled by numba
# and imported lazily by it. One pass over (x, base): each entry is loaded, widened to float32,
# scored, optionally stored, and counted into a per-worker int64 histogram (no atomics); the host
# adds the workers' histograms into the caller's, so counts are exact and independent of threads.
#
# Element scores (block 1): fl32(|x − base|) in float32, the torch backend's operations in its
# order, so bit-identical. Block means: the float32 element scores summed in float64 (four
# interleaved partial sums in a fixed order), divided by the entry count, rounded once to float32.
# The torch backend sums in float32 in its own order, so the two differ by a few float32 ulps; ours
# is within 2^-22 relative of the exact mean of the element scores (each element score is within
# 2^-24 of the exact |x − base|, the float64 sum adds ~n·2^-53, the final rounding 2^-24).
from __future__ import annotations

import threading

import numpy as np
import torch
from numba import njit, prange

from ._cpu import (
    BF16,
    BLOCK,
    SPAN,
    addresses,
    as_array,
    blocks,
    claim,
    f32_bits,
    load,
    load_span,
    sync_threads,
    workers,
)

BINS = 1 << 16
_NO_OUT = np.empty(0, dtype=np.float32)
_local = threading.local()


@njit(inline="always", cache=True)
def abs_delta(x, xk, b, bk, has_base, i):
    """fl32(|x[i] − b[i]|) in float32 (|x[i]| without a base), as the torch backend computes it."""
    v = load(x, i, xk)
    if has_base:
        v = v - load(b, i, bk)
    return abs(v)


@njit(inline="always", cache=True)
def _block_mean(x, xk, b, bk, has_base, s, e):
    a0 = a1 = a2 = a3 = 0.0
    i = s
    while i + 4 <= e:
        a0 += abs_delta(x, xk, b, bk, has_base, i)
        a1 += abs_delta(x, xk, b, bk, has_base, i + 1)
        a2 += abs_delta(x, xk, b, bk, has_base, i + 2)
        a3 += abs_delta(x, xk, b, bk, has_base, i + 3)
        i += 4
    while i < e:
        a0 += abs_delta(x, xk, b, bk, has_base, i)
        i += 1
    return np.float32(((a0 + a1) + (a2 + a3)) / (e - s))


@njit(inline="always", cache=True)
def _count(h, v, mode, high_bin):
    u = f32_bits(v)
    if mode == 1:
        h[u >> np.uint32(16)] += 1
    elif mode == 2:
        if (u >> np.uint32(16)) == high_bin:
            h[u & np.uint32(0xFFFF)] += 1


@njit(inline="always", cache=True)
def _score_range(x, xk, b, bk, has_base, s0, s1, out, write, h, mode, high_bin):
    for j in range(s0, s1):
        v = abs_delta(x, xk, b, bk, has_base, j)
        if write:
            out[j] = v
        _count(h, v, mode, high_bin)


@njit(parallel=True, cache=True, nogil=True)
def _score_kernel(x, xk, b, bk, has_base, n, block, per, nwork, nworkers, out, write, hists, zero, mode,
                  high_bin, counter):
    m = (n + block - 1) // block
    for t in prange(nworkers):
        h = hists[t]
        if zero:
            for i in range(h.size):
                h[i] = 0
        while True:
            w = claim(counter)
            if w >= nwork:
                break
            s0 = w * per
            s1 = min(m, s0 + per)
            if block == 1:
                if has_base and xk == BF16 and bk == BF16:  # the common case, its kinds constants
                    _score_range(x, BF16, b, BF16, True, s0, s1, out, write, h, mode, high_bin)
                else:
                    _score_range(x, xk, b, bk, has_base, s0, s1, out, write, h, mode, high_bin)
            else:
                for j in range(s0, s1):
                    v = _block_mean(x, xk, b, bk, has_base, j * block, min(n, j * block + block))
                    if write:
                        out[j] = v
                    _count(h, v, mode, high_bin)


@njit(cache=True, nogil=True)
def _fold(hists, nworkers, hist):
    for t in range(nworkers):
        for i in range(hist.size):
            hist[i] += hists[t, i]


def _worker_hists(nworkers: int, n: int) -> np.ndarray:
    """Reused per-worker histograms (one set per calling thread and count type): allocated once, zeroed
    by the kernel, folded into the caller's int64 histogram. int32 counts while a worker cannot reach
    2^31 (256 KiB per worker, which stays in L2 where the random increments land), int64 beyond."""
    dtype = np.int32 if n < (1 << 31) else np.int64
    held = getattr(_local, "hists", None)
    if held is None:
        held = _local.hists = {}
    buf = held.get(dtype)
    if buf is None or buf.shape[0] < nworkers:
        buf = held[dtype] = np.empty((nworkers, BINS), dtype=dtype)
    return buf


def score_cpu(x: torch.Tensor, base: torch.Tensor | None, block: int, *, out: torch.Tensor | None,
              hist: torch.Tensor | None, high_bin: int | None) -> None:
    """Run the fused scoring kernel: write `out` (if given) and add to `hist` (if given)."""
    n = x.numel()
    m = (n + block - 1) // block
    if m == 0:
        return
    sync_threads()
    xa, xk = as_array(x)
    ba, bk = as_array(base) if base is not None else (xa, xk)
    per = max(1, BLOCK // block)  # scores per work block: about BLOCK entries
    nwork = (m + per - 1) // per
    nworkers = workers(nwork)
    mode = 0 if hist is None else (1 if high_bin is None else 2)
    hists, zero = _worker_hists(nworkers, n), mode != 0
    _score_kernel(xa, xk, ba, bk, base is not None, n, block, per, nwork, nworkers,
                  out.numpy() if out is not None else _NO_OUT, out is not None, hists, zero, mode,
                  -1 if high_bin is None else int(high_bin), np.zeros(1, dtype=np.int64))
    if mode:
        _fold(hists, nworkers, hist.numpy())


@njit(parallel=True, cache=True, nogil=True)
def _unchanged_kernel(x, xk, b, bk, n, counts, nworkers, counter):
    nwork = counts.size
    for t in prange(nworkers):
        bx = np.empty(SPAN, dtype=np.float32)
        bb = np.empty(SPAN, dtype=np.float32)
        while True:
            w = claim(counter)
            if w >= nwork:
                break
            c = 0
            for i0 in range(w * BLOCK, min(n, w * BLOCK + BLOCK), SPAN):
                m = min(SPAN, n - i0)
                load_span(x, xk, i0, m, bx)  # widening to float32 is exact: equal in float32 iff equal
                load_span(b, bk, i0, m, bb)
                for j in range(m):
                    c += np.int64(bx[j] == bb[j])
            counts[w] = c


def count_unchanged_cpu(x: torch.Tensor, base: torch.Tensor) -> int:
    """Entries where x == base (validated contiguous CPU tensors of the fused kinds)."""
    n = x.numel()
    nwork = blocks(n)
    sync_threads()
    ptrs, kinds = addresses([x, base])
    counts = np.empty(nwork, dtype=np.int64)
    _unchanged_kernel(ptrs[0], kinds[0], ptrs[1], kinds[1], n, counts, workers(nwork), np.zeros(1, dtype=np.int64))
    return int(counts.sum())
