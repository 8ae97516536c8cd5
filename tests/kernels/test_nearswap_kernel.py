"""kernels/nearswap.py on every backend (torch, the fused CPU kernel, Triton under TRITON_INTERPRET=1)
against a float64 oracle written here, and bit for bit against mergekit 0.1.5's float32 expression."""

from __future__ import annotations

import pytest
import torch
from _compare import (
    DTYPE_IDS,
    DTYPES,
    assert_close_to_ref,
    assert_exact,
    backend_cases,
    nonzero_randn,
)
from oracles import nearswap64

from cpift.kernels.backend import HAS_NUMBA, HAS_TRITON
from cpift.kernels.finite import all_finite
from cpift.kernels.nearswap import nearswap

T = 0.004
CASES = backend_cases()


def mergekit_expr(a: torch.Tensor, b: torch.Tensor, t: float, dtype: torch.dtype) -> torch.Tensor:
    """mergekit's nearswap_merge as it runs on float32 tensors (its lines, verbatim), then the storage cast."""
    a, b = a.float(), b.float()
    absdiff = torch.abs(a - b)
    weight = (t / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
    return (weight * b + (1 - weight) * a).to(dtype)


def pair(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    a = nonzero_randn(n, dtype)
    # |a − b| spread around t: some entries swap (w = 1), the rest move by t
    b = (a.double() + 0.01 * torch.randn(n, dtype=torch.float64)).to(dtype)
    return a, b


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend,n", [(b, n) for b, n, _ in CASES], ids=[f"{b}-{i}" for b, _, i in CASES])
def test_matches_the_oracle_and_mergekits_float32_bits(backend: str, n: int, dtype: torch.dtype) -> None:
    a, b = pair(n, dtype)
    before = (a.clone(), b.clone())
    got = nearswap(a, b, T, out=torch.empty(n, dtype=dtype), backend=backend)
    assert_exact(got, mergekit_expr(a, b, T, dtype))
    w = torch.clamp(T / torch.clamp((a - b).abs(), min=1e-6), 0.0, 1.0)  # plain torch in the storage dtype
    assert_close_to_ref(got, nearswap64(a, b, T), (w * b + (1 - w) * a).to(dtype))
    assert_exact(a, before[0])
    assert_exact(b, before[1])
    if n > 100:  # both regimes are exercised
        d = (a.double() - b.double()).abs()
        assert bool((d < T).any()) and bool((d > T).any())


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_t_zero_gives_the_base_and_large_t_the_other_model(backend: str) -> None:
    if (backend == "cpu" and not HAS_NUMBA) or (backend == "triton" and not HAS_TRITON):
        pytest.skip(f"{backend} is not available")
    a, b = pair(3001, torch.bfloat16)
    assert_exact(nearswap(a, b, 0.0, out=torch.empty_like(a), backend=backend), a)
    assert_exact(nearswap(a, b, 1e3, out=torch.empty_like(a), backend=backend), b)
    # equal entries: |a − b| = 0 is floored at 1e-6, w = 1, the (equal) value is kept
    assert_exact(nearswap(a, a, T, out=torch.empty_like(a), backend=backend), a)


def test_float64_and_mixed_dtypes() -> None:
    a, b = pair(2049, torch.float64)
    got = nearswap(a, b, T, out=torch.empty(2049, dtype=torch.float64), backend="cpu" if HAS_NUMBA else "torch")
    assert torch.allclose(got, nearswap64(a, b, T), rtol=0, atol=1e-15)
    a16, b32 = a.to(torch.float16), b.float()
    for be in ["torch"] + (["cpu"] if HAS_NUMBA else []):
        out = nearswap(a16, b32, T, out=torch.empty(2049, dtype=torch.bfloat16), backend=be)
        assert_exact(out, mergekit_expr(a16, b32, T, torch.bfloat16))


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
def test_cpu_records_finiteness() -> None:
    a = torch.full((70000,), 60000.0, dtype=torch.float16)
    b = torch.full((70000,), -60000.0, dtype=torch.float16)
    out = nearswap(a, b, 1e6, out=torch.empty_like(a), backend="cpu")
    assert all_finite(out)
    a[5] = float("inf")
    out = nearswap(a, b, 1.0, out=torch.empty_like(a), backend="cpu")
    assert not all_finite(out)


@pytest.mark.parametrize("t", [-1e-3, float("nan"), float("inf")])
def test_bad_t_is_refused(t: float) -> None:
    a, b = pair(10, torch.float32)
    with pytest.raises(ValueError, match="t must be a finite number ≥ 0"):
        nearswap(a, b, t, out=torch.empty(10), backend="torch")
    with pytest.raises(ValueError, match="expected 10 elements"):
        nearswap(a, b[:9], 0.1, out=torch.empty(10), backend="torch")
