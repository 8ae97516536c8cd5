"""kernels/scores.py: delta scores and their radix histograms, torch and Triton (interpreter), against
float64 / Python-integer oracles."""

from __future__ import annotations

import pytest
import torch
from _compare import DTYPE_IDS, DTYPES, assert_close_to_ref, assert_exact, nonzero_randn

from cpift.kernels.backend import HAS_TRITON
from cpift.kernels.scores import BINS, histogram_ref, score_count, score_deltas, score_deltas_ref, score_histogram

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
SIZES = [0, 1, 2047, 5001]
SIZE_IDS = ["n0", "n1", "n2047", "n5001"]
BLOCKS = [1, 7, 64, 300]


def _naive(x: torch.Tensor, base: torch.Tensor | None, block: int) -> torch.Tensor:
    """Plain torch in the storage dtype, then mean per block in float32: the comparison baseline."""
    d = (x if base is None else x - base).abs().float()
    return torch.stack([c.mean() for c in d.split(block)]) if d.numel() else d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=DTYPE_IDS + ["fp64"])
@pytest.mark.parametrize("n", SIZES, ids=SIZE_IDS)
def test_scores_match_float64_reference(n, dtype, block, backend):
    x = nonzero_randn(n, dtype)
    base = (x.double() + 0.05 * nonzero_randn(n, torch.float64)).to(dtype)
    got = score_deltas(x, base, block=block, backend=backend)
    assert got.dtype == torch.float32 and got.numel() == score_count(n, block)
    ref = score_deltas_ref(x, base, block=block)
    if block == 1:  # one rounding of an exact difference: the float64 value rounded once
        assert_exact(got, ref.float())
    else:
        assert_close_to_ref(got, ref, _naive(x, base, block), atol=1e-9)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=DTYPE_IDS + ["fp64"])
def test_element_scores_bit_identical_across_backends(dtype):
    x, base = nonzero_randn(40_001, dtype), nonzero_randn(40_001, dtype)
    assert_exact(score_deltas(x, base, backend="triton"), score_deltas(x, base, backend="torch"))
    assert_exact(score_deltas(x, None, backend="triton"), score_deltas(x, None, backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [1, 5])
def test_histograms_match_integer_oracle(backend, block):
    # Quantized values: many scores share a high bin, so the low pass has real work.
    n = 3001
    x = (torch.randint(-40, 40, (n,)) / 16).to(torch.bfloat16)
    base = (torch.randint(-40, 40, (n,)) / 32).to(torch.bfloat16)
    high = torch.zeros(BINS, dtype=torch.int64)
    scores = score_deltas(x, base, block=block, hist=high, backend=backend)
    assert_exact(high, histogram_ref(scores))
    again = torch.zeros(BINS, dtype=torch.int64)
    score_histogram(x, base, block=block, hist=again, backend=backend)
    score_histogram(x, base, block=block, hist=again, backend=backend)
    assert_exact(again, 2 * high)  # accumulates across calls
    for high_bin in {int(b) >> 16 for b in scores.view(torch.int32)[:5].tolist()}:
        low = torch.zeros(BINS, dtype=torch.int64)
        score_histogram(x, base, block=block, hist=low, high_bin=high_bin, backend=backend)
        assert_exact(low, histogram_ref(scores, high_bin))
        assert int(low.sum()) == int(high[high_bin])


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_none_scores_magnitudes(backend):
    x = nonzero_randn(999, torch.float16)
    assert_exact(score_deltas(x, None, backend=backend), x.float().abs())


def test_bad_arguments():
    x = torch.ones(4)
    with pytest.raises(ValueError, match="block"):
        score_deltas(x, None, block=0)
    with pytest.raises(ValueError, match="hist"):
        score_deltas(x, None, hist=torch.zeros(10, dtype=torch.int64))
    with pytest.raises(ValueError, match="base"):
        score_deltas(x, torch.ones(5))
    with pytest.raises(ValueError, match="out"):
        score_deltas(x, None, block=3, out=torch.empty(3))
