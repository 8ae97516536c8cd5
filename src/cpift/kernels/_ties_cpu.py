# Fused CPU kernel of kernels/ties.py's delta_merge (numba, imported lazily): one pass, (N + 1)·s bytes
# read and s written per entry (s the storage size), the trim and the DARE Philox mask recomputed in the
# kernel; the torch path's float32 operations in its order, so bit-identical to it. Also reports whether
# every stored entry is finite.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernels_ties_cpupy
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ._cpu import BLOCK, SPAN, addresses, blocks, fma, load_span, store_span, sync_threads
from .band import Band
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
def _trim(dk, score, tie, cut):
    # Keep score > cut, and score == cut where the entry is at or before the cut's last tie.
    if tie:
        return dk * (_ONE - _sign(_clamp0(cut - score)))
    return dk * _sign(_clamp0(score - cut))


@njit(inline="always", cache=True)
def _band(dk, score, g, bv, bf):
    # Keep the entry when among the n − lo largest and not among the n − hi largest (band.Band: ties
    # from the highest index), bv = (low, high), bf = (low_first, high_first).
    inside = (score > bv[0]) | ((score == bv[0]) & (g >= bf[0]))
    above = (score > bv[1]) | ((score == bv[1]) & (g >= bf[1]))
    return dk * (np.float32(inside) - np.float32(inside & above))


@njit(inline="always", cache=True)
def _uniforms(g0, L, k0, k1, u):
    # u[j] for j < L + 3: the DARE uniform of global entry g0 − (g0 mod 4) + j (Philox per quad of entries).
    q0 = g0 >> 2
    for q in range(q0, ((g0 + L - 1) >> 2) + 1):
        _philox(np.uint64(q), k0, k1, u, 4 * (q - q0))


@njit(inline="always", cache=True)
def _span(base, base_kind, xs, kinds, num_w, w, cut_v, last_tie, band_v, band_f, dens, keys, lam, out, out_kind, i0,
          L, g0, has_cut, has_band, has_drop, elect, normalize, bv, acc, d, u, sg, den):
    # Entries i0 … i0 + L − 1 (global g0 …), one model at a time over float32 buffers (bv the base, d[k]
    # the trimmed and dropped deltas, acc their sum); per entry the torch path's operations in its order:
    # δ = x − b, trim or band, drop, Σ fma(δ, w); then the sign election; then b + λ·Σ, one rounding on store.
    load_span(base, base_kind, i0, L, bv)
    for j in range(L):
        acc[j] = _ZERO
    lane = g0 & 3  # entry j's uniform is u[lane + j]
    for k in range(xs.shape[0]):
        dk = d[k]
        load_span(xs[k], kinds[k], i0, L, dk)
        if has_drop:
            _uniforms(g0, L, keys[2 * k], keys[2 * k + 1], u)
        cut = cut_v[k]
        ties = last_tie[k] - g0 + 1  # entries j < ties are at or before the last tie
        kv = band_v[k]
        kf = band_f[k]
        p = dens[k]
        wk = num_w[k]
        for j in range(L):
            x = dk[j] - bv[j]
            if has_cut:
                x = _trim(x, abs(x), j < ties, cut)
            if has_band:
                x = _band(x, abs(x), g0 + j, kv, kf)
            if has_drop:
                x = x * _sign(_clamp0(p - u[lane + j]))
            acc[j] = fma(x, wk, acc[j])
            dk[j] = x
    if elect:
        for j in range(L):
            sg[j] = _sign(acc[j])
            acc[j] = _ZERO
            den[j] = _ZERO
        for k in range(xs.shape[0]):
            dk = d[k]
            for j in range(L):
                t = _clamp0(dk[j] * sg[j])
                acc[j] = fma(t, num_w[k], acc[j])
                if normalize:
                    den[j] = fma(_sign(t), w[k], den[j])
        for j in range(L):
            if normalize:
                nz = _sign(abs(den[j]))
                acc[j] = acc[j] * sg[j] / (den[j] + (_ONE - nz)) * nz
            else:
                acc[j] = acc[j] * sg[j]
    for j in range(L):
        acc[j] = fma(acc[j], lam, bv[j])
    return store_span(out, out_kind, i0, L, acc)


@njit(parallel=True, cache=True, nogil=True)
def _delta_kernel(base, base_kind, xs, kinds, num_w, w, cut_v, last_tie, band_v, band_f, dens, keys, lam, out,
                  out_kind, n, start, has_cut, has_band, has_drop, elect, normalize, bad):
    for blk in prange(bad.shape[0]):
        s = blk * BLOCK
        e = min(s + BLOCK, n)
        bv = np.empty(SPAN, dtype=np.float32)
        acc = np.empty(SPAN, dtype=np.float32)
        sg = np.empty(SPAN, dtype=np.float32)
        den = np.empty(SPAN, dtype=np.float32)
        u = np.empty(SPAN + 8, dtype=np.float32)
        d = np.empty((xs.shape[0], SPAN), dtype=np.float32)
        flag = 0
        for i0 in range(s, e, SPAN):
            flag |= _span(base, base_kind, xs, kinds, num_w, w, cut_v, last_tie, band_v, band_f, dens, keys, lam,
                          out, out_kind, i0, min(SPAN, e - i0), start + i0, has_cut, has_band, has_drop, elect,
                          normalize, bv, acc, d, u, sg, den)
        bad[blk] = flag


def delta_merge_cpu(
    base: torch.Tensor,
    xs: list[torch.Tensor],
    weights: list[float],
    num_weights: list[float],
    *,
    lam: float,
    cuts: list[Cut] | None,
    bands: list[Band] | None = None,
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
    band_v = np.array([(c.low, c.high) for c in bands] if bands else [(0.0, 0.0)] * count, dtype=f32)
    band_f = np.array([(c.low_first, c.high_first) for c in bands] if bands else [(0, 0)] * count, dtype=np.int64)
    dens = np.array(densities if densities else [1.0] * count, dtype=f32)
    seeds = drop_seeds if densities else [0] * count
    keys = np.array([v for s in seeds for v in (s & 0xFFFFFFFF, (s >> 32) & 0xFFFFFFFF)], dtype=np.uint64)
    bad = np.zeros(blocks(n), dtype=np.int64)
    (b_ptr,), (b_kind,) = addresses([base])
    (o_ptr,), (o_kind,) = addresses([out])
    _delta_kernel(b_ptr, b_kind, ptrs, kinds, np.array(num_weights, dtype=f32), np.array(weights, dtype=f32),
                  cut_v, last_tie, band_v, band_f, dens, keys, f32(lam), o_ptr, o_kind, n, start,
                  cuts is not None, bands is not None, densities is not None, bool(elect_sign), bool(normalize), bad)
    return not bad.any()
