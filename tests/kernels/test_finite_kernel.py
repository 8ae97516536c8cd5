"""kernels/finite.py: exact NaN/Inf detection, including sums that overflow."""

from __future__ import annotations

import math

import pytest
import torch
from _compare import DTYPE_IDS, DTYPES, nonzero_randn

from cpift.kernels._scratch import CHUNK
from cpift.kernels.finite import all_finite, first_nonfinite

N = 2 * CHUNK + 9


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=DTYPE_IDS + ["fp64"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", [0, CHUNK - 1, CHUNK, N - 1], ids=["first", "chunk-1", "chunk", "last"])
def test_finds_the_first_nonfinite(dtype: torch.dtype, bad: float, where: int) -> None:
    x = nonzero_randn(N, dtype)
    assert all_finite(x) and first_nonfinite(x) is None
    x[where] = bad
    x[N - 1 if where != N - 1 else 0] = bad  # a later (or earlier) second one must not win
    expected = min(where, N - 1 if where != N - 1 else 0)
    assert not all_finite(x)
    assert first_nonfinite(x) == expected


def test_overflowing_sum_of_finite_values_is_still_finite() -> None:
    x = torch.full((CHUNK + 3,), 3.0e38, dtype=torch.float32)  # the float32 sum is +inf
    assert all_finite(x) and first_nonfinite(x) is None
    h = torch.full((1000,), 60000.0, dtype=torch.float16)
    assert all_finite(h)


def test_inf_minus_inf_and_edges() -> None:
    x = torch.zeros(10)
    x[2], x[7] = math.inf, -math.inf  # the chunk sum is NaN, not inf
    assert not all_finite(x) and first_nonfinite(x) == 2
    assert all_finite(torch.empty(0)) and first_nonfinite(torch.empty(0)) is None
    assert all_finite(torch.arange(10)) and first_nonfinite(torch.arange(10)) is None
