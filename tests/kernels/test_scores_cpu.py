"""kernels/_scores_cpu.py: the fused CPU scoring + histogram kernel against the float64 oracle and the
torch backend (element scores and histograms bit for bit, block means within their documented bound),
across thread counts, and the dispatch that picks it."""

from __future__ import annotations

import pytest
import torch
from _compare import DTYPE_IDS, DTYPES, assert_close_to_ref, assert_exact, nonzero_randn
from _selection_cases import BLOCK, HAS_NUMBA, LENGTH_IDS, LENGTHS, NEEDS_NUMBA, quantized, threads

from cpift.kernels.backend import resolve
from cpift.kernels.scores import BINS, score_count, score_deltas, score_deltas_ref, score_histogram

pytestmark = pytest.mark.skipif(not HAS_NUMBA, reason=NEEDS_NUMBA)
BLOCKS = [1, 7, 896]


def _inputs(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = nonzero_randn(n, dtype)
    return x, (x.double() + 0.05 * nonzero_randn(n, torch.float64)).to(dtype)


def _naive_means(d: torch.Tensor, block: int) -> torch.Tensor:
    """Plain float32 torch means per block (the last one shorter): the comparison baseline."""
    full = d.numel() // block
    means = [d[: full * block].view(full, block).mean(1)]
    if d.numel() % block:
        means.append(d[full * block:].mean().reshape(1))
    return torch.cat(means)


def _high_ref(scores: torch.Tensor) -> torch.Tensor:
    """Oracle high-pass histogram of float32 scores: bincount of their bits >> 16 (scores ≥ 0)."""
    return torch.bincount(scores.view(torch.int32) >> 16, minlength=BINS)


def _low_ref(scores: torch.Tensor, high_bin: int) -> torch.Tensor:
    bits = scores.view(torch.int32)
    return torch.bincount(bits[(bits >> 16) == high_bin] & 0xFFFF, minlength=BINS)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{b}" for b in BLOCKS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", LENGTHS, ids=LENGTH_IDS)
def test_scores_match_oracle_and_torch(n, dtype, block):
    x, base = _inputs(n, dtype)
    before = (x.clone(), base.clone())
    hist = torch.zeros(BINS, dtype=torch.int64)
    got = score_deltas(x, base, block=block, hist=hist, backend="cpu")
    want = score_deltas(x, base, block=block, backend="torch")
    ref = score_deltas_ref(x, base, block=block)
    assert got.dtype == torch.float32 and got.numel() == score_count(n, block)
    if block == 1:
        assert_exact(got, ref.float())  # one rounding of an exact difference
        assert_exact(got, want)
    else:
        naive = _naive_means((x - base).abs().float(), block)
        assert_close_to_ref(got, ref, naive, atol=1e-9)
        # Documented bound (kernels/_scores_cpu.py): within 2^-22 relative of the exact mean.
        assert bool(((got.double() - ref).abs() <= 2.0 ** -22 * ref).all())
        assert bool(((got.double() - want.double()).abs() <= 2.0 ** -21 * ref).all())  # torch: float32 sums
    assert_exact(hist, _high_ref(got))
    assert_exact(x, before[0])
    assert_exact(base, before[1])


