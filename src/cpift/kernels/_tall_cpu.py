# Fused CPU kernel of kernels/tall.py (TALL consensus merge), compiled by numba and imported lazily by it.
# One pass: each BLOCK of entries (a prange over blocks) reads the base and the N task tensors once and
# writes the output once; the N deltas of an entry live in a tiny per-block array. The TIES trim compares
# |δ| against its Cut (value, last tie index). Exactness: the torch path's float32 operations in its
# order, each rounded, never fused, so results are its bits. Returns whether every stored entry is finite.
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ._cpu import BLOCK, addresses, blocks, load_at, store_at, sync_threads
from .select import Cut

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


@njit(inline="always", cache=True)
def _sign(x):
    return np.float32(x > _ZERO) - np.float32(x < _ZERO)


@njit(cache=True)
def _entry(b, d, v, w, lam, k, elect, normalize, divisor):
    # The merged delta m of one entry (its deltas d, trimmed and weighted v) and its TALL consensus.
    m = _ZERO
    if elect:
        total = _ZERO
        for i in range(d.shape[0]):
            total = np.float32(total + v[i])
        s = _ONE if total >= _ZERO else -_ONE
        den = _ZERO
        for i in range(d.shape[0]):
            a = _ONE if _sign(v[i]) == s else _ZERO
            m = np.float32(m + np.float32(v[i] * a))
            den = np.float32(den + np.float32(w[i] * a))
        if den == _ZERO:
            den = _ONE
    else:
        for i in range(d.shape[0]):
            m = np.float32(m + v[i])
        den = divisor
    if normalize:
        m = np.float32(m / den)
    n = 0
    for i in range(d.shape[0]):
        if abs(d[i]) > np.float32(lam[i] * abs(np.float32(m - d[i]))):
            n += 1
    return np.float32(b + np.float32(m * (_ONE if n >= k else _ZERO)))


@njit(parallel=True, cache=True, nogil=True)
def _tall_kernel(b_addr, b_kind, xs, kinds, w, lam, k, cut_v, last_tie, has_cut, elect, normalize, divisor,
                 out, out_kind, n, bad):
    m = xs.shape[0]
    for blk in prange(bad.shape[0]):
        s = blk * BLOCK
        e = min(s + BLOCK, n)
        d = np.empty(m, dtype=np.float32)
        v = np.empty(m, dtype=np.float32)
        flag = 0
        for i in range(s, e):
            b = load_at(b_addr, i, b_kind)
            for j in range(m):
                d[j] = np.float32(load_at(xs[j], i, kinds[j]) - b)
                t = d[j]
                if has_cut:
                    score = abs(t)
                    keep = score > cut_v[j] or (score == cut_v[j] and i <= last_tie[j])
                    t = np.float32(t * (_ONE if keep else _ZERO))
                v[j] = np.float32(t * w[j])
            flag |= store_at(out, i, _entry(b, d, v, w, lam, k, elect, normalize, divisor), out_kind)
        bad[blk] = flag


def tall_cpu(base: torch.Tensor, xs: list[torch.Tensor], weights: list[float], lambdas: list[float], k: int,
             cuts: list[Cut] | None, elect: bool, normalize: bool, divisor: float, *, out: torch.Tensor) -> bool:
    """Fused CPU tall_merge on validated contiguous CPU tensors; True when every output entry is finite."""
    n = out.numel()
    sync_threads()
    (pb, po), (kb, ko) = addresses([base, out])
    px, kx = addresses(xs)
    f32 = np.float32
    cut_v = np.array([c.value for c in cuts] if cuts else [0.0] * len(xs), dtype=f32)
    last_tie = np.array([c.last_tie for c in cuts] if cuts else [-1] * len(xs), dtype=np.int64)
    bad = np.zeros(blocks(n), dtype=np.int64)
    _tall_kernel(pb, kb, px, kx, np.array(weights, dtype=f32), np.array(lambdas, dtype=f32), k, cut_v, last_tie,
                 cuts is not None, elect, normalize, f32(divisor), po, ko, n, bad)
    return not bad.any()
