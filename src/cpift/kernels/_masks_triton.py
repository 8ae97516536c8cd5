# Triton kernels of kernels/masks.py (pack, unpack, popcount overlap), imported lazily by it.
# Format and byte counts: see the header of kernels/masks.py.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import abs_delta, launch_options

_BYTES = 512  # packed bytes per program (4096 entries)


@triton.jit
def _pack_kernel(mask_ptr, out_ptr, n, BYTES: tl.constexpr):
    pid = tl.program_id(0)
    byte = pid.to(tl.int64) * BYTES + tl.arange(0, BYTES)
    entry = byte[:, None] * 8 + tl.arange(0, 8)[None, :]
    bits = tl.load(mask_ptr + entry, mask=entry < n, other=0).to(tl.int32)
    packed = tl.sum(bits << tl.arange(0, 8)[None, :], axis=1)
    tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte * 8 < n)


@triton.jit
def _unpack_kernel(packed_ptr, out_ptr, m, BYTES: tl.constexpr):
    pid = tl.program_id(0)
    byte = pid.to(tl.int64) * BYTES + tl.arange(0, BYTES)
    values = tl.load(packed_ptr + byte, mask=byte < m, other=0).to(tl.int32)
    bits = (values[:, None] >> tl.arange(0, 8)[None, :]) & 1
    entry = byte[:, None] * 8 + tl.arange(0, 8)[None, :]
    # m.to(int64): Triton passes m < 2^31 as int32, and m·8 overflows from 2^28 bytes (2^31 entries) on.
    tl.store(out_ptr + entry, bits.to(tl.uint8), mask=entry < m.to(tl.int64) * 8)


@triton.jit
def _popcount(x):
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


@triton.jit
def _overlap_kernel(p_ptr, q_ptr, part_ptr, m, BYTES: tl.constexpr):
    # per-program counts (no atomics); the host adds them up
    pid = tl.program_id(0)
    byte = pid.to(tl.int64) * BYTES + tl.arange(0, BYTES)
    inside = byte < m
    p = tl.load(p_ptr + byte, mask=inside, other=0).to(tl.int32)
    q = tl.load(q_ptr + byte, mask=inside, other=0).to(tl.int32)
    tl.store(part_ptr + pid * 2, tl.sum(_popcount(p & q), axis=0))
    tl.store(part_ptr + pid * 2 + 1, tl.sum(_popcount(p | q), axis=0))


@triton.jit
def _pack_cut_kernel(x_ptr, b_ptr, out_ptr, tie_ptr, n, value, last_tie, HAS_BASE: tl.constexpr,
                     F64: tl.constexpr, BYTES: tl.constexpr, PACK: tl.constexpr):
    # Score, compare with the cut and pack in one pass; per-program tie counts (no atomics).
    # PACK False: the counts alone (the tie search's first step), nothing else written.
    pid = tl.program_id(0)
    byte = pid.to(tl.int64) * BYTES + tl.arange(0, BYTES)
    entry = byte[:, None] * 8 + tl.arange(0, 8)[None, :]
    inside = entry < n
    s = abs_delta(x_ptr, b_ptr, entry, inside, HAS_BASE, F64).to(tl.float32)
    tie = inside & (s == value)
    if PACK:
        chosen = inside & ((s > value) | (tie & (entry <= last_tie)))
        packed = tl.sum(chosen.to(tl.int32) << tl.arange(0, 8)[None, :], axis=1)
        tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte * 8 < n)
    tl.store(tie_ptr + pid, tl.sum(tl.sum(tie.to(tl.int32), axis=1), axis=0))


def pack_cut_triton(x: torch.Tensor, base: torch.Tensor | None, value: float, last_tie: int,
                    out: torch.Tensor) -> int:
    """Launch _pack_cut_kernel; last_tie is local to x. Returns the number of scores equal to value."""
    n = x.numel()
    programs = triton.cdiv(out.numel(), _BYTES)
    if not programs:
        return 0
    ties = torch.zeros(programs, dtype=torch.int32, device=x.device)
    f64 = x.dtype == torch.float64 or (base is not None and base.dtype == torch.float64)
    # A last_tie beyond the tensor means every tie; clamping keeps it in int64 range either way.
    _pack_cut_kernel[(programs,)](x, base if base is not None else x, out, ties, n, value,
                                  max(-1, min(last_tie, n)), HAS_BASE=base is not None, F64=f64, BYTES=_BYTES,
                                  PACK=True, **launch_options())
    return int(ties.long().sum())


def tie_counts_triton(x: torch.Tensor, base: torch.Tensor | None, value: float) -> tuple[torch.Tensor, int]:
    """(int64 tie counts per slice of `span` entries, on x's device; span): the tie search's first step.

    One read of the inputs, nothing written but 4 bytes per 4096 entries; kernels/select.py then finds
    the slice holding the r-th tie by a prefix sum and searchsorted on the device and scores that slice.
    """
    n = x.numel()
    programs = max(1, triton.cdiv(n, 8 * _BYTES))
    ties = torch.zeros(programs, dtype=torch.int32, device=x.device)
    if n:
        f64 = x.dtype == torch.float64 or (base is not None and base.dtype == torch.float64)
        _pack_cut_kernel[(programs,)](x, base if base is not None else x, ties, ties, n, value, -1,
                                      HAS_BASE=base is not None, F64=f64, BYTES=_BYTES, PACK=False,
                                      **launch_options())
    return ties.long(), 8 * _BYTES


def pack_bits_triton(mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n = mask.numel()
    if n:
        _pack_kernel[(triton.cdiv(out.numel(), _BYTES),)](mask.view(torch.uint8), out, n, BYTES=_BYTES,
                                                          **launch_options())
    return out


def unpack_bits_triton(packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    m = packed.numel()
    if m:
        _unpack_kernel[(triton.cdiv(m, _BYTES),)](packed, out.view(torch.uint8), m, BYTES=_BYTES,
                                                 **launch_options())
    return out


def overlap_triton(p: torch.Tensor, q: torch.Tensor) -> tuple[int, int]:
    m = p.numel()
    programs = triton.cdiv(m, _BYTES)
    if not programs:
        return 0, 0
    parts = torch.zeros(programs * 2, dtype=torch.int32, device=p.device)
    _overlap_kernel[(programs,)](p, q, parts, m, BYTES=_BYTES, **launch_options())
    inter, union = parts.view(-1, 2).long().sum(0).tolist()
    return inter, union
