"""Counts and offsets past 2^31, and a histogram that survives real (zero-heavy, tied) data.

Tensors of 2^31 entries exist (a 128k-vocabulary embedding of 16k columns), and one launch can put 2^31
scores in one bin. Full-size inputs do not fit this test machine's time and memory, so each path is
tested at the boundary itself: the Triton unpack kernel with a byte count whose ×8 leaves int32 (Triton
passes such counts as int32), the histograms with counts already at 2^31 − 1 before the pass, the fused
CPU kernel's choice of per-worker count type at n = 2^31 − 1 and 2^31. The Triton histogram pre-aggregates
per program (zeros, crowded bins; tests/kernels/test_histogram_crowded.py): the counts must equal the
oracle's bit for bit on data that is mostly zeros and ties.
"""

from __future__ import annotations

import pytest
import torch
from _compare import assert_exact

from cpift.kernels import scores
from cpift.kernels.backend import HAS_NUMBA, HAS_TRITON

TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
NEAR = (1 << 31) - 1


def realistic(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 base and task: 70% of entries unchanged (zero scores), the rest a few quantized steps (ties)."""
    base = torch.randn(n, dtype=torch.float64).to(torch.bfloat16)
    step = torch.randint(1, 4, (n,), dtype=torch.float64) * 2.0 ** -9 * torch.where(torch.rand(n) < 0.5, -1, 1)
    step = torch.where(torch.rand(n) < 0.7, 0.0, step)
    return (base.double() + step).to(torch.bfloat16), base


@TRITON
def test_unpack_offsets_past_int32() -> None:
    from cpift.kernels._masks_triton import _unpack_kernel

    packed = torch.full((512,), 0xA5, dtype=torch.uint8)
    out = torch.zeros(4096, dtype=torch.uint8)
    # m = 2^28 + 1 bytes: m·8 = 2^31 + 8 wraps negative in int32, which masked every store.
    _unpack_kernel[(1,)](packed, out, (1 << 28) + 1, BYTES=512)
    want = torch.tensor([(0xA5 >> j) & 1 for j in range(8)], dtype=torch.uint8).repeat(512)
    assert_exact(out, want)


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if HAS_NUMBA else []) + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("block", [1, 5], ids=["entries", "blocks"])
def test_histograms_exact_on_zeros_and_ties_past_int32(backend: str, block: int) -> None:
    n = 40_000 + 3
    x, base = realistic(n)
    s = scores.score_deltas(x, base, block=block, backend="torch")
    assert int((s == 0).sum()) > n // (8 * block)  # the case is zero-heavy
    high = torch.zeros(scores.BINS, dtype=torch.int64)
    high[0] = NEAR  # bin 0 (the zeros' bin) already at 2^31 − 1
    scores.score_histogram(x, base, block=block, hist=high, backend=backend)
    want = scores.histogram_ref(s)
    want[0] += NEAR
    assert_exact(high, want)
    # Pass 2 inside bin 0, where the zeros are, and inside a busy non-zero bin.
    busy = int(torch.bincount(s[s > 0].view(torch.int32) >> 16).argmax())
    for b in (0, busy):
        low = torch.zeros(scores.BINS, dtype=torch.int64)
        low[0] = NEAR
        scores.score_histogram(x, base, block=block, hist=low, high_bin=b, backend=backend)
        want = scores.histogram_ref(s, high_bin=b)
        want[0] += NEAR
        assert_exact(low, want)


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
def test_cpu_worker_counts_widen_at_2_31() -> None:
    import numpy as np

    from cpift.kernels._scores_cpu import _fold, _worker_hists

    assert _worker_hists(2, NEAR).dtype == np.int32  # one worker cannot reach 2^31 counts
    assert _worker_hists(2, NEAR + 1).dtype == np.int64
    hists = np.zeros((2, scores.BINS), dtype=np.int32)
    hists[:, 3] = NEAR
    hist = torch.zeros(scores.BINS, dtype=torch.int64)
    _fold(hists, 2, hist.numpy())
    assert int(hist[3]) == 2 * NEAR  # folded into int64 without wrapping
