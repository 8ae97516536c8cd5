# Delta scoring: s_j = fl32(mean |x − base| over block j of B entries) (B = 1: every entry), with the
# radix-select histogram of the scores' high or low 16 bits in the same pass over (task, base).
# Precision: float32 (float64 inputs: float64), one rounding to float32; element scores bit-identical on
# every backend, block means a few float32 ulps apart; histograms exact.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernelsscorespy
from __future__ import annotations

import sys

import torch

from ._scratch import CHUNK, check_flat, chunks, compute_dtype, scratch
from .backend import resolve

BINS = 1 << 16


def score_count(n: int, block: int) -> int:
    """Number of scores of an n-entry tensor in blocks of `block` entries."""
    return (n + block - 1) // block


def _check(x: torch.Tensor, base: torch.Tensor | None, block: int, hist: torch.Tensor | None) -> None:
    check_flat("x", x)
    if base is not None:
        check_flat("base", base, x.numel())
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block: expected an integer ≥ 1, got {block!r}")
    if hist is not None and (hist.dtype != torch.int64 or hist.shape != (BINS,)):
        raise ValueError(f"hist: expected int64[{BINS}], got {hist.dtype}{list(hist.shape)}")


def _fused(x: torch.Tensor, base: torch.Tensor | None, out: torch.Tensor | None, hist: torch.Tensor | None) -> bool:
    """Whether the fused CPU kernel takes these tensors (float64 inputs keep the torch path)."""
    from ._cpu import supports

    return supports(x, base, out) and (hist is None or (hist.device.type == "cpu" and hist.is_contiguous()))


def _chunk_scores(x: torch.Tensor, base: torch.Tensor | None, block: int, s: int, e: int) -> torch.Tensor:
    """float32 scores of entries s..e-1 (s a multiple of block), in reused scratch."""
    dt = compute_dtype(x, base)
    work = scratch("scores.work", e - s, dt, x.device)
    work.copy_(x[s:e])
    if base is not None:
        work.sub_(base[s:e])
    work.abs_()
    if block > 1:
        full = (e - s) // block
        m = score_count(e - s, block)
        sums = scratch("scores.sums", m, dt, x.device)
        if full:
            torch.sum(work[: full * block].view(full, block), dim=1, out=sums[:full])
            sums[:full].div_(block)
        if m > full:
            sums[full] = work[full * block:].mean()
        work = sums
    if dt == torch.float32:
        return work
    return scratch("scores.f32", work.numel(), torch.float32, work.device).copy_(work)


