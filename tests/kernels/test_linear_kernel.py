"""kernels/linear.py against its float64 oracle."""

from __future__ import annotations

import pytest
import torch
from _compare import (
    DTYPE_IDS,
    DTYPES,
    LENGTH_IDS,
    LENGTHS,
    SMALL_LENGTH_IDS,
    SMALL_LENGTHS,
    assert_close_to_ref,
    assert_exact,
    nonzero_randn,
)

from cpift.kernels.backend import HAS_TRITON
from cpift.kernels.linear import linear, linear_ref


def _naive(xs, ws, dtype):
    return (sum(w * x.float() for w, x in zip(ws, xs)) / sum(ws)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", LENGTHS, ids=LENGTH_IDS)
def test_linear_matches_reference(n: int, dtype: torch.dtype) -> None:
    xs = [nonzero_randn(n, dtype) for _ in range(3)]
    before = [x.clone() for x in xs]
    ws = [0.2, 0.5, 0.35]
    got = linear(xs, ws, out=torch.empty(n, dtype=dtype))
    assert_close_to_ref(got, linear_ref(xs, ws), _naive(xs, ws, dtype))
    for x, x0 in zip(xs, before):
        assert_exact(x, x0)


def test_single_model_and_mixed_dtypes() -> None:
    x = nonzero_randn(3000, torch.bfloat16)
    assert_exact(linear([x], [2.5], out=torch.empty_like(x)), x)
    xs = [nonzero_randn(3000, d) for d in (torch.bfloat16, torch.float16, torch.float32)]
    out = torch.empty(3000, dtype=torch.bfloat16)
    assert_close_to_ref(linear(xs, [1, 2, 3], out=out), linear_ref(xs, [1, 2, 3]),
                        _naive(xs, [1, 2, 3], torch.bfloat16))


def test_negative_weights_and_float64() -> None:
    xs = [nonzero_randn(1023, torch.float64) for _ in range(2)]
    got = linear(xs, [1.5, -0.5], out=torch.empty(1023, dtype=torch.float64))
    assert_close_to_ref(got, linear_ref(xs, [1.5, -0.5]), linear_ref(xs, [1.5, -0.5]), atol=1e-12)


def test_rejects_bad_weights() -> None:
    x = torch.ones(4)
    with pytest.raises(ValueError, match="at least one"):
        linear([], [], out=x)
    with pytest.raises(ValueError, match="2 tensors but 1 weights"):
        linear([x, x], [1.0], out=torch.empty(4))
    with pytest.raises(ValueError, match="non-zero sum"):
        linear([x, x], [1.0, -1.0], out=torch.empty(4))
    with pytest.raises(ValueError, match=r"xs\[1\]: expected 4 elements"):
        linear([x, torch.ones(5)], [1.0, 1.0], out=torch.empty(4))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", SMALL_LENGTHS[:4], ids=SMALL_LENGTH_IDS[:4])
def test_linear_triton_matches_reference(n, dtype):
    xs = [nonzero_randn(n, dtype) for _ in range(3)]
    w = [0.7, 1.9, 0.4]
    got = linear(xs, w, out=torch.empty(n, dtype=dtype), backend="triton")
    assert_close_to_ref(got, linear_ref(xs, w), _naive(xs, w, dtype))