@pytest.mark.parametrize("block", [1, 5], ids=["block1", "block5"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", LENGTHS, ids=LENGTH_IDS)
def test_histograms_equal_torch_backend(n, dtype, block):
    # Quantized inputs: many scores share a high bin, so the low pass has real work.
    x, base = quantized(n, dtype, 1 / 64), quantized(n, dtype, 1 / 128)
    scores = score_deltas(x, base, block=block, backend="torch")
    for high_bin in [None] + sorted(set((scores.view(torch.int32) >> 16).tolist()))[:3]:
        got = torch.full((BINS,), 3, dtype=torch.int64)  # accumulates: starts non-zero
        want = got.clone()
        score_histogram(x, base, block=block, hist=got, high_bin=high_bin, backend="cpu")
        score_histogram(x, base, block=block, hist=want, high_bin=high_bin, backend="torch")
        assert_exact(got, want)
        oracle = _high_ref(scores) if high_bin is None else _low_ref(scores, high_bin)
        assert_exact(got - 3, oracle)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_without_base_and_mixed_dtypes(dtype):
    x = nonzero_randn(3 * (1 << 16) + 5, dtype)
    assert_exact(score_deltas(x, None, backend="cpu"), score_deltas(x, None, backend="torch"))
    base32 = nonzero_randn(x.numel(), torch.float32)
    assert_exact(score_deltas(x, base32, backend="cpu"), score_deltas(x, base32, backend="torch"))


@pytest.mark.parametrize("block", [1, 300], ids=["block1", "block300"])
def test_same_bytes_for_any_thread_count(block):
    x, base = _inputs(1823 * 781, torch.bfloat16)
    results = []
    for t in (1, 2):
        with threads(t):
            hist = torch.zeros(BINS, dtype=torch.int64)
            low = torch.zeros(BINS, dtype=torch.int64)
            scores = score_deltas(x, base, block=block, hist=hist, backend="cpu")
            score_histogram(x, base, block=block, hist=low, high_bin=int(hist.nonzero()[0]), backend="cpu")
            import numba

            assert numba.get_num_threads() == t
            results.append((scores, hist, low))
    for a, b in zip(*results):
        assert_exact(a, b)


def test_dispatch(monkeypatch):
    import cpift.kernels._scores_cpu as fused

    x, base = _inputs(1000, torch.bfloat16)
    assert resolve(None, x, base) == "cpu"
    calls = []
    real = fused.score_cpu
    monkeypatch.setattr(fused, "score_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    auto = score_deltas(x, base)
    score_histogram(x, base, hist=torch.zeros(BINS, dtype=torch.int64))
    assert len(calls) == 2
    # "torch" runs the reference; float64 inputs keep it under "cpu" too.
    monkeypatch.setattr(fused, "score_cpu", lambda *a, **k: pytest.fail("fused kernel ran"))
    assert_exact(score_deltas(x, base, backend="torch"), auto)
    x64, b64 = x.double(), base.double()
    assert_exact(score_deltas(x64, b64, backend="cpu"), score_deltas_ref(x64, b64).float())


def test_more_torch_threads_than_cores():
    """--threads above the core count (torch accepts it): numba's pool is capped at its size, not an error."""
    import numba

    x, base = _inputs(3 * (1 << 16) + 5, torch.float32)
    with threads(numba.config.NUMBA_NUM_THREADS + 1):
        got = score_deltas(x, base, backend="cpu")
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    assert_exact(got, score_deltas(x, base, backend="torch"))


def test_first_kernel_keeps_torchs_thread_count():
    """Starting numba's OpenMP pool resets the thread count torch reads; the kernels put it back, so
    --threads 1 still holds after the first fused kernel (checked in a fresh process)."""
    import subprocess
    import sys

    code = ("import torch, numba\n"
            "torch.set_num_threads(1)\n"
            "from cpift.kernels.scores import score_deltas\n"
            "score_deltas(torch.ones(10), torch.zeros(10), backend='cpu')\n"
            "print(torch.get_num_threads(), numba.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1"]


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
                                    (torch.float16, torch.bfloat16), (torch.float32, torch.float32)],
                         ids=["bf16", "fp32-fp16", "fp16-bf16", "fp32"])
@pytest.mark.parametrize("n", [1, 1023, BLOCK + 17, 5 * BLOCK + 3], ids=lambda n: f"n{n}")
def test_count_unchanged_is_torchs_count_of_equal_entries(n, dtypes):
    """count_unchanged (cores' share of zero updates) counts x == base as torch does: mixed storage kinds,
    ±0 equal, NaN never equal, on the fused cpu kernel and the torch path."""
    from cpift.kernels.scores import count_unchanged

    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g).to(dtypes[1])
    x = torch.where(torch.rand(n, generator=g) < 0.3, base.to(dtypes[0]), torch.randn(n, generator=g).to(dtypes[0]))
    x[0] = -0.0
    base[0] = 0.0
    if n > 2:
        x[1] = base[1] = float("nan")
    want = int(torch.count_nonzero(x == base))
    assert want > 0
    assert count_unchanged(x, base, backend="cpu") == want
    assert count_unchanged(x, base, backend="torch") == want
