# Fused CPU kernels of kernels/masks.py (format and bytes per entry: see its header), compiled by
# numba and imported lazily by it.
#   pack_cut: one pass that scores |x − base| in float32 (a span at a time, the torch backend's
#       operations), applies the Cut (s > v, or s == v at flat index ≤ last_tie) and
#       writes 8 entries a byte; tie counts per work block (BLOCK entries = BLOCK/8 whole bytes), added
#       on the host in block order.
#   overlap: popcount (LLVM's ctpop) of p & q and p | q over 8-byte words, per-block counts.
# Both are exact: the same bits and counts as the torch backend.
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import intrinsic

from ._cpu import BLOCK, SPAN, addresses, blocks, claim, load_abs_delta, sync_threads, workers

_WORDS = BLOCK // 8  # 8-byte words per overlap work block


@intrinsic
def _ctpop64(typingctx, x):
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@njit(inline="always", cache=True)
def _pack_span(sc, m, i0, value, last_tie, out):
    # Pack the span's cut into out's bytes i0/8 …; returns its ties (i0 is a multiple of 8).
    count = 0
    for j in range(m):
        count += np.int64(sc[j] == value)
    for q in range((m + 7) // 8):
        packed = 0
        for j in range(min(8, m - 8 * q)):  # 8 but in the tensor's last byte
            i = i0 + 8 * q + j
            s = sc[8 * q + j]
            packed |= np.int64((s > value) | ((s == value) & (i <= last_tie))) << j
        out[(i0 >> 3) + q] = packed
    return count


@njit(parallel=True, cache=True, nogil=True)
def _pack_cut_kernel(x, xk, b, bk, has_base, n, value, last_tie, out, ties, nworkers, counter):
    nwork = ties.size
    for t in prange(nworkers):
        sc = np.empty(SPAN, dtype=np.float32)
        bb = np.empty(SPAN, dtype=np.float32)
        while True:
            w = claim(counter)
            if w >= nwork:
                break
            e0 = w * BLOCK
            e1 = min(n, e0 + BLOCK)
            count = 0
            for i0 in range(e0, e1, SPAN):  # scores widened a span at a time (load_span: vectorised)
                m = min(SPAN, e1 - i0)
                load_abs_delta(x, xk, b, bk, has_base, i0, m, sc, bb)
                count += _pack_span(sc, m, i0, value, last_tie, out)
            ties[w] = count


@njit(parallel=True, cache=True, nogil=True)
def _overlap_kernel(p, q, parts, nworkers, counter):
    m = p.size
    nwork = parts.shape[0]
    for t in prange(nworkers):
        while True:
            w = claim(counter)
            if w >= nwork:
                break
            s = w * BLOCK
            e = min(m, s + BLOCK)
            inter = 0
            union = 0
            i = s
            while i + 8 <= e:
                a = np.uint64(0)
                c = np.uint64(0)
                for j in range(8):  # little-endian word of bytes i..i+7; LLVM fuses it into one load
                    a |= np.uint64(p[i + j]) << np.uint64(8 * j)
                    c |= np.uint64(q[i + j]) << np.uint64(8 * j)
                inter += _ctpop64(a & c)
                union += _ctpop64(a | c)
                i += 8
            while i < e:
                inter += _ctpop64(np.uint64(p[i] & q[i]))
                union += _ctpop64(np.uint64(p[i] | q[i]))
                i += 1
            parts[w, 0] = inter
            parts[w, 1] = union


def pack_cut_cpu(x: torch.Tensor, base: torch.Tensor | None, value: float, last_tie: int,
                 out: torch.Tensor) -> int:
    """Score, cut and pack x into out in one pass; returns the number of scores equal to value."""
    n = x.numel()
    nwork = blocks(n)
    if not nwork:
        return 0
    sync_threads()
    ptrs, kinds = addresses([x] if base is None else [x, base])
    ties = np.empty(nwork, dtype=np.int64)
    # value is a float32 score (or ±inf): compared in float32, as torch compares a float32 tensor with it.
    _pack_cut_kernel(ptrs[0], kinds[0], ptrs[-1], kinds[-1], base is not None, n, np.float32(value),
                     max(-1, min(int(last_tie), n)), out.numpy(), ties, workers(nwork), np.zeros(1, dtype=np.int64))
    return int(ties.sum())


def overlap_cpu(p: torch.Tensor, q: torch.Tensor) -> tuple[int, int]:
    """(popcount(p & q), popcount(p | q)) of two uint8 tensors of one length."""
    nwork = blocks(p.numel())
    if not nwork:
        return 0, 0
    sync_threads()
    parts = np.empty((nwork, 2), dtype=np.int64)
    _overlap_kernel(p.numpy(), q.numpy(), parts, workers(nwork), np.zeros(1, dtype=np.int64))
    inter, union = parts.sum(axis=0).tolist()
    return int(inter), int(union)
