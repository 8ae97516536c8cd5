"""kernels/ram.py (RAM and RAM+ tensor-local) on every backend against a float64 oracle, and bit for bit
against mergekit 0.1.5's float32 expression (written out here), on awkward lengths and several dtypes."""

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

from cpift.kernels.backend import HAS_NUMBA, HAS_TRITON
from cpift.kernels.ram import RAM_EPS, ram_blend, ram_counts, ram_ref, ramplus_scales

CASES = backend_cases()
IDS = [f"{b}-{i}" for b, _, i in CASES]


def family(n: int, dtype: torch.dtype, models: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and fine-tunes that each leave about half the entries exactly as they were."""
    base = nonzero_randn(n, dtype)
    xs = []
    for _ in range(models):
        moved = base.double() + 0.05 * torch.randn(n, dtype=torch.float64)
        xs.append(torch.where(torch.rand(n) < 0.5, base, moved.to(dtype)))
    return base, xs


def mergekit_float32(base: torch.Tensor, xs: list[torch.Tensor], lam: list[float], dtype: torch.dtype) -> torch.Tensor:
    """mergekit's RAM/RAM+ arithmetic on float32 tensors, in its order, then the storage cast."""
    b = base.float()
    d = torch.stack([x.float() - b for x in xs])
    nz = d.abs() > RAM_EPS
    c = nz.sum(dim=0, keepdim=True)
    dz = d * nz
    lam_t = torch.tensor(lam, dtype=torch.float32)[:, None]
    merged = (dz * (c == 1) * lam_t + dz * (c > 1) / c.clamp(min=1)).sum(dim=0)
    return (b + merged).to(dtype)


def counts64(base: torch.Tensor, xs: list[torch.Tensor]) -> tuple[list[int], list[int]]:
    d = torch.stack([x.double() - base.double() for x in xs])
    nz = d.abs() > RAM_EPS
    c = nz.sum(dim=0)
    return [int(v) for v in (nz & (c > 1)).sum(dim=1)], [int(v) for v in (nz & (c == 1)).sum(dim=1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend,n", [(b, n) for b, n, _ in CASES], ids=IDS)
def test_ram_matches_the_oracle_and_mergekits_float32_bits(backend: str, n: int, dtype: torch.dtype) -> None:
    base, xs = family(n, dtype)
    before = [t.clone() for t in (base, *xs)]
    got = ram_blend(base, xs, out=torch.empty(n, dtype=dtype), backend=backend)
    assert_exact(got, mergekit_float32(base, xs, [1.0] * 3, dtype))
    naive = mergekit_float32(base.to(dtype), [x.to(dtype) for x in xs], [1.0] * 3, dtype)
    assert_close_to_ref(got, ram_ref(base, xs), naive)
    for t, b in zip((base, *xs), before):
        assert_exact(t, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend,n", [(b, n) for b, n, _ in CASES if n], ids=[i for i, c in zip(IDS, CASES) if c[1]])
def test_ramplus_counts_scales_and_blend(backend: str, n: int, dtype: torch.dtype) -> None:
    base, xs = family(n, dtype)
    shared, alone = ram_counts(base, xs, backend=backend)
    assert (shared, alone) == counts64(base, xs)
    lam = ramplus_scales(shared, alone, 0.5, 0.4)
    got = ram_blend(base, xs, scales=lam, out=torch.empty(n, dtype=dtype), backend=backend)
    assert_exact(got, mergekit_float32(base, xs, lam, dtype))
    ref = ram_ref(base, xs, r=0.5, alpha=0.4)
    assert_close_to_ref(got, ref, mergekit_float32(base, xs, lam, dtype))
    if n > 100:  # entries moved by one model, by several and by none all occur
        c = sum((x != base).to(torch.int64) for x in xs)
        assert {0, 1, 2} <= set(c.unique().tolist())


def test_ramplus_scales_follow_mergekits_float32_formula() -> None:
    # ρ = S / max(U, ε): a model that moves nothing alone gets the capped ratio, one that moves nothing gets 1.
    capped = float(torch.tensor(1 + 0.1 * 0.2, dtype=torch.float32))
    assert ramplus_scales([10, 0, 7], [5, 0, 0], 0.1, 0.2) == [capped, 1.0, capped]
    assert ramplus_scales([1], [10], 0.1, 0.2) == [float(1 + torch.tensor(0.1, dtype=torch.float32) * 0.1)]


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_a_nonfinite_delta_reaches_the_output(backend: str) -> None:
    if (backend == "cpu" and not HAS_NUMBA) or (backend == "triton" and not HAS_TRITON):
        pytest.skip(f"{backend} is not available")
    base, xs = family(1023, torch.float32)
    xs[1][7] = float("nan")
    xs[2][9] = float("inf")
    got = ram_blend(base, xs, out=torch.empty(1023), backend=backend)
    assert torch.isnan(got[7]) and not torch.isfinite(got[9])
