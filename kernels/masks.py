# Bit-packed core masks (DESIGN §4) and their overlaps, without unpacking.
#
# Format: one uint8 per 8 entries of the row-major flattened tensor; bit j (little-endian, value
# 1 << j) of byte i is entry 8i + j; the last byte's unused high bits are 0.
#   pack_bits(mask)            bool[n]  → uint8[ceil(n/8)]
#   unpack_bits(packed, n)     uint8[m] → bool[n]
#   overlap(p, q)              (|P ∩ Q|, |P ∪ Q|) by popcount of p & q and p | q, for Jaccard
# Bytes per entry: pack reads 1 (bool) and writes 1/8; overlap reads 2/8.
#
# The torch functions work in chunks of CHUNK bytes through reused scratch (no fresh large tensors);
# the Triton kernels (kernels/_masks_triton.py, imported only when they run) do the same per block.
from __future__ import annotations

import torch

from ._backend import resolve
from ._scratch import CHUNK, chunks, scratch

_WEIGHTS = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
_SHIFTS = torch.arange(8, dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def packed_len(n: int) -> int:
    return (n + 7) // 8


def pack_bits(mask: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Pack a 1-D bool tensor into uint8, 8 entries a byte, bit j of byte i = entry 8i + j."""
    if mask.dtype != torch.bool or mask.dim() != 1:
        raise ValueError(f"pack_bits: expected a 1-D bool tensor, got {mask.dtype} of shape {list(mask.shape)}")
    n = mask.numel()
    out = torch.empty(packed_len(n), dtype=torch.uint8, device=mask.device)
    if resolve(backend, mask) == "triton":
        from ._masks_triton import pack_bits_triton

        return pack_bits_triton(mask, out)
    full = n // 8
    body = mask[: full * 8].view(torch.uint8).view(full, 8)
    for s, e in chunks(full, CHUNK // 8):
        bits = scratch("masks.bits", (e - s) * 8, torch.uint8).view(e - s, 8)
        torch.mul(body[s:e], _WEIGHTS, out=bits)
        out[s:e] = bits.sum(1, dtype=torch.uint8)
    if n % 8:
        tail = mask[full * 8:].view(torch.uint8)
        out[full] = int((tail * _WEIGHTS[: tail.numel()]).sum())
    return out


def unpack_bits(packed: torch.Tensor, n: int, *, backend: str | None = None) -> torch.Tensor:
    """Inverse of pack_bits: the first n entries as a bool tensor."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_len(n):
        raise ValueError(f"unpack_bits: expected uint8[{packed_len(n)}] for {n} entries, got "
                         f"{packed.dtype}{list(packed.shape)}")
    out = torch.empty(packed.numel() * 8, dtype=torch.bool, device=packed.device)
    if resolve(backend, packed) == "triton":
        from ._masks_triton import unpack_bits_triton

        return unpack_bits_triton(packed, out)[:n]
    view = out.view(torch.uint8).view(-1, 8)
    for s, e in chunks(packed.numel(), CHUNK // 8):
        torch.bitwise_right_shift(packed[s:e, None], _SHIFTS, out=view[s:e]).bitwise_and_(1)
    return out[:n]


def overlap(p: torch.Tensor, q: torch.Tensor, *, backend: str | None = None) -> tuple[int, int]:
    """(|P ∩ Q|, |P ∪ Q|) of two packed masks of the same length, by popcount."""
    if p.dtype != torch.uint8 or q.dtype != torch.uint8 or p.shape != q.shape or p.dim() != 1:
        raise ValueError(f"overlap: expected two uint8 tensors of one length, got {p.dtype}{list(p.shape)} "
                         f"and {q.dtype}{list(q.shape)}")
    if resolve(backend, p, q) == "triton":
        from ._masks_triton import overlap_triton

        return overlap_triton(p, q)
    inter = union = 0
    table = _POPCOUNT.to(p.device)
    for s, e in chunks(p.numel()):
        both = scratch("masks.and", e - s, torch.uint8)
        torch.bitwise_and(p[s:e], q[s:e], out=both)
        inter += int(table[both.long()].sum())
        torch.bitwise_or(p[s:e], q[s:e], out=both)
        union += int(table[both.long()].sum())
    return inter, union


def overlap_ref(p: torch.Tensor, q: torch.Tensor, n: int) -> tuple[int, int]:
    """Oracle: unpack by Python integers, count with set logic."""
    def bits(t):
        return {8 * i + j for i, byte in enumerate(t.tolist()) for j in range(8) if byte >> j & 1 and 8 * i + j < n}
    a, b = bits(p), bits(q)
    return len(a & b), len(a | b)


def pack_bits_ref(mask: torch.Tensor) -> torch.Tensor:
    """Oracle: byte i = Σ_j mask[8i + j] << j, in Python integers."""
    values = mask.tolist()
    return torch.tensor([sum(1 << j for j in range(8) if 8 * i + j < len(values) and values[8 * i + j])
                         for i in range(packed_len(len(values)))], dtype=torch.uint8)
