# Fused CPU kernels of kernels/sce.py (variance scores, kept square sums, the erase/combine), compiled
# by numba and imported lazily by it. Maths, order of operations and precision: see its header.
#
# Each kernel is one pass over BLOCK-entry blocks (a prange over blocks): (N + 1)·s bytes read per
# entry (s the storage size), plus 4 for the float32 scores where a selection applies; the variance
# writes 4 bytes per entry, the combine s. Reductions are per-block float64 partials folded in block
# order on the host (deterministic for any thread count). The combine keeps no per-model arrays: it
# accumulates Σ τ_i, and for both possible signs Σ fl(τ_i·w_i) and Σ w_i over the models of that sign,
# in model order; the elected sign then picks one pair. These are the very float32 additions, in the
# same order, that the torch path runs (its other terms are exact zeros), so results are its bits.
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ._cpu import BLOCK, addresses, as_array, blocks, load_at, store_at, sync_threads
from .select import Cut


@njit(inline="always", cache=True)
def _kept(scores, i, has_cut, cut_v, last_tie):
    if not has_cut:
        return True
    v = scores[i]
    return v > cut_v or (v == cut_v and i <= last_tie)


@njit(parallel=True, cache=True, nogil=True)
def _variance_kernel(base, base_kind, xs, kinds, out, n, nblocks):
    m = xs.shape[0]
    for blk in prange(nblocks):
        s = blk * BLOCK
        e = min(s + BLOCK, n)
        for i in range(s, e):
            b = load_at(base, i, base_kind)
            mean = 0.0
            for k in range(m):
                mean += np.float64(np.float32(load_at(xs[k], i, kinds[k]) - b))
            mean /= m
            var = 0.0
            for k in range(m):
                d = np.float64(np.float32(load_at(xs[k], i, kinds[k]) - b)) - mean
                var += d * d
            out[i] = np.float32(var / m)


@njit(parallel=True, cache=True, nogil=True)
def _square_sums_kernel(base, base_kind, xs, kinds, scores, has_cut, cut_v, last_tie, n, parts):
    m = xs.shape[0]
    for blk in prange(parts.shape[0]):
        s = blk * BLOCK
        e = min(s + BLOCK, n)
        for i in range(s, e):
            if not _kept(scores, i, has_cut, cut_v, last_tie):
                continue
            b = load_at(base, i, base_kind)
            for k in range(m):
                d = np.float64(np.float32(load_at(xs[k], i, kinds[k]) - b))
                parts[blk, k] += d * d


@njit(parallel=True, cache=True, nogil=True)
def _combine_kernel(base, base_kind, xs, kinds, ws, scores, has_cut, cut_v, last_tie, eps, out, out_kind,
                    n, bad):
    m = xs.shape[0]
    zero = np.float32(0.0)
    for blk in prange(bad.shape[0]):
        s = blk * BLOCK
        e = min(s + BLOCK, n)
        flag = 0
        for i in range(s, e):
            b = load_at(base, i, base_kind)
            # The torch path's 0/1 keep factor, multiplied in: a dropped NaN or ±inf delta becomes NaN
            # there, not 0, and so it does here.
            kf = np.float32(1.0) if _kept(scores, i, has_cut, cut_v, last_tie) else zero
            total = zero
            pos_num = zero
            neg_num = zero
            pos_den = zero
            neg_den = zero
            pos_nan = False  # a non-finite τ_i·w_i that the elected sign would multiply by 0: NaN
            neg_nan = False
            for k in range(m):
                d = np.float32(np.float32(load_at(xs[k], i, kinds[k]) - b) * kf)
                total = np.float32(total + d)
                wd = np.float32(d * ws[k])
                if d > zero:
                    pos_num = np.float32(pos_num + wd)
                    pos_den = np.float32(pos_den + ws[k])
                elif d < zero:
                    neg_num = np.float32(neg_num + wd)
                    neg_den = np.float32(neg_den + ws[k])
                if not np.isfinite(wd):
                    pos_nan = pos_nan or not d > zero
                    neg_nan = neg_nan or not d < zero
            up = total >= zero
            num = pos_num if up else neg_num
            den = pos_den if up else neg_den
            if den < eps:
                den = eps
            r = np.float32(b + np.float32(num / den))
            if pos_nan if up else neg_nan:
                r = np.float32(np.nan)
            flag |= store_at(out, i, r, out_kind)
        bad[blk] = flag


def _cut_args(scores: torch.Tensor | None, cut: Cut | None):
    if cut is None:
        return np.zeros(1, dtype=np.float32), False, np.float32(0.0), -1
    return as_array(scores)[0], True, np.float32(cut.value), int(cut.last_tie)


def variance_cpu(base: torch.Tensor, xs: list[torch.Tensor], *, out: torch.Tensor) -> None:
    n = base.numel()
    sync_threads()
    (bp,), (bk,) = addresses([base])
    ptrs, kinds = addresses(xs)
    _variance_kernel(bp, bk, ptrs, kinds, as_array(out)[0], n, blocks(n))


def square_sums_cpu(base: torch.Tensor, xs: list[torch.Tensor], scores: torch.Tensor | None,
                    cut: Cut | None) -> list[float]:
    n = base.numel()
    sync_threads()
    (bp,), (bk,) = addresses([base])
    ptrs, kinds = addresses(xs)
    parts = np.zeros((blocks(n), len(xs)), dtype=np.float64)
    _square_sums_kernel(bp, bk, ptrs, kinds, *_cut_args(scores, cut), n, parts)
    return [float(v) for v in parts.sum(axis=0)] if n else [0.0] * len(xs)


def combine_cpu(base: torch.Tensor, xs: list[torch.Tensor], weights: list[float], scores: torch.Tensor | None,
                cut: Cut | None, *, out: torch.Tensor) -> bool:
    n = base.numel()
    sync_threads()
    (bp, op), (bk, ok) = addresses([base, out])
    ptrs, kinds = addresses(xs)
    bad = np.zeros(blocks(n), dtype=np.int64)
    _combine_kernel(bp, bk, ptrs, kinds, np.array(weights, dtype=np.float32), *_cut_args(scores, cut),
                    np.float32(1e-6), op, ok, n, bad)
    return not bad.any()
