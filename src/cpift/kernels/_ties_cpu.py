# Fused CPU kernel of kernels/ties.py's delta_merge (numba, imported lazily): one pass, (N + 1)·s bytes
# read and s written per entry (s the storage size), the trim and the DARE Philox mask recomputed in the
# kernel; the torch path's float32 operations in its order, so bit-identical to it. Also reports whether
# every stored entry is finite.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernels_ties_cpupy
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ._cpu import BLOCK, addresses, blocks, fma, load_at, store_at, sync_threads
from .select import Cut

_M32 = np.uint64(0xFFFFFFFF)
_ROUND_A = np.uint64(0xD2511F53)
_ROUND_B = np.uint64(0xCD9E8D57)
_KEY_A = np.uint64(0x9E3779B9)
_KEY_B = np.uint64(0xBB67AE85)
_S32 = np.uint64(32)
_S31 = np.uint64(31)
_SCALE = np.float32(4.6566127342e-10)
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


@njit(inline="always", cache=True)
def _sign(x):
    # torch.sign: ±1, and 0 for ±0 and NaN.
    return np.float32(x > _ZERO) - np.float32(x < _ZERO)


@njit(inline="always", cache=True)
def _clamp0(x):
    # clamp_(min=0.0): NaN stays NaN.
    return _ZERO if x < _ZERO else x


@njit(inline="always", cache=True)
def _uniform(w):
    # Triton's uint_to_uniform_float of one Philox word (kernels/dare.py): w ≥ 2^31 folds to ~w.
    x = w ^ (_M32 * (w >> _S31))
    return np.float32(np.int64(x)) * _SCALE


@njit(inline="always", cache=True)
def _philox(q, k0, k1, u, at):
    # Philox4x32-10 of counter (q, 0, 0, 0) under key (k0, k1); the 4 uniforms go to u[at:at + 4].
    c0 = q & _M32
    c1 = np.uint64(0)
    c2 = np.uint64(0)
    c3 = np.uint64(0)
    for _ in range(10):
        p0 = _ROUND_A * c0
        p1 = _ROUND_B * c2
        c0, c1, c2, c3 = ((p1 >> _S32) ^ c1 ^ k0), p1 & _M32, ((p0 >> _S32) ^ c3 ^ k1), p0 & _M32
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    u[at] = _uniform(c0)
    u[at + 1] = _uniform(c1)
    u[at + 2] = _uniform(c2)
    u[at + 3] = _uniform(c3)


@njit(inline="always", cache=True)
def _entry(base, base_kind, xs, kinds, num_w, w, cut_v, last_tie, dens, u, lane, lam, out, out_kind,
           i, g, d, has_cut, has_drop, elect, normalize):
    # One output entry i (global index g): trim, drop (uniforms u[4k + lane]), elect, combine, store.
    b = load_at(base, i, base_kind)
    acc = _ZERO
    for k in range(xs.shape[0]):
        dk = load_at(xs[k], i, kinds[k]) - b
        if has_cut:
            score = abs(dk)
            if g <= last_tie[k]:
                dk = dk * (_ONE - _sign(_clamp0(cut_v[k] - score)))
            else:
                dk = dk * _sign(_clamp0(score - cut_v[k]))
        if has_drop:
            dk = dk * _sign(_clamp0(dens[k] - u[4 * k + lane]))
        acc = fma(dk, num_w[k], acc)
        d[k] = dk
    if elect:
        sg = _sign(acc)
        num = _ZERO
        den = _ZERO
        for k in range(xs.shape[0]):
            t = _clamp0(d[k] * sg)
            num = fma(t, num_w[k], num)
            if normalize:
                den = fma(_sign(t), w[k], den)
        if normalize:
            nz = _sign(abs(den))
            den = den + (_ONE - nz)
            acc = num * sg / den * nz
        else:
            acc = num * sg
    return store_at(out, i, fma(acc, lam, b), out_kind)


@njit(parallel=True, cache=True, nogil=True)
def _delta_kernel(base, base_kind, xs, kinds, num_w, w, cut_v, last_tie, dens, keys, lam, out, out_kind,
                  n, start, has_cut, has_drop, elect, normalize, bad):
    m = xs.shape[0]
    for blk in prange(bad.shape[0]):
        s = blk * BLOCK
        e = min(s + BLOCK, n)
        d = np.empty(m, dtype=np.float32)
        u = np.zeros(4 * m, dtype=np.float32)
        flag = 0
        if not has_drop:
            # Task arithmetic, TIES: a straight loop (~1.2x faster than the quad loop below).
            for i in range(s, e):
                flag |= _entry(base, base_kind, xs, kinds, num_w, w, cut_v, last_tie, dens, u, 0, lam, out,
                               out_kind, i, start + i, d, has_cut, False, elect, normalize)
        else:
            # DARE drops: entries in quads, one Philox evaluation per model and quad.
            g0 = start + s
            g1 = start + e
            for q in range(g0 >> 2, ((g1 - 1) >> 2) + 1):
                for k in range(m):
                    _philox(np.uint64(q), keys[2 * k], keys[2 * k + 1], u, 4 * k)
                for lane in range(4):
                    g = 4 * q + lane
                    if g0 <= g < g1:
                        flag |= _entry(base, base_kind, xs, kinds, num_w, w, cut_v, last_tie, dens, u, lane, lam,
                                       out, out_kind, g - start, g, d, has_cut, True, elect, normalize)
        bad[blk] = flag


def delta_merge_cpu(
    base: torch.Tensor,
    xs: list[torch.Tensor],
    weights: list[float],
    num_weights: list[float],
    *,
    lam: float,
    cuts: list[Cut] | None,
    densities: list[float] | None,
    drop_seeds: list[int] | None,
    elect_sign: bool,
    normalize: bool,
    out: torch.Tensor,
    start: int = 0,
) -> bool:
    """Fused CPU delta_merge on validated contiguous CPU tensors; returns True when every output entry is
    finite. `start` is the global flat index of the first entry (DARE counter and tie rule)."""
    if start < 0:
        raise ValueError(f"delta_merge (cpu): start must be ≥ 0, got {start}")
    n = base.numel()
    count = len(xs)
    sync_threads()
    ptrs, kinds = addresses(xs)
    f32 = np.float32
    cut_v = np.array([c.value for c in cuts] if cuts else [0.0] * count, dtype=f32)
    last_tie = np.array([c.last_tie for c in cuts] if cuts else [-1] * count, dtype=np.int64)
    dens = np.array(densities if densities else [1.0] * count, dtype=f32)
    seeds = drop_seeds if densities else [0] * count
    keys = np.array([v for s in seeds for v in (s & 0xFFFFFFFF, (s >> 32) & 0xFFFFFFFF)], dtype=np.uint64)
    bad = np.zeros(blocks(n), dtype=np.int64)
    (b_ptr,), (b_kind,) = addresses([base])
    (o_ptr,), (o_kind,) = addresses([out])
    _delta_kernel(b_ptr, b_kind, ptrs, kinds, np.array(num_weights, dtype=f32), np.array(weights, dtype=f32),
                  cut_v, last_tie, dens, keys, f32(lam), o_ptr, o_kind, n, start,
                  cuts is not None, densities is not None, bool(elect_sign), bool(normalize), bad)
    return not bad.any()
