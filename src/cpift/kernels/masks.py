# Bit-packed core masks (docs/cpi-ft.md#mask-files): pack and unpack (8 entries a byte, little-endian
# bits), a fused score-compare-pack with the tie rule (pack_cut), and popcount overlaps |P ∩ Q|, |P ∪ Q|
# for Jaccard, without unpacking.
# Exact: every backend gives the same bytes and counts.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernelsmaskspy
from __future__ import annotations

import sys

import torch

from ._scratch import CHUNK, check_flat, chunks, scratch
from .backend import resolve
from .select import Cut, cut_mask, magnitude_scores

# Host constants: moved to the data's device where they meet it (8 or 256 entries).
_WEIGHTS = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device="cpu")
_SHIFTS = torch.arange(8, dtype=torch.uint8, device="cpu")
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64, device="cpu")


def packed_len(n: int) -> int:
    return (n + 7) // 8


def _fused(*tensors: torch.Tensor | None) -> bool:
    """Whether the fused CPU kernels take these tensors: contiguous on the CPU, float32/bf16/fp16 or uint8."""
    from ._cpu import supports

    data = [t for t in tensors if t is not None and t.dtype != torch.uint8]
    packed = [t for t in tensors if t is not None and t.dtype == torch.uint8]
    return supports(*data) and all(t.device.type == "cpu" and t.is_contiguous() for t in packed)


