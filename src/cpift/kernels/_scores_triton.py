# Triton kernel of kernels/scores.py (maths, precision and bytes per entry: see its header), imported
# lazily by it. One launch scores ROWS blocks per program and, in the same pass, counts the high or
# the low 16 bits of the scores into the caller's int64 histogram with relaxed atomics (counts need no
# ordering; acquire/release semantics would add a fence per atomic on the GPU; int64, as one launch
# may put 2^31 scores in one bin). Real deltas crowd into few bins, and atomics to one address are
# serialized: every exactly-zero score (an unchanged bf16 entry) lands on bin 0, and bf16 deltas are
# a few quantized steps (1, 2, 3 ulps of the weight), so the others tie in a few bins too, in both
# passes. Each program therefore pre-aggregates before its global atomics (_count_digits): digit 0
# (pass 1: zero scores; pass 2: scores whose low half is 0, i.e. exact in bf16, as small deltas of
# nearby weights are) is summed and added by one atomic; the digits in the WINDOW bins that end at the
# program's largest digit (16 binades in pass 1) are counted by tl.histogram in shared memory and added
# by one atomic per non-empty bin; digits below the window, rare, go one atomic each, and a program
# with none skips that step. Cost, compiled for sm_90 (block 1, 4096 scores, 8 warps; SASS counted):
# about 1.6 warp instructions per score (2.0 where the lone step runs) against 1.2 for one atomic per
# score; H100 issues ~1.05e12 warp instructions/s, so ~1.25 per score keeps up with HBM3. No sort
# (tl.sort and scans made the interpreter far too slow at 16k scores per program). `stats` counts the
# global atomics issued, for tests and gpu_check.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import abs_delta, launch_options
from .backend import interpreting

BINS = 1 << 16


@triton.jit
def _count_digits(hist_ptr, stat_ptr, digit, counted, WINDOW: tl.constexpr, STATS: tl.constexpr):
    """hist[digit] += 1 where `counted`, pre-aggregated in three tiers (see the header)."""
    zero = counted & (digit == 0)
    zeros = tl.sum(zero.to(tl.int32), axis=0).to(tl.int64)  # int32 within a program, int64 in the histogram
    tl.atomic_add(hist_ptr, zeros, mask=zeros > 0, sem="relaxed")
    rest = counted & ~zero
    low = tl.max(tl.where(rest, digit, -1), axis=0) - (WINDOW - 1)  # the window ends at the largest digit
    rel = digit - low
    near = rest & (rel.to(tl.uint32) < WINDOW)
    local = tl.histogram(tl.where(near, rel, 0), WINDOW, mask=near).to(tl.int64)
    tl.atomic_add(hist_ptr + low + tl.arange(0, WINDOW), local, mask=local > 0, sem="relaxed")
    alone = rest & ~near
    lone = tl.sum(alone.to(tl.int32), axis=0)
    if lone > 0:  # uniform branch: most programs have no digit below the window
        tl.atomic_add(hist_ptr + digit, tl.full(digit.shape, 1, tl.int64), mask=alone, sem="relaxed")
    if STATS:  # global atomics issued: [pre-aggregated (bin 0, window bins), lone scores]
        tl.atomic_add(stat_ptr, (zeros > 0).to(tl.int64) + tl.sum((local > 0).to(tl.int64), axis=0), sem="relaxed")
        tl.atomic_add(stat_ptr + 1, lone.to(tl.int64), sem="relaxed")


