"""kernels/select.py: exact top-k by radix select, bit-for-bit equal to a stable float64 sort."""

from __future__ import annotations

import math

import pytest
import torch
from _compare import DTYPE_IDS, DTYPES, assert_exact, nonzero_randn

from cpift.kernels._scratch import CHUNK, chunks
from cpift.kernels.backend import HAS_TRITON
from cpift.kernels.select import (
    Cut,
    RadixSelect,
    cut_keep,
    cut_mask,
    magnitude_cut,
    magnitude_cut_ref,
    magnitude_mask_ref,
    magnitude_scores,
)

SIZES = [1, 1023, 3000, CHUNK + 1, 1823 * 781]
SIZE_IDS = ["n1", "n1023", "n3000", "chunk+1", "1823x781"]


def _mask(x: torch.Tensor, base: torch.Tensor | None, cut: Cut) -> torch.Tensor:
    """The kernel-side mask, built chunk by chunk as a merge would; cut_keep must agree with it."""
    out = torch.empty(x.numel(), dtype=torch.bool)
    factors = torch.empty(x.numel(), dtype=torch.float32)
    for s, e in chunks(x.numel()):
        cut_mask(magnitude_scores(x, base, s, e), cut, s, out=out[s:e])
        cut_keep(magnitude_scores(x, base, s, e), cut, s, out=factors[s:e])
    assert_exact(factors, out.float())
    return out


def _check(x: torch.Tensor, base: torch.Tensor | None, ks: list[int], backend: str | None = None) -> None:
    for k in ks:
        cut = magnitude_cut(x, base, k, backend=backend)
        assert cut == magnitude_cut_ref(x, base, k), f"k={k}"
        mask = _mask(x, base, cut)
        assert int(mask.sum()) == k, f"k={k}"
        assert_exact(mask, magnitude_mask_ref(x, base, k))


