"""kernels/slerp.py against its float64 oracle, docs/cpi-ft.md#slerp's edge cases and mergekit's rules."""

from __future__ import annotations

import math

import pytest
import torch
from _compare import DTYPE_IDS, DTYPES, LENGTH_IDS, LENGTHS, assert_close_to_ref, assert_exact, nonzero_randn

from cpift.kernels._scratch import CHUNK
from cpift.kernels.slerp import slerp, slerp_blend, slerp_coefficients, slerp_reduce, slerp_ref


def _naive(a: torch.Tensor, b: torch.Tensor, t: float, dtype: torch.dtype) -> torch.Tensor:
    """Plain torch, whole tensors, float32: what a careful one-off script would do."""
    a32, b32 = a.float(), b.float()
    na, nb = a32.norm(), b32.norm()
    d = torch.dot(a32 / (na if na > 1e-8 else 1.0), b32 / (nb if nb > 1e-8 else 1.0)).clamp(-1, 1)
    if d.abs() > 0.9995:
        return ((1 - t) * a32 + t * b32).to(dtype)
    om = torch.acos(d)
    return (torch.sin((1 - t) * om) / torch.sin(om) * a32 + torch.sin(t * om) / torch.sin(om) * b32).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", LENGTHS, ids=LENGTH_IDS)
def test_slerp_matches_reference(n: int, dtype: torch.dtype) -> None:
    a = nonzero_randn(n, dtype)
    # Correlated with a, so Ω is neither ~π/2 nor ~0.
    b = (a.double() + nonzero_randn(n, torch.float64, scale=0.8)).to(dtype)
    a_before, b_before = a.clone(), b.clone()
    for t in (0.3, 0.75):
        got = slerp(a, b, t)
        assert got.dtype == dtype
        assert_close_to_ref(got, slerp_ref(a, b, t), _naive(a, b, t, dtype))
    assert_exact(a, a_before)
    assert_exact(b, b_before)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_t0_gives_a_and_t1_gives_b_exactly(dtype: torch.dtype) -> None:
    a, b = nonzero_randn(3000, dtype), nonzero_randn(3000, dtype)
    assert_exact(slerp(a, b, 0.0), a)
    assert_exact(slerp(a, b, 1.0), b)


def test_colinear_and_opposite_fall_back_to_lerp() -> None:
    a = nonzero_randn(CHUNK + 5, torch.float32)
    for b, name in ((2 * a, "colinear"), (-a, "opposite")):
        aa, bb, ab = slerp_reduce(a, b)
        assert slerp_coefficients(aa, bb, ab, 0.25) == (0.75, 0.25), name
        got = slerp(a, b, 0.25)
        assert_close_to_ref(got, slerp_ref(a, b, 0.25), ((0.75 * a) + 0.25 * b))
        assert_close_to_ref(got, 0.75 * a.double() + 0.25 * b.double(), (0.75 * a) + 0.25 * b)


def test_zero_norm_vector_is_left_unnormalised() -> None:
    a = torch.zeros(1023, dtype=torch.bfloat16)
    b = nonzero_randn(1023, torch.bfloat16)
    # d = 0 → Ω = π/2: result = sin(tπ/2)·b.
    ca, cb = slerp_coefficients(*slerp_reduce(a, b), 0.3)
    assert ca == pytest.approx(math.cos(0.3 * math.pi / 2), abs=1e-12)
    assert cb == pytest.approx(math.sin(0.3 * math.pi / 2), abs=1e-12)
    got = slerp(a, b, 0.3)
    assert_close_to_ref(got, slerp_ref(a, b, 0.3), _naive(a, b, 0.3, torch.bfloat16))
    tiny = torch.full((1023,), 1e-12, dtype=torch.float32)  # norm ≈ 3e-11 ≤ eps
    assert_close_to_ref(slerp(tiny, b.float(), 0.6), slerp_ref(tiny, b.float(), 0.6),
                        _naive(tiny, b.float(), 0.6, torch.float32))


def test_coefficients_follow_mergekit_rules() -> None:
    # Orthogonal unit vectors: Ω = π/2.
    ca, cb = slerp_coefficients(1.0, 1.0, 0.0, 0.5)
    assert ca == pytest.approx(math.sin(math.pi / 4)) and cb == pytest.approx(math.sin(math.pi / 4))
    # d exactly at the threshold is not "> threshold": spherical branch.
    ca, cb = slerp_coefficients(1.0, 1.0, 0.9995, 0.5)
    om = math.acos(0.9995)
    assert ca == pytest.approx(math.sin(0.5 * om) / math.sin(om))
    # A rounding overshoot beyond 1 is clamped, then takes the lerp branch.
    assert slerp_coefficients(1.0, 1.0, 1.0 + 1e-12, 0.2) == (0.8, 0.2)


def test_mixed_storage_dtypes_and_float64() -> None:
    a = nonzero_randn(3000, torch.bfloat16)
    b = nonzero_randn(3000, torch.float32)
    out = torch.empty(3000, dtype=torch.float16)
    got = slerp(a, b, 0.4, out=out)
    assert got is out
    assert_close_to_ref(got, slerp_ref(a, b, 0.4), _naive(a, b, 0.4, torch.float16))
    a64, b64 = a.double(), b.double()
    assert_close_to_ref(slerp(a64, b64, 0.4), slerp_ref(a64, b64, 0.4), slerp_ref(a64, b64, 0.4),
                        atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_exclude_and_keep_masks(dtype: torch.dtype) -> None:
    n = CHUNK + 3001
    a = nonzero_randn(n, dtype)
    b = (a.double() + nonzero_randn(n, torch.float64)).to(dtype)
    core = torch.rand(n) < 0.05
    aa, bb, ab = slerp_reduce(a, b, exclude=core)
    a64, b64 = a.double()[~core], b.double()[~core]
    assert aa == pytest.approx(torch.dot(a64, a64).item(), rel=1e-5)
    assert bb == pytest.approx(torch.dot(b64, b64).item(), rel=1e-5)
    assert ab == pytest.approx(torch.dot(a64, b64).item(), rel=1e-5)
    ca, cb = slerp_coefficients(aa, bb, ab, 0.5)
    got = slerp_blend(a, b, ca, cb, out=torch.empty_like(a), keep=core)
    assert_exact(got[core], a[core])
    naive = torch.where(core, a.float(), ca * a.float() + cb * b.float()).to(dtype)
    assert_close_to_ref(got, slerp_ref(a, b, 0.5, exclude=core, keep=core), naive)


def test_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="b: expected 10 elements"):
        slerp(torch.ones(10), torch.ones(11), 0.5)
    with pytest.raises(ValueError, match="1-D"):
        slerp(torch.ones(2, 5), torch.ones(2, 5), 0.5)