def _span(block: int) -> int:
    # Chunks hold whole blocks; a block larger than CHUNK is one chunk.
    return max(block, CHUNK // block * block)


def _halves(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(low, high) 16-bit halves of contiguous float32 scores as strided int16 views: no arithmetic.
    Non-negative floats have high halves in [0, 0x7F80], valid int16 bin numbers. None on big-endian."""
    if sys.byteorder != "little" or not scores.is_contiguous():
        return None
    halves = scores.view(torch.int16)
    return halves[0::2], halves[1::2]


def add_high_counts(hist: torch.Tensor, scores: torch.Tensor) -> None:
    """hist[bits >> 16] += 1 over 1-D non-negative float32 scores."""
    halves = _halves(scores)
    if halves is not None:
        high = halves[1]  # bincount reads the strided view: 1.5x faster than shifting first
    else:
        high = scratch("scores.high", scores.numel(), torch.int32, scores.device)
        torch.bitwise_right_shift(scores.view(torch.int32), 16, out=high)
    hist += torch.bincount(high, minlength=BINS)


def add_low_counts(hist: torch.Tensor, scores: torch.Tensor, high_bin: int) -> None:
    """hist[bits & 0xFFFF] += 1 over the scores with bits >> 16 == high_bin."""
    halves = _halves(scores)
    if halves is not None:
        low_half, high = halves
        # Usually a small fraction of the chunk falls in the bin: gather it, then count.
        low = low_half[high == high_bin].to(torch.int32).bitwise_and_(0xFFFF)
    else:
        bits = scores.view(torch.int32)
        high = scratch("scores.high", bits.numel(), torch.int32, bits.device)
        torch.bitwise_right_shift(bits, 16, out=high)
        low = bits[high == high_bin].bitwise_and_(0xFFFF)
    hist += torch.bincount(low, minlength=BINS)


def score_deltas(x: torch.Tensor, base: torch.Tensor | None = None, *, block: int = 1,
                 hist: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """float32 scores mean|x − base| per block of `block` entries; hist += their high-16-bit counts.

    Args:
        x, base: 1-D tensors of one length, any float dtype (base None scores |x|).
        block: entries per score (1 = per entry).
        hist: int64[65536] histogram to accumulate into (radix select pass 1), or None.
        out: float32[ceil(n / block)] to write into, or None for a new tensor.
    Returns:
        The scores.
    """
    _check(x, base, block, hist)
    m = score_count(x.numel(), block)
    if out is None:
        out = torch.empty(m, dtype=torch.float32, device=x.device)
    check_flat("out", out, m)
    be = resolve(backend, x, base)
    if be == "triton":
        from ._scores_triton import score_triton

        score_triton(x, base, block, out=out, hist=hist, high_bin=None)
        return out
    if be == "cpu" and _fused(x, base, out, hist):
        from ._scores_cpu import score_cpu

        score_cpu(x, base, block, out=out, hist=hist, high_bin=None)
        return out
    for s, e in chunks(x.numel(), _span(block)):
        scores = _chunk_scores(x, base, block, s, e)
        out[s // block: s // block + scores.numel()] = scores
        if hist is not None:
            add_high_counts(hist, scores)
    return out


def score_histogram(x: torch.Tensor, base: torch.Tensor | None = None, *, block: int = 1,
                    hist: torch.Tensor, high_bin: int | None = None, backend: str | None = None) -> None:
    """Histogram the scores without storing them: high pass, or low pass within `high_bin`.

    high_bin None: hist[bits >> 16] += 1 for every score (radix select pass 1).
    high_bin b:    hist[bits & 0xFFFF] += 1 for the scores with bits >> 16 == b (pass 2).
    """
    _check(x, base, block, hist)
    be = resolve(backend, x, base)
    if be == "triton":
        from ._scores_triton import score_triton

        score_triton(x, base, block, out=None, hist=hist, high_bin=high_bin)
        return
    if be == "cpu" and _fused(x, base, None, hist):
        from ._scores_cpu import score_cpu

        score_cpu(x, base, block, out=None, hist=hist, high_bin=high_bin)
        return
    for s, e in chunks(x.numel(), _span(block)):
        scores = _chunk_scores(x, base, block, s, e)
        if high_bin is None:
            add_high_counts(hist, scores)
        else:
            add_low_counts(hist, scores, high_bin)


def count_unchanged(x: torch.Tensor, base: torch.Tensor, *, backend: str | None = None) -> int:
    """Entries where x == base (an update of exactly zero; NaN is never equal), as torch counts x == base."""
    check_flat("x", x)
    check_flat("base", base, x.numel())
    if resolve(backend, x, base) == "cpu" and _fused(x, base, None, None) and x.numel():
        from ._scores_cpu import count_unchanged_cpu

        return count_unchanged_cpu(x, base)
    return int(torch.count_nonzero(x == base))


def score_deltas_ref(x: torch.Tensor, base: torch.Tensor | None = None, *, block: int = 1) -> torch.Tensor:
    """Oracle: float64 block means of |x − base| (not rounded to float32)."""
    d = x.double() if base is None else x.double() - base.double()
    d = d.abs()
    n = d.numel()
    m = score_count(n, block)
    pad = torch.zeros(m * block, dtype=torch.float64, device=x.device)
    pad[:n] = d
    counts = torch.full((m,), float(block), dtype=torch.float64, device=x.device)
    if m and n % block:
        counts[-1] = n % block
    return pad.view(m, block).sum(1) / counts if m else pad


def histogram_ref(scores: torch.Tensor, high_bin: int | None = None) -> torch.Tensor:
    """Oracle histograms of float32 scores, by Python integers over their bit patterns."""
    hist = torch.zeros(BINS, dtype=torch.int64, device="cpu")
    for bits in scores.float().view(torch.int32).tolist():
        bits &= 0xFFFFFFFF
        if high_bin is None:
            hist[bits >> 16] += 1
        elif bits >> 16 == high_bin:
            hist[bits & 0xFFFF] += 1
    return hist