def _ks(n: int) -> list[int]:
    return sorted({0, 1, n // 3, n - 1, n})


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", SIZES, ids=SIZE_IDS)
def test_cut_matches_sort(n: int, dtype: torch.dtype) -> None:
    x = nonzero_randn(n, dtype)
    base = nonzero_randn(n, dtype)
    before = (x.clone(), base.clone())
    _check(x, base, _ks(n))
    _check(x, None, [n // 7])
    assert_exact(x, before[0])
    assert_exact(base, before[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [1023, CHUNK + 1001], ids=["n1023", "chunk+1001"])
def test_heavy_ties(n: int, dtype: torch.dtype) -> None:
    values = torch.tensor([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 3.0])
    x = values[torch.randint(0, 7, (n,))].to(dtype)
    base = values[torch.randint(0, 7, (n,))].to(dtype)
    # k inside a run of equal scores, so only some ties are kept (the third pass).
    ks = _ks(n) + [n // 2, n // 5 + 3, n - 17]
    _check(x, base, ks)
    _check(x, None, ks)


def test_ties_split_across_chunks() -> None:
    n = 3 * CHUNK + 5
    x = torch.ones(n, dtype=torch.bfloat16)
    x[::1000] = 4.0
    big = int((x == 4.0).sum())
    for k in (big, big + 1, big + CHUNK + 12, n - 1):
        cut = magnitude_cut(x, None, k)
        assert cut == magnitude_cut_ref(x, None, k)
        assert_exact(_mask(x, None, cut), magnitude_mask_ref(x, None, k))
    assert magnitude_cut(x, None, big) == Cut(value=4.0, last_tie=n - 1)
    assert magnitude_cut(x, None, big + CHUNK + 12).value == 1.0


def test_all_equal_and_zero_scores() -> None:
    x = torch.full((5000,), 0.25)
    assert magnitude_cut(x, x.clone(), 2500) == Cut(value=0.0, last_tie=2499)
    assert_exact(_mask(x, x.clone(), Cut(0.0, 2499)), torch.arange(5000) < 2500)


def test_float64_inputs_are_scored_in_float32() -> None:
    x = torch.randn(3000, dtype=torch.float64)
    base = torch.randn(3000, dtype=torch.float64)
    _check(x, base, [0, 1, 1000, 2999, 3000])
    assert magnitude_scores(x, base, 0, 3000).dtype == torch.float32


def test_all_and_none_cuts() -> None:
    scores = torch.tensor([0.0, 1.0, math.inf, 3.0])
    assert_exact(cut_mask(scores, Cut.all(), 0), torch.ones(4, dtype=torch.bool))
    assert_exact(cut_mask(scores, Cut.none(), 0), torch.zeros(4, dtype=torch.bool))
    x = nonzero_randn(100, torch.float16)
    assert magnitude_cut(x, None, 0) == Cut.none()
    assert magnitude_cut(x, None, 100) == Cut.all()
    empty = torch.empty(0, dtype=torch.bfloat16)
    assert magnitude_cut(empty, empty, 0) == Cut.none() == magnitude_cut_ref(empty, empty, 0)
    assert cut_mask(torch.empty(0), Cut(1.0, 5), 0).numel() == 0


def test_cut_mask_tie_window_respects_chunk_start() -> None:
    scores = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.5])
    cut = Cut(value=1.0, last_tie=12)
    for start, expected in ((10, [1, 1, 1, 0, 0]), (13, [1, 0, 0, 0, 0]), (0, [1, 1, 1, 1, 0])):
        assert cut_mask(scores, cut, start).tolist() == [bool(v) for v in expected]
        assert cut_keep(scores.clone(), cut, start, out=torch.empty(5)).tolist() == expected


def test_cut_keep_is_exact_next_to_the_value() -> None:
    v = 1.0
    below, above = torch.tensor(v).nextafter(torch.tensor(0.0)), torch.tensor(v).nextafter(torch.tensor(2.0))
    tiny = torch.tensor(0.0).nextafter(torch.tensor(1.0))  # the smallest subnormal
    scores = torch.stack([below, torch.tensor(v), above, tiny, torch.tensor(0.0)])
    for cut in (Cut(v, -1), Cut(v, 10), Cut(0.0, -1), Cut(0.0, 10), Cut.all(), Cut.none()):
        assert_exact(cut_keep(scores, cut, 0, out=torch.empty(5)), cut_mask(scores, cut, 0).float())


def test_radix_select_stream_and_edges() -> None:
    parts = [nonzero_randn(n, torch.float32).abs() for n in (700, 1, 4000)]
    everything = torch.cat(parts).double()
    total = everything.numel()
    for k in (0, 1, 2500, total - 1, total):
        rs = RadixSelect()
        for p in parts:
            rs.add_high(p)
        above = rs.select_bin(k)
        for p in reversed(parts):
            rs.add_low(p)
        value, greater, equal = rs.threshold()
        if k == 0:
            assert (value, greater, equal) == (math.inf, 0, 0)
            continue
        kth = everything.sort(descending=True).values[k - 1].item()
        assert value == kth
        assert greater == int((everything > kth).sum()) and equal == int((everything == kth).sum())
        assert above <= greater


def test_rejects_bad_k_and_call_order() -> None:
    x = torch.ones(10)
    with pytest.raises(ValueError, match=r"k must be in \[0, 10\]"):
        magnitude_cut(x, None, 11)
    with pytest.raises(ValueError, match=r"k must be in \[0, 10\]"):
        magnitude_cut(x, None, -1)
    rs = RadixSelect()
    with pytest.raises(RuntimeError, match="select_bin"):
        rs.add_low(x)
    with pytest.raises(ValueError, match="float32"):
        rs.add_high(x.half())


BIG = 8 * (1 << 16) + 4099  # above the sampled-bracket threshold, not a multiple of anything


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bracket_path_is_exact_and_taken(monkeypatch, dtype: torch.dtype) -> None:
    """Large random tensors take the torch backend's sampled-bracket path (radix select must not run)
    and still select exactly what the stable sort does, at several quantiles."""
    import cpift.kernels.select as sel

    class NoRadix:
        def __init__(self):
            raise AssertionError("radix fallback ran on an ordinary random tensor")

    monkeypatch.setattr(sel, "RadixSelect", NoRadix)
    x = nonzero_randn(BIG, dtype)
    base = nonzero_randn(BIG, dtype)
    _check(x, base, [BIG // 20, BIG // 3, BIG // 2, (9 * BIG) // 10], backend="torch")


def test_bracket_with_heavy_ties_and_adversarial_sample() -> None:
    """Ties everywhere (bracket bounds equal) and a periodic pattern the strided sample sees only one
    side of: the torch backend must fall back or resolve exactly."""
    values = torch.tensor([-1.0, -0.25, 0.25, 1.0, 2.0])
    x = values[torch.randint(0, 5, (BIG,))].to(torch.bfloat16)
    _check(x, None, [BIG // 3, BIG // 2 + 7, BIG - BIG // 9], backend="torch")
    stride = BIG // (1 << 16)
    periodic = torch.full((BIG,), 0.5)
    periodic[::stride] = 1.0  # every sampled entry is 1.0, almost no other entry is
    _check(periodic, None, [BIG // 4, BIG // 2], backend="torch")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("n", [1, 9, 5003])
def test_magnitude_cut_triton_equals_reference(n):
    """Radix select on the scoring kernels gives the same Cut as the sort oracle, ties included."""
    x = (torch.randint(-6, 7, (n,)) / 4).to(torch.bfloat16)
    base = (torch.randint(-2, 3, (n,)) / 8).to(torch.bfloat16)
    for k in sorted({0, 1, n // 3, n}):
        assert magnitude_cut(x, base, k, backend="triton") == magnitude_cut_ref(x, base, k)
