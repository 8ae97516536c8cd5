# Fused CPU kernels of kernels/ram.py (RAM counts and blend), compiled by numba and imported lazily by it.
# Each BLOCK of entries (a prange over blocks) reads the base and the N task tensors once; the blend
# writes the output once, the counts write N·2 integers per block (folded on the host). The N deltas
# of one entry live in a tiny per-block array. Exactness: the torch path's float32 operations in its
# order (δ = x − b; δ·nz; ·[c = 1]·λ_i and ·[c > 1] / max(c, 1), each rounded; the sum in model order;
# b + Σ), never fused, so results are its bits. The blend returns whether every stored entry is finite.
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ._cpu import BLOCK, addresses, blocks, load_at, store_at, sync_threads

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


@njit(inline="always", cache=True)
def _deltas(b_addr, b_kind, xs, kinds, i, eps, d):
    # d[k] = x_k − b at entry i; returns c, the models with |δ| > eps.
    b = load_at(b_addr, i, b_kind)
    c = 0
    for k in range(xs.shape[0]):
        d[k] = np.float32(load_at(xs[k], i, kinds[k]) - b)
        if abs(d[k]) > eps:
            c += 1
    return b, c


@njit(parallel=True, cache=True, nogil=True)
def _counts_kernel(b_addr, b_kind, xs, kinds, eps, n, counts):
    m = xs.shape[0]
    for blk in prange(counts.shape[0]):
        s = blk * BLOCK
        e = min(s + BLOCK, n)
        d = np.empty(m, dtype=np.float32)
        for i in range(s, e):
            _, c = _deltas(b_addr, b_kind, xs, kinds, i, eps, d)
            for k in range(m):
                if abs(d[k]) > eps:
                    counts[blk, k, 0 if c > 1 else 1] += 1


@njit(parallel=True, cache=True, nogil=True)
def _blend_kernel(b_addr, b_kind, xs, kinds, eps, lam, out, out_kind, n, bad):
    m = xs.shape[0]
    for blk in prange(bad.shape[0]):
        s = blk * BLOCK
        e = min(s + BLOCK, n)
        d = np.empty(m, dtype=np.float32)
        flag = 0
        for i in range(s, e):
            b, c = _deltas(b_addr, b_kind, xs, kinds, i, eps, d)
            one = _ONE if c == 1 else _ZERO
            many = _ONE if c > 1 else _ZERO
            cc = np.float32(max(c, 1))
            acc = _ZERO
            for k in range(m):
                dz = np.float32(d[k] * (_ONE if abs(d[k]) > eps else _ZERO))
                t1 = np.float32(np.float32(dz * one) * lam[k])
                t2 = np.float32(np.float32(dz * many) / cc)
                acc = np.float32(acc + np.float32(t1 + t2))
            flag |= store_at(out, i, np.float32(b + acc), out_kind)
        bad[blk] = flag


def ram_counts_cpu(base: torch.Tensor, xs: list[torch.Tensor], eps: float) -> tuple[list[int], list[int]]:
    """Fused CPU ram_counts on validated contiguous CPU tensors: (shared, alone) per model."""
    n = base.numel()
    sync_threads()
    (pb,), (kb,) = addresses([base])
    px, kx = addresses(xs)
    counts = np.zeros((blocks(n), len(xs), 2), dtype=np.int64)
    _counts_kernel(pb, kb, px, kx, np.float32(eps), n, counts)
    total = counts.sum(axis=0)
    return [int(v) for v in total[:, 0]], [int(v) for v in total[:, 1]]


def ram_blend_cpu(base: torch.Tensor, xs: list[torch.Tensor], eps: float, lam: list[float], *,
                  out: torch.Tensor) -> bool:
    """Fused CPU ram_blend on validated contiguous CPU tensors; True when every output entry is finite."""
    n = out.numel()
    sync_threads()
    (pb, po), (kb, ko) = addresses([base, out])
    px, kx = addresses(xs)
    bad = np.zeros(blocks(n), dtype=np.int64)
    _blend_kernel(pb, kb, px, kx, np.float32(eps), np.array(lam, dtype=np.float32), po, ko, n, bad)
    return not bad.any()
