"""kernels/masks.py: bit packing (docs/cpi-ft.md#mask-files) and popcount overlaps, torch and Triton, bit for bit."""

from __future__ import annotations

import pytest
import torch
from _compare import assert_exact

from cpift.kernels._scratch import CHUNK
from cpift.kernels.backend import HAS_TRITON
from cpift.kernels.masks import overlap, overlap_ref, pack_bits, pack_bits_ref, pack_cut, packed_len, unpack_bits
from cpift.kernels.select import magnitude_cut, magnitude_mask_ref

SIZES = [0, 1, 7, 8, 9, 1023, 3000, 2 * CHUNK + 13]
IDS = ["n0", "n1", "n7", "n8", "n9", "n1023", "n3000", "2chunks+13"]
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES, ids=IDS)
def test_pack_unpack_roundtrip_and_layout(n: int, backend: str) -> None:
    mask = torch.rand(n) < 0.3
    packed = pack_bits(mask, backend=backend)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_len(n)
    if n <= 3000 or backend == "torch":
        assert_exact(packed, pack_bits_ref(mask))
    assert_exact(unpack_bits(packed, n, backend=backend), mask)


def test_layout_by_hand() -> None:
    """Bit j of byte i is entry 8i + j (little-endian within the byte); unused high bits are 0."""
    mask = torch.zeros(11, dtype=torch.bool)
    mask[[0, 3, 8, 10]] = True
    assert pack_bits(mask).tolist() == [0b00001001, 0b00000101]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 9, 3000, 2 * CHUNK + 13], ids=["n0", "n1", "n9", "n3000", "2chunks+13"])
def test_overlap_matches_sets(n: int, backend: str) -> None:
    a, b = torch.rand(n) < 0.4, torch.rand(n) < 0.1
    p, q = pack_bits(a), pack_bits(b)
    got = overlap(p, q, backend=backend)
    assert got == (int((a & b).sum()), int((a | b).sum()))
    if n <= 3000:
        assert got == overlap_ref(p, q, n)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="1-D bool"):
        pack_bits(torch.zeros(4))
    with pytest.raises(ValueError, match=r"uint8\[2\] for 9 entries"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="one length"):
        overlap(torch.zeros(3, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlap_of_full_and_empty_bytes(backend: str) -> None:
    """Bytes of 0xFF (popcount 8) and 0x00, where a wrong popcount mask shows at once."""
    n = 4099
    full, half = torch.ones(n, dtype=torch.bool), torch.arange(n) % 2 == 0
    assert overlap(pack_bits(full), pack_bits(full), backend=backend) == (n, n)
    assert overlap(pack_bits(full), pack_bits(half), backend=backend) == ((n + 1) // 2, n)
    assert overlap(pack_bits(~full), pack_bits(~full), backend=backend) == (0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("n", [0, 1, 9, 4095, 5003], ids=["n0", "n1", "n9", "n4095", "n5003"])
def test_pack_cut_equals_reference_selection(n: int, dtype: torch.dtype, backend: str) -> None:
    """Score, cut (ties: lowest index first, so last_tie falls mid-tensor) and pack in one pass."""
    x = (torch.randint(-6, 7, (n,)) / 4).to(dtype)  # many equal |x − base|
    base = (torch.randint(-2, 3, (n,)) / 8).to(dtype)
    for k in sorted({0, n // 3, n}):
        cut = magnitude_cut(x, base, k)
        packed, ties = pack_cut(x, base, cut=cut, backend=backend)
        assert_exact(packed, pack_bits_ref(magnitude_mask_ref(x, base, k)))
        scores = (x.double() - base.double()).abs().float()
        assert ties == int((scores == cut.value).sum())
    scores_only = (x.double() - base.double()).abs().float()
    packed, _ = pack_cut(scores_only, None, cut=magnitude_cut(scores_only, None, n // 2), backend=backend)
    assert_exact(packed, pack_bits_ref(magnitude_mask_ref(scores_only, None, n // 2)))


def test_pack_gathers_every_byte_pattern_and_unaligned_views() -> None:
    """The int64 multiply-gather packs all 256 patterns of 8 entries; misaligned views take the slow path."""
    import itertools

    patterns = torch.tensor(list(itertools.product([False, True], repeat=8))).reshape(-1)
    assert_exact(pack_bits(patterns), pack_bits_ref(patterns))
    shifted = torch.cat([torch.tensor([True]), patterns])[1:]  # storage offset 1: not 8-byte aligned
    assert shifted.storage_offset() % 8 and torch.equal(shifted, patterns)
    assert_exact(pack_bits(shifted), pack_bits_ref(patterns))
