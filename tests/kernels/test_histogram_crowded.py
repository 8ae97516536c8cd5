"""The radix histograms on data that crowds them: real fine-tune deltas, bit for bit on every backend.

A fine-tune moves most bf16 weights by nothing or by 1–3 units in the last place, so most scores are
exactly 0 and the rest tie in a few bins; weights near zero have tiny ulps, so a few scores lie far
below the others. The Triton kernel pre-aggregates these per program (kernels/_scores_triton.py: bin 0,
a shared-memory window below the largest digit, lone atomics for the digits under it): its counts must equal
the torch oracle's (histogram_ref) and the fused CPU kernel's exactly, in both passes, and the
selections built on them (magnitude_cut, GlobalTopK, the TIES trim mask) must be the same on every
backend. Its `stats` show the pre-aggregation happens: few global atomics per score on such data.
"""

from __future__ import annotations

import pytest
import torch
from _compare import assert_exact

from cpift.kernels import scores
from cpift.kernels.backend import HAS_NUMBA, HAS_TRITON
from cpift.kernels.masks import pack_cut
from cpift.kernels.select import magnitude_cut, magnitude_cut_ref
from cpift.kernels.topk import GlobalTopK

BACKENDS = ["torch"] + (["cpu"] if HAS_NUMBA else []) + (["triton"] if HAS_TRITON else [])
TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
PROGRAM = 1 << 14  # scores per Triton program under the interpreter (block 1)
SIZES = [1, 2047, PROGRAM + 1, 2 * PROGRAM + 77]
SIZE_IDS = ["n1", "n2047", "program+1", "2programs+77"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]
INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def fine_tune(n: int, dtype: torch.dtype, *, unchanged: float = 0.6, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(task, base): base ~ 0.02·randn (weights near 0 included), task = base moved by 0 (a fraction
    `unchanged`) or ±1..3 ulps, by adding to the magnitude bits, so every delta is exact and tied."""
    g = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)
    base = torch.where(base == 0, torch.tensor(1e-3, dtype=dtype), base)
    bits = base.view(INT[dtype]).to(torch.int64)
    magnitude = 0x7FFFFFFF if dtype == torch.float32 else 0x7FFF
    sign, mag = bits & ~magnitude, bits & magnitude  # sign stays sign-extended: the int16/int32 cast keeps it
    step = torch.randint(1, 4, (n,), generator=g) * torch.where(torch.rand(n, generator=g) < 0.5, -1, 1)
    step = torch.where(torch.rand(n, generator=g) < unchanged, 0, step)
    moved = (sign | (mag + step).clamp(min=1)).to(INT[dtype]).view(dtype)
    return moved, base


def _want(x: torch.Tensor, base: torch.Tensor, block: int, backend: str) -> torch.Tensor:
    """Oracle scores: torch's (block 1 scores are bit-identical on every backend; block means are sums in
    another order, so each backend's histogram is checked against its own scores)."""
    return scores.score_deltas(x, base, block=block, backend="torch" if block == 1 else backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [1, 3], ids=["entries", "blocks3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", SIZES, ids=SIZE_IDS)
def test_crowded_histograms_bit_identical(n, dtype, block, backend):
    x, base = fine_tune(n, dtype)
    s = _want(x, base, block, backend)
    high = torch.zeros(scores.BINS, dtype=torch.int64)
    scores.score_histogram(x, base, block=block, hist=high, backend=backend)
    assert_exact(high, scores.histogram_ref(s))
    nonzero = s[s > 0].view(torch.int32) >> 16
    bins = {0}
    if nonzero.numel():
        busy = torch.bincount(nonzero)
        bins |= {int(busy.argmax()), int(nonzero[-1])}  # the most crowded bin and one picked at random
    for b in sorted(bins):
        low = torch.zeros(scores.BINS, dtype=torch.int64)
        scores.score_histogram(x, base, block=block, hist=low, high_bin=b, backend=backend)
        assert_exact(low, scores.histogram_ref(s, b))
        assert int(low.sum()) == int(high[b])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_scores_are_counted_in_their_bins(backend):
    """NaN and Inf scores top every program's digits (the window then ends at them): still exact."""
    x, base = fine_tune(PROGRAM + 3, torch.bfloat16, seed=2)
    x[[5, 700, PROGRAM + 1]] = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=x.dtype)
    s = scores.score_deltas(x, base, backend="torch")
    high = torch.zeros(scores.BINS, dtype=torch.int64)
    scores.score_histogram(x, base, hist=high, backend=backend)
    assert_exact(high, scores.histogram_ref(s))
    for b in (int(s[5].view(torch.int32)) >> 16, int(s[700].view(torch.int32)) >> 16, 0):
        low = torch.zeros(scores.BINS, dtype=torch.int64)
        scores.score_histogram(x, base, hist=low, high_bin=b, backend=backend)
        assert_exact(low, scores.histogram_ref(s, b))


@TRITON
@pytest.mark.parametrize("high_bin", [None, "busiest"])
def test_triton_preaggregates_crowded_bins(high_bin):
    """Global atomics issued (kernel stats) on real-looking deltas: a small fraction of the scores, and
    the counts exact; all scores in one bin: one atomic per program; widely spread scores: the lone
    atomics path, still exact."""
    from cpift.kernels._scores_triton import score_triton

    n = 3 * PROGRAM + 5
    x, base = fine_tune(n, torch.bfloat16)
    s = scores.score_deltas(x, base, backend="torch")
    if high_bin == "busiest":
        high_bin = int(torch.bincount(s[s > 0].view(torch.int32) >> 16).argmax())
    cases = {"fine-tune": (x, base, n // 40),
             "one bin": (torch.full((n,), 0.75, dtype=torch.bfloat16), torch.full((n,), 0.5, dtype=torch.bfloat16), 4),
             "spread": ((8 * torch.randn(n, dtype=torch.float64)).exp().float(), None, n)}  # ±50 binades
    for name, (xc, bc, most) in cases.items():
        sc = scores.score_deltas(xc, bc, backend="torch")
        hb = high_bin if name == "fine-tune" or high_bin is None else int(sc[0].view(torch.int32)) >> 16
        hist = torch.zeros(scores.BINS, dtype=torch.int64)
        stats = torch.zeros(2, dtype=torch.int64)
        score_triton(xc, bc, 1, out=None, hist=hist, high_bin=hb, stats=stats)
        assert_exact(hist, scores.histogram_ref(sc, hb))
        atomics = int(stats.sum())
        assert 0 < atomics <= most, (name, stats.tolist())
        if name == "one bin":
            assert stats.tolist() == [4, 0]  # 4 programs, one atomic each
        if name == "spread" and hb is None:
            assert int(stats[1]) > 0  # outliers beyond the window took the per-score path


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_selection_identical_across_backends(dtype):
    """magnitude_cut (cuts inside the zeros, inside a tie, at the top) and its TIES trim mask are the
    same on every backend and equal the sort-based reference."""
    n = 2 * PROGRAM + 77
    x, base = fine_tune(n, dtype, seed=1)
    nonzero = int((x != base).sum())
    for k in (1, nonzero // 3, nonzero, nonzero + 5, n - 1):
        want = magnitude_cut_ref(x, base, k)
        masks = []
        for backend in BACKENDS:
            cut = magnitude_cut(x, base, k, backend=backend)
            assert cut == want, (backend, k, cut, want)
            packed, _ = pack_cut(x, base, cut=cut, backend=backend)
            masks.append(packed)
        for m in masks[1:]:
            assert_exact(m, masks[0])


def test_global_top_k_identical_across_backends():
    """GlobalTopK over a stream of crowded tensors of awkward sizes: the same thresholds and packed
    masks on every backend, k entries selected per task."""
    stream = []
    for j, n in enumerate((2047, PROGRAM + 1, 5)):
        pairs = [fine_tune(n, torch.bfloat16, seed=10 * j + t) for t in range(2)]
        stream.append((pairs[0][1], [pairs[0][0], (pairs[1][0].float() - pairs[1][1].float()
                                                   + pairs[0][1].float()).to(torch.bfloat16)]))
    results = []
    for backend in BACKENDS:
        top = GlobalTopK(2, backend=backend)
        for b, xs in stream:
            top.count(b, xs)
        nonzero = top.totals[0] - int(sum((xs[0] == b).sum() for b, xs in stream))
        ks = [nonzero // 2, top.totals[1] - 3]
        top.fix(ks)
        for b, xs in stream:
            top.refine(b, xs)
        top.finish_refine()
        packs = [top.pack(b, xs) for b, xs in stream]
        for i, k in enumerate(ks):
            assert sum(p[i][1] for p in packs) == k
        results.append([(t.value, t.above, t.equal) for t in top.thresholds]
                       + [p[i][0] for p in packs for i in range(2)])
    for r in results[1:]:
        assert r[:2] == results[0][:2]
        for a, b in zip(r[2:], results[0][2:]):
            assert_exact(a, b)