def pack_bits(mask: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Pack a 1-D bool tensor into uint8, 8 entries a byte, bit j of byte i = entry 8i + j."""
    if mask.dtype != torch.bool or mask.dim() != 1:
        raise ValueError(f"pack_bits: expected a 1-D bool tensor, got {mask.dtype} of shape {list(mask.shape)}")
    n = mask.numel()
    out = torch.empty(packed_len(n), dtype=torch.uint8, device=mask.device)
    if resolve(backend, mask) == "triton":
        from ._masks_triton import pack_bits_triton

        return pack_bits_triton(mask, out)
    for s, e in chunks(n):  # CHUNK is a multiple of 8: chunk s starts at byte s // 8
        _pack_into(mask[s:e], out[s // 8:])
    return out


# Gathers 8 bytes of 0/1 (entry j in byte j of a little-endian int64) into bits 56..63 as Σ b_j << j:
# the product's diagonal terms b_j·2^(56+j) land there and every cross term lands outside bits
# 56..63 without carrying into them (checked for all 256 patterns in the tests). One multiply and
# one shift per 8 entries, instead of an 8-wide multiply and sum.
_GATHER = 0x0102040810204080
_LITTLE = sys.byteorder == "little"


def _pack_into(mask: torch.Tensor, out: torch.Tensor) -> None:
    """Pack a bool chunk whose length is a multiple of 8, or the tensor's tail, into out."""
    full = mask.numel() // 8
    if full:
        body = mask[: full * 8].view(torch.uint8)
        if _LITTLE and body.storage_offset() % 8 == 0:
            words = scratch("masks.words", full, torch.int64, mask.device)
            torch.mul(body.view(torch.int64), _GATHER, out=words)
            out[:full] = words.bitwise_right_shift_(56)  # the copy keeps the low byte
        else:
            bits = scratch("masks.bits", full * 8, torch.uint8, mask.device).view(full, 8)
            torch.mul(body.view(full, 8), _WEIGHTS.to(mask.device), out=bits)
            out[:full] = bits.sum(1, dtype=torch.uint8)
    if mask.numel() % 8:
        tail = mask[full * 8:].view(torch.uint8)
        out[full] = int((tail * _WEIGHTS[: tail.numel()].to(mask.device)).sum())


def pack_cut(x: torch.Tensor, base: torch.Tensor | None = None, *, cut: Cut, out: torch.Tensor | None = None,
             count_ties: bool = True, backend: str | None = None) -> tuple[torch.Tensor, int]:
    """Packed mask of the entries a Cut selects among the scores |x − base|, and the tie count.

    Args:
        x, base: 1-D tensors of one length (base None: the scores are |x|, e.g. block scores).
        cut: the selection; its last_tie is a flat index into x.
        out: uint8[ceil(n / 8)] to write into, or None.
        count_ties: count the scores equal to cut.value (torch and cpu backends: 0 returned when False).
    Returns:
        (packed, number of scores equal to cut.value), the latter for splitting ties across tensors.
    """
    check_flat("x", x)
    n = x.numel()
    if base is not None:
        check_flat("base", base, n)
    if out is None:
        out = torch.empty(packed_len(n), dtype=torch.uint8, device=x.device)
    check_flat("out", out, packed_len(n))
    be = resolve(backend, x, base)
    if be == "triton":
        from ._masks_triton import pack_cut_triton

        return out, pack_cut_triton(x, base, float(cut.value), int(cut.last_tie), out)
    if be == "cpu" and _fused(x, base, out):
        from ._masks_cpu import pack_cut_cpu

        ties = pack_cut_cpu(x, base, float(cut.value), int(cut.last_tie), out)
        return out, ties if count_ties else 0
    ties = 0
    for s, e in chunks(n):  # CHUNK is a multiple of 8: chunk s starts at byte s // 8
        scores = magnitude_scores(x, base, s, e)
        if count_ties:
            eq = scratch("masks.eq", e - s, torch.bool, x.device)
            ties += int(torch.count_nonzero(torch.eq(scores, cut.value, out=eq)))
        _pack_into(cut_mask(scores, cut, s, out=scratch("masks.sel", e - s, torch.bool, x.device)), out[s // 8:])
    return out, ties


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
        torch.bitwise_right_shift(packed[s:e, None], _SHIFTS.to(packed.device), out=view[s:e]).bitwise_and_(1)
    return out[:n]


def overlap(p: torch.Tensor, q: torch.Tensor, *, backend: str | None = None) -> tuple[int, int]:
    """(|P ∩ Q|, |P ∪ Q|) of two packed masks of the same length, by popcount."""
    if p.dtype != torch.uint8 or q.dtype != torch.uint8 or p.shape != q.shape or p.dim() != 1:
        raise ValueError(f"overlap: expected two uint8 tensors of one length, got {p.dtype}{list(p.shape)} "
                         f"and {q.dtype}{list(q.shape)}")
    be = resolve(backend, p, q)
    if be == "triton":
        from ._masks_triton import overlap_triton

        return overlap_triton(p, q)
    if be == "cpu" and _fused(p, q):
        from ._masks_cpu import overlap_cpu

        return overlap_cpu(p, q)
    inter = union = 0
    for s, e in chunks(p.numel()):
        both = scratch("masks.and", e - s, torch.uint8, p.device)
        torch.bitwise_and(p[s:e], q[s:e], out=both)
        inter += _popcount(both)
        torch.bitwise_or(p[s:e], q[s:e], out=both)
        union += _popcount(both)
    return inter, union


def popcount(packed: torch.Tensor) -> int:
    """Set bits of a packed uint8 mask (padding bits of the last byte included)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"popcount: expected a 1-D uint8 tensor, got {packed.dtype}{list(packed.shape)}")
    return sum(_popcount(packed[s:e].contiguous()) for s, e in chunks(packed.numel()))


def _popcount(b: torch.Tensor) -> int:
    """Set bits of a contiguous uint8 chunk: SWAR on int64 words (3x faster than a byte table), table for the tail."""
    words = b.numel() // 8
    total = int(_POPCOUNT.to(b.device)[b[words * 8:].long()].sum()) if b.numel() % 8 else 0
    if words and b.storage_offset() % 8 == 0:
        x = scratch("masks.swar", words, torch.int64, b.device)
        t = scratch("masks.swar2", words, torch.int64, b.device)
        x.copy_(b[: words * 8].view(torch.int64))
        # Bit-parallel sums: pairs, nibbles, bytes, then all 8 bytes of a word into its top byte (≤ 64,
        # so arithmetic shifts of these non-negative values are exact).
        torch.bitwise_right_shift(x, 1, out=t).bitwise_and_(0x5555555555555555)
        x.sub_(t)
        torch.bitwise_right_shift(x, 2, out=t).bitwise_and_(0x3333333333333333)
        x.bitwise_and_(0x3333333333333333).add_(t)
        torch.bitwise_right_shift(x, 4, out=t)
        x.add_(t).bitwise_and_(0x0F0F0F0F0F0F0F0F)
        x.mul_(0x0101010101010101).bitwise_right_shift_(56)
        total += int(x.sum())
    elif words:
        total += int(_POPCOUNT.to(b.device)[b[: words * 8].long()].sum())
    return total


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
                         for i in range(packed_len(len(values)))], dtype=torch.uint8, device=mask.device)
