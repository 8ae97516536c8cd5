"""kernels/select.py on the cpu backend: magnitude_cut by fused radix select (kernels/_scores_cpu.py's
histograms) and the fused tie search (kernels/_select_cpu.py), Cut for Cut equal to the sort oracle and
the torch backend, across thread counts; GlobalTopK routes through these paths."""

from __future__ import annotations

import pytest
import torch
from _compare import DTYPE_IDS, DTYPES, assert_exact, nonzero_randn
from _selection_cases import BLOCK, HAS_NUMBA, LENGTH_IDS, LENGTHS, NEEDS_NUMBA, quantized, threads

from cpift.kernels.select import magnitude_cut, magnitude_cut_ref, tie_index
from cpift.kernels.topk import GlobalTopK

pytestmark = pytest.mark.skipif(not HAS_NUMBA, reason=NEEDS_NUMBA)


def _ks(n: int) -> list[int]:
    return sorted(k for k in {0, 1, n // 3, n // 2, n - 1, n} if 0 <= k <= n)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "many-ties"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", LENGTHS, ids=LENGTH_IDS)
def test_magnitude_cut_equals_oracle_and_torch(n, dtype, ties):
    if ties:
        x, base = quantized(n, dtype, 1 / 64), quantized(n, dtype, 1 / 128)
    else:
        x, base = nonzero_randn(n, dtype), nonzero_randn(n, dtype)
    before = (x.clone(), base.clone())
    for k in _ks(n):
        got = magnitude_cut(x, base, k, backend="cpu")
        assert got == magnitude_cut(x, base, k, backend="torch"), f"k={k}"
        if n < 1 << 20 or k == n // 3:  # the sort oracle: one k on the largest size (it sorts per call)
            assert got == magnitude_cut_ref(x, base, k), f"k={k}"
    if n:
        assert magnitude_cut(x, None, n // 7, backend="cpu") == magnitude_cut_ref(x, None, n // 7)
    assert_exact(x, before[0])
    assert_exact(base, before[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tie_index_equals_torch(dtype):
    n = 3 * (1 << 16) + 5
    x, base = quantized(n, dtype, 1 / 64), quantized(n, dtype, 1 / 128)
    scores = (x.float() - base.float()).abs()
    value = float(scores[n // 2])
    count = int((scores == value).sum())
    for r in sorted({0, 1, 2, count // 2, count - 1, count}):
        assert tie_index(x, base, value, r, backend="cpu") == tie_index(x, base, value, r, backend="torch")
    with pytest.raises(ValueError, match="only"):
        tie_index(x, base, value, count + 1, backend="cpu")


def test_same_cut_for_any_thread_count():
    x, base = quantized(1823 * 781, torch.bfloat16, 1 / 64), quantized(1823 * 781, torch.bfloat16, 1 / 128)
    cuts = []
    for t in (1, 2):
        with threads(t):
            cuts.append([magnitude_cut(x, base, k, backend="cpu") for k in (1000, x.numel() // 3)])
    assert cuts[0] == cuts[1]


def _top(stream, backend, block):
    top = GlobalTopK(tasks=2, backend=backend)
    for base, xs in stream:
        top.count(base, xs, block)
    top.fix([d * 37 // 100 for d in top.totals])
    for base, xs in stream:
        top.refine(base, xs, block)
    top.finish_refine()
    return top.thresholds, [top.pack(base, xs, block) for base, xs in stream]


@pytest.mark.parametrize("block", [1, 4], ids=["element", "block4"])
def test_global_top_k_routes_through_fused_kernels(monkeypatch, block):
    """With backend "cpu" no torch chunk path runs (they are made to fail), and the masks, counts and
    thresholds equal the torch backend's bit for bit."""
    import cpift.kernels.masks as masks
    import cpift.kernels.scores as scores
    import cpift.kernels.select as select

    stream = []
    for n in [5, (1 << 16) + 1, 777]:
        base = quantized(n, torch.bfloat16, 1 / 16)
        stream.append((base, [(base.double() + torch.randint(-3, 4, (n,)) / 8).to(torch.bfloat16)
                              for _ in range(2)]))
    want = _top(stream, "torch", block)
    for mod, name in [(scores, "_chunk_scores"), (masks, "_pack_into"), (masks, "_popcount"),
                      (select, "magnitude_scores")]:
        monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail("a torch chunk path ran"))
    got = _top(stream, "cpu", block)
    assert got[0] == want[0]
    for g, w in zip(got[1], want[1]):
        for (gp, gc), (wp, wc) in zip(g, w):
            assert gc == wc
            assert_exact(gp, wp)
    assert sum(per[0][1] for per in got[1]) == want[0][0].k  # task 0's counts add up to its k


@pytest.mark.parametrize("kind", ["distinct", "many-ties", "few-values"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_one_pass_bracket_select_equals_radix_select(monkeypatch, dtype, kind):
    """The cpu backend's one-pass selection (a sampled bracket, the candidates kept in a buffer) gives the
    Cut of radix select and of the sort, ties and all; it is taken where the bracket holds the k-th largest."""
    import cpift.kernels._select_cpu as select_cpu
    import cpift.kernels.select as select

    n = 8 * BLOCK + 3  # the smallest tensor the sample brackets
    if kind == "distinct":
        x, base = nonzero_randn(n, dtype), nonzero_randn(n, dtype)
    else:
        step = 1 / 64 if kind == "many-ties" else 1 / 2
        x, base = quantized(n, dtype, step), quantized(n, dtype, step / 2)
    taken = []
    one_pass = select_cpu.bracket_select_cpu
    monkeypatch.setattr(select_cpu, "bracket_select_cpu",
                        lambda *a, **kw: taken.append(one_pass(*a, **kw)) or taken[-1])
    ks = [1, n // 100, n // 3, n // 2, n - n // 50, n - 1]
    got = [magnitude_cut(x, base, k, backend="cpu") for k in ks]
    assert any(t is not None for t in taken), "the one-pass path never ran"
    monkeypatch.setattr(select, "BRACKET_BUDGET", 0)  # radix select only
    assert got == [magnitude_cut(x, base, k, backend="cpu") for k in ks]
    assert got[2] == magnitude_cut_ref(x, base, ks[2])


def test_bracket_select_reports_a_miss_and_an_overflow():
    from cpift.kernels._select_cpu import bracket_select_cpu

    n = 8 * BLOCK + 3
    x, base = nonzero_randn(n, torch.float32), nonzero_randn(n, torch.float32)
    scores = (x - base).abs()
    k = n // 3
    kth = float(scores.sort(descending=True).values[k - 1])
    assert bracket_select_cpu(x, base, k, kth * 2, kth * 3) is None  # the k-th largest lies below lo
    assert bracket_select_cpu(x, base, k, 0.0, kth / 2) is None  # ... above hi
    assert bracket_select_cpu(x, base, k, 0.0, float("inf")) is None  # every entry a candidate: slots overflow
    value, greater, equal, last = bracket_select_cpu(x, base, k, kth, kth)
    assert (value, greater, equal) == (kth, int((scores > kth).sum()), int((scores == kth).sum()))
    assert magnitude_cut(x, base, k, backend="cpu") == magnitude_cut_ref(x, base, k)


def _bands(n: int) -> list[tuple[int, int]]:
    """(lo, hi) pairs: breadcrumbs' usual shapes (a few percent at the top, most of the rest), the edges."""
    pairs = {(0, 0), (0, n), (n, n), (n // 3, n // 2), (n // 2 - n // 100, n - n // 100), (n // 100, n - 1),
             (1, n - n // 200), (n - n // 50, n - n // 100)}
    return sorted(p for p in pairs if 0 <= p[0] <= p[1] <= n)


@pytest.mark.parametrize("kind", ["distinct", "many-ties", "few-values"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [0, 1, 1000, 8 * BLOCK + 3, 20 * BLOCK + 11], ids=lambda n: f"n{n}")
def test_magnitude_band_equals_the_stable_sort(monkeypatch, n, dtype, kind):
    """A Band (breadcrumbs: ascending ranks lo .. hi − 1, lower index first among ties) is the stable sort's
    slice on cpu (the one-pass bracket, open-ended near the top, and radix select) and torch, bit for bit;
    band_mask applies it chunk by chunk."""
    import cpift.kernels.band as band
    import cpift.kernels.select as select

    if kind == "distinct":
        x, base = nonzero_randn(n, dtype), nonzero_randn(n, dtype)
    else:
        step = 1 / 64 if kind == "many-ties" else 1 / 2
        x, base = quantized(n, dtype, step), quantized(n, dtype, step / 2)
    before = (x.clone(), base.clone())
    scores = select.magnitude_scores(x, base, 0, n).clone() if n else torch.zeros(0)
    for lo, hi in _bands(n):
        want = band.band_mask_ref(x, base, lo, hi)
        got = band.magnitude_band(x, base, lo, hi, backend="cpu")
        assert torch.equal(band.band_mask(scores, got, 0), want), (lo, hi)
        assert band.magnitude_band(x, base, lo, hi, backend="torch") == got, (lo, hi)
        half = n // 2
        assert torch.equal(torch.cat([band.band_mask(scores[:half], got, 0),
                                      band.band_mask(scores[half:], got, half)]), want)
    monkeypatch.setattr(select, "BRACKET_BUDGET", 0)  # radix select and the tie pass only
    for lo, hi in _bands(n):
        assert torch.equal(band.band_mask(scores, band.magnitude_band(x, base, lo, hi, backend="cpu"), 0),
                           band.band_mask_ref(x, base, lo, hi)), (lo, hi)
    assert_exact(x, before[0])
    assert_exact(base, before[1])


def test_magnitude_band_rejects_bad_ranks():
    from cpift.kernels.band import magnitude_band

    x = nonzero_randn(10, torch.float32)
    for lo, hi in [(-1, 3), (4, 3), (2, 11)]:
        with pytest.raises(ValueError, match="magnitude_band"):
            magnitude_band(x, None, lo, hi)
