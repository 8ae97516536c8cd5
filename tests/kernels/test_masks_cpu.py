"""kernels/_masks_cpu.py: fused score + cut + pack and the popcount overlap, bit for bit against the
sort oracle and the torch backend, across thread counts, and the dispatch that picks them."""

from __future__ import annotations

import pytest
import torch
from _compare import DTYPE_IDS, DTYPES, assert_exact, nonzero_randn
from _selection_cases import HAS_NUMBA, LENGTH_IDS, LENGTHS, NEEDS_NUMBA, quantized, threads

from cpift.kernels.masks import overlap, overlap_ref, pack_bits, pack_cut, packed_len
from cpift.kernels.select import Cut, magnitude_cut, magnitude_cut_ref, magnitude_mask_ref

pytestmark = pytest.mark.skipif(not HAS_NUMBA, reason=NEEDS_NUMBA)


def _cuts(x: torch.Tensor, base: torch.Tensor | None) -> list[Cut]:
    """Cuts at several k (ties split inside the tensor for quantized inputs), plus the edges: the torch
    backend's magnitude_cut, equal to the sort oracle (tests/kernels/test_select_kernel.py) and faster."""
    n = x.numel()
    ks = sorted(k for k in {1, n // 3, n // 2, n - 1} if 0 < k < n)
    return [Cut.none(), Cut.all()] + [magnitude_cut(x, base, k, backend="torch") for k in ks]


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "many-ties"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", LENGTHS, ids=LENGTH_IDS)
def test_pack_cut_matches_oracle_and_torch(n, dtype, ties):
    if ties:
        x, base = quantized(n, dtype, 1 / 64), quantized(n, dtype, 1 / 128)
    else:
        x, base = nonzero_randn(n, dtype), nonzero_randn(n, dtype)
    before = (x.clone(), base.clone())
    scores = (x.double() - base.double()).abs().float()
    for cut in _cuts(x, base):
        got, got_ties = pack_cut(x, base, cut=cut, backend="cpu")
        want, want_ties = pack_cut(x, base, cut=cut, backend="torch")
        assert_exact(got, want)
        assert got_ties == want_ties == int((scores == cut.value).sum())
        assert pack_cut(x, base, cut=cut, count_ties=False, backend="cpu")[1] == 0
    k = n // 3  # the packed form of the sort oracle's own mask
    got, _ = pack_cut(x, base, cut=magnitude_cut_ref(x, base, k), backend="cpu")
    assert_exact(got, pack_bits(magnitude_mask_ref(x, base, k), backend="torch"))
    assert_exact(x, before[0])
    assert_exact(base, before[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pack_cut_without_base_into_out(dtype):
    x = quantized(3 * (1 << 16) + 5, dtype, 1 / 32)
    cut = magnitude_cut_ref(x, None, x.numel() // 4)
    out = torch.full((packed_len(x.numel()),), 0xAA, dtype=torch.uint8)
    got, ties = pack_cut(x, None, cut=cut, out=out, backend="cpu")
    assert got is out
    want, want_ties = pack_cut(x, None, cut=cut, backend="torch")
    assert_exact(out, want)
    assert ties == want_ties


@pytest.mark.parametrize("n", LENGTHS, ids=LENGTH_IDS)
def test_overlap_matches_oracle_and_torch(n):
    a = torch.rand(n) < 0.3
    p = pack_bits(a, backend="torch")
    q = pack_bits(torch.rand(n) < 0.6, backend="torch")
    got = overlap(p, q, backend="cpu")
    assert got == overlap(p, q, backend="torch")
    if n <= 1 << 16:  # the set oracle is Python-slow
        assert got == overlap_ref(p, q, n)
    assert overlap(p, p, backend="cpu") == (int(a.sum()), int(a.sum()))


def test_overlap_of_full_bytes_and_unaligned_views():
    full = torch.full((3 * (1 << 16) + 5,), 0xFF, dtype=torch.uint8)
    empty = torch.zeros_like(full)
    assert overlap(full, empty, backend="cpu") == (0, 8 * full.numel())
    buf = torch.randint(0, 256, (2 * 1000 + 3,), dtype=torch.uint8)
    p, q = buf[1:1001], buf[1002:2002]  # odd byte offsets: not 8-byte aligned
    assert overlap(p, q, backend="cpu") == overlap(p, q, backend="torch") == overlap_ref(p, q, 8000)


def test_same_bytes_for_any_thread_count():
    x, base = quantized(1823 * 781, torch.bfloat16, 1 / 64), quantized(1823 * 781, torch.bfloat16, 1 / 128)
    cut = magnitude_cut_ref(x, base, x.numel() // 3)
    results = []
    for t in (1, 2):
        with threads(t):
            packed, ties = pack_cut(x, base, cut=cut, backend="cpu")
            results.append((packed, ties, overlap(packed, packed, backend="cpu")))
    assert_exact(results[0][0], results[1][0])
    assert results[0][1:] == results[1][1:]


def test_dispatch(monkeypatch):
    import cpift.kernels._masks_cpu as fused

    x, base = nonzero_randn(1000, torch.bfloat16), nonzero_randn(1000, torch.bfloat16)
    cut = magnitude_cut_ref(x, base, 100)
    calls = []
    real_pack, real_overlap = fused.pack_cut_cpu, fused.overlap_cpu
    monkeypatch.setattr(fused, "pack_cut_cpu", lambda *a: calls.append("pack") or real_pack(*a))
    monkeypatch.setattr(fused, "overlap_cpu", lambda *a: calls.append("overlap") or real_overlap(*a))
    packed, _ = pack_cut(x, base, cut=cut)  # auto on CPU tensors: the fused kernels
    assert overlap(packed, packed) == (100, 100)
    assert calls == ["pack", "overlap"]
    monkeypatch.setattr(fused, "pack_cut_cpu", lambda *a: pytest.fail("fused kernel ran"))
    monkeypatch.setattr(fused, "overlap_cpu", lambda *a: pytest.fail("fused kernel ran"))
    assert_exact(pack_cut(x, base, cut=cut, backend="torch")[0], packed)
    assert overlap(packed, packed, backend="torch") == (100, 100)
    x64 = x.double()  # float64 keeps the torch path under "cpu"
    assert_exact(pack_cut(x64, base, cut=cut, backend="cpu")[0], packed)