@triton.jit
def _score_kernel(x_ptr, b_ptr, s_ptr, hist_ptr, stat_ptr, n, n_scores, block, high_bin,
                  HAS_BASE: tl.constexpr, F64: tl.constexpr, WRITE: tl.constexpr, PASS: tl.constexpr,
                  ROWS: tl.constexpr, INNER: tl.constexpr, WINDOW: tl.constexpr, STATS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_scores
    if INNER == 1:
        # block == 1: one entry per score, a flat vector.
        s = abs_delta(x_ptr, b_ptr, rows, row_ok, HAS_BASE, F64).to(tl.float32)
    else:
        # ROWS × INNER tiles walk along each block; sums in the compute dtype, one division.
        if F64:
            acc = tl.zeros([ROWS], dtype=tl.float64)
        else:
            acc = tl.zeros([ROWS], dtype=tl.float32)
        cols = tl.arange(0, INNER)
        for j0 in range(0, block, INNER):
            offs = rows[:, None] * block + (j0 + cols)[None, :]
            m = row_ok[:, None] & ((j0 + cols)[None, :] < block) & (offs < n)
            acc += tl.sum(abs_delta(x_ptr, b_ptr, offs, m, HAS_BASE, F64), axis=1)
        count = tl.minimum(n - rows * block, block)
        count = tl.where(row_ok, count, 1)
        # IEEE division, as torch's div_: float32 `/` compiles to an approximate divide on NVIDIA, so
        # div_rn; float64 `/` is already div.rn.f64 (div_rn takes float32 only).
        if F64:
            s = (acc / count.to(tl.float64)).to(tl.float32)
        else:
            s = tl.math.div_rn(acc, count.to(tl.float32))
    if WRITE:
        tl.store(s_ptr + rows, s, mask=row_ok)
    bits = s.to(tl.uint32, bitcast=True)
    if PASS != 0:
        counted = row_ok
        if PASS == 2:
            counted = counted & ((bits >> 16).to(tl.int32) == high_bin)
        digit = bits >> 16
        if PASS == 2:
            digit = bits & 0xFFFF
        _count_digits(hist_ptr, stat_ptr, digit.to(tl.int32), counted, WINDOW, STATS)


def _tiles(block: int) -> tuple[int, int, int]:
    """(ROWS, INNER, num_warps): scores per program, entries per step along a block, warps per program."""
    if block == 1:
        return (1 << 14, 1, 4) if interpreting() else (4096, 1, 8)
    inner = min(triton.next_power_of_2(block), 4096 if interpreting() else 1024)
    rows = max(1, (1 << 14 if interpreting() else 4096) // inner)
    return rows, inner, 4


WINDOW = 2048  # bins of the per-program shared-memory histogram (8 KiB): 16 binades in pass 1


def score_triton(x: torch.Tensor, base: torch.Tensor | None, block: int, *, out: torch.Tensor | None,
                 hist: torch.Tensor | None, high_bin: int | None, stats: torch.Tensor | None = None) -> None:
    """Launch the scoring kernel: write `out` (if given) and add to `hist` (if given). `stats` (int64[2]
    on x's device, for tests and gpu_check) gets the global atomics issued: [one per pre-aggregated
    bin (bin 0, the window's non-empty bins), one per lone score]."""
    n = x.numel()
    m = (n + block - 1) // block
    if m == 0:
        return
    counts = None
    if hist is not None:  # count into hist itself when it is the kernel's: int64 on x's device
        direct = hist.dtype == torch.int64 and hist.device == x.device and hist.is_contiguous()
        counts = hist if direct else torch.zeros(BINS, dtype=torch.int64, device=x.device)
    rows, inner, warps = _tiles(block)
    f64 = x.dtype == torch.float64 or (base is not None and base.dtype == torch.float64)
    _score_kernel[(triton.cdiv(m, rows),)](
        x, base if base is not None else x, out if out is not None else x,
        counts if counts is not None else x, stats if stats is not None else x, n, m, block,
        -1 if high_bin is None else int(high_bin),
        HAS_BASE=base is not None, F64=f64, WRITE=out is not None,
        PASS=0 if hist is None else (1 if high_bin is None else 2), ROWS=rows, INNER=inner,
        WINDOW=min(WINDOW, rows), STATS=stats is not None, **launch_options(num_warps=warps))
    if hist is not None and counts is not hist:
        hist += counts.to(hist.device)
