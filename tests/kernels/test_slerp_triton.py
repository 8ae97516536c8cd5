"""kernels/slerp.py Triton kernels (interpreter on CPU) against the float64 oracle and the torch path."""

from __future__ import annotations

import pytest
import torch
from _compare import DTYPE_IDS, DTYPES, LENGTH_IDS, LENGTHS, TORCH_FMA, assert_close_to_ref, assert_exact, nonzero_randn

from cpift.kernels.backend import HAS_NUMBA, HAS_TRITON, resolve
from cpift.kernels.slerp import slerp, slerp_blend, slerp_coefficients, slerp_reduce, slerp_ref

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", LENGTHS, ids=LENGTH_IDS)
def test_triton_slerp_matches_reference(n: int, dtype: torch.dtype) -> None:
    a = nonzero_randn(n, dtype)
    b = (a.double() * 0.7 + nonzero_randn(n, torch.float64)).to(dtype)
    got = slerp(a, b, 0.3, backend="triton")
    naive = slerp(a, b, 0.3, backend="torch")
    assert_close_to_ref(got, slerp_ref(a, b, 0.3), naive)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_triton_reduce_partials_match_torch(dtype: torch.dtype) -> None:
    n = 3 * 1024 + 17
    a, b = nonzero_randn(n, dtype), nonzero_randn(n, dtype)
    exclude = torch.rand(n) < 0.3
    for ex in (None, exclude):
        got = slerp_reduce(a, b, exclude=ex, backend="triton")
        want = slerp_reduce(a, b, exclude=ex, backend="torch")
        for g, w in zip(got, want):
            assert abs(g - w) <= 1e-5 * abs(w) + 1e-6, (got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_triton_blend_keep_mask_and_rounding(dtype: torch.dtype) -> None:
    """Transplanted entries are a bit for bit; the rest is fma(a, ca, b·cb) rounded once to nearest
    even: the fused CPU kernel's bits, and the torch path's where its add_(alpha=) fuses."""
    n = 5000
    a, b = nonzero_randn(n, dtype), nonzero_randn(n, dtype)
    keep = torch.rand(n) < 0.25
    ca, cb = slerp_coefficients(*slerp_reduce(a, b, backend="torch"), 0.6)
    got = slerp_blend(a, b, ca, cb, out=torch.empty(n, dtype=dtype), keep=keep, backend="triton")
    assert torch.equal(got[keep], a[keep])
    for backend, claimed in (("cpu", HAS_NUMBA), ("torch", TORCH_FMA)):
        if claimed:
            assert_exact(got, slerp_blend(a, b, ca, cb, out=torch.empty(n, dtype=dtype), keep=keep, backend=backend))
    ref = torch.where(keep, a.double(), ca * a.double() + cb * b.double())
    assert_close_to_ref(got, ref, torch.where(keep, a, (ca * a.float() + cb * b.float()).to(dtype)))


def test_backend_resolution(monkeypatch) -> None:
    x = torch.zeros(3)
    assert resolve("torch", x) == "torch"
    assert resolve(None, x) == "cpu"  # auto on CPU tensors: the fused CPU kernels (numba is a dependency)
    assert resolve("cpu", x) == "cpu"
    monkeypatch.setenv("CPIFT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set here: a CUDA machine's test run leaves it unset
    assert resolve(None, x) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve("triton", x)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        resolve("gpu", x)
