"""kernels/_slerp_cpu.py: the fused CPU SLERP passes. The blend is bit for bit the torch backend's; the
reduction sums exact float64 products in float64, so it is checked against an exact (math.fsum) oracle
with a float64 bound, and against the torch path within that path's own float32 error."""

from __future__ import annotations

import math

import pytest
import torch
from _compare import DTYPE_IDS, DTYPES, TORCH_FMA, assert_close_to_ref, assert_exact, nonzero_randn
from _cpu_cases import BLOCK, CPU_LENGTH_IDS, CPU_LENGTHS, needs_numba, torch_threads

from cpift.kernels.backend import resolve
from cpift.kernels.finite import all_finite
from cpift.kernels.slerp import slerp, slerp_blend, slerp_reduce, slerp_ref

pytestmark = needs_numba


def _pair(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    a = nonzero_randn(n, dtype)
    return a, (a.double() + nonzero_randn(n, torch.float64, scale=0.8)).to(dtype)


def _exact_sums(a: torch.Tensor, b: torch.Tensor, exclude: torch.Tensor | None):
    a64, b64 = a.double(), b.double()
    if exclude is not None:
        a64, b64 = torch.where(exclude, 0.0, a64), torch.where(exclude, 0.0, b64)
    terms = [a64 * a64, b64 * b64, a64 * b64]
    return [math.fsum(t.tolist()) for t in terms], [float(t.abs().sum()) for t in terms]


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "exclude"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", CPU_LENGTHS, ids=CPU_LENGTH_IDS)
def test_reduce_against_exact_sums_and_torch(n: int, dtype: torch.dtype, masked: bool) -> None:
    a, b = _pair(n, dtype)
    exclude = torch.rand(n) < 0.3 if masked else None
    got = slerp_reduce(a, b, exclude=exclude, backend="cpu")
    torch_sums = slerp_reduce(a, b, exclude=exclude, backend="torch")
    exact, mass = _exact_sums(a, b, exclude)
    for g, t, x, m in zip(got, torch_sums, exact, mass):
        # float64 sums of exact products: (BLOCK/8 + blocks)·2^-53 of Σ|terms| (header of _slerp_cpu.py).
        bound = (BLOCK / 8 + n / BLOCK + 2) * 2.0**-53 * m
        assert abs(g - x) <= bound, (g, x)
        # The torch path's float32 torch.dot partials err by up to ~70 float32 eps of Σ|terms| here
        # (1823x781 bf16): the fused sums are never further from the exact value than they are.
        assert abs(g - x) <= abs(t - x) + bound, (g, t, x)


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "keep"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", CPU_LENGTHS, ids=CPU_LENGTH_IDS)
def test_blend_is_the_torch_backend_bit_for_bit(n: int, dtype: torch.dtype, masked: bool) -> None:
    a, b = _pair(n, dtype)
    keep = torch.rand(n) < 0.3 if masked else None
    ca, cb = 0.6180339887, 0.4142135623
    got = slerp_blend(a, b, ca, cb, out=torch.empty_like(a), keep=keep, backend="cpu")
    want = slerp_blend(a, b, ca, cb, out=torch.empty_like(a), keep=keep, backend="torch")
    if TORCH_FMA:  # the kernel's fma(a, ca, b·cb) is torch's add_(alpha=) only where that fuses
        assert_exact(got, want)
    ref = ca * a.double() + cb * b.double()
    ref = torch.where(keep, a.double(), ref) if masked else ref
    assert_close_to_ref(got, ref, (ca * a.float() + cb * b.float()).to(dtype) if not masked
                        else torch.where(keep, a, (ca * a.float() + cb * b.float()).to(dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [1, 3 * BLOCK + 5, 1823 * 781], ids=["n1", "3block+5", "1823x781"])
def test_slerp_against_the_oracle(n: int, dtype: torch.dtype) -> None:
    a, b = _pair(n, dtype)
    before = (a.clone(), b.clone())
    for t in (0.3, 0.75):
        got = slerp(a, b, t, backend="cpu")
        # The comparison rule's "plain torch in the same dtype": the torch backend's float32 result.
        assert_close_to_ref(got, slerp_ref(a, b, t), slerp(a, b, t, backend="torch"))
    assert_exact(a, before[0])
    assert_exact(b, before[1])


def test_blend_in_place_over_a_float32_running_mean() -> None:
    # merge/cpi/fuse.py blends into its float32 running mean: out is a itself.
    a, b = _pair(3 * BLOCK + 5, torch.bfloat16)
    m = a.float()
    keep = torch.rand(a.numel()) < 0.2
    # the torch path where its add_(alpha=) is the kernel's fma, else the kernel writing elsewhere
    want = slerp_blend(m, b, 0.7, 0.3, out=torch.empty_like(m), keep=keep, backend="torch" if TORCH_FMA else "cpu")
    assert_exact(slerp_blend(m, b, 0.7, 0.3, out=m, keep=keep, backend="cpu"), want)


def test_same_results_for_any_thread_count() -> None:
    a, b = _pair(5 * BLOCK + 3, torch.bfloat16)
    exclude = torch.rand(a.numel()) < 0.3
    runs = []
    for threads in (1, 2):
        with torch_threads(threads):
            sums = slerp_reduce(a, b, exclude=exclude, backend="cpu")
            runs.append((sums, slerp_blend(a, b, 0.3, 0.7, out=torch.empty_like(a), keep=exclude, backend="cpu")))
    assert runs[0][0] == runs[1][0]
    assert_exact(runs[0][1], runs[1][1])


def test_dispatch_and_finiteness_record(monkeypatch) -> None:
    from cpift.kernels import _slerp_cpu

    monkeypatch.delenv("CPIFT_BACKEND", raising=False)
    a, b = _pair(1000, torch.float16)
    assert resolve(None, a) == "cpu"
    calls = []
    real = _slerp_cpu.slerp_blend_cpu
    monkeypatch.setattr(_slerp_cpu, "slerp_blend_cpu", lambda *x, **k: calls.append(1) or real(*x, **k))
    out = slerp_blend(a, b, 40000.0, 40000.0, out=torch.empty_like(a))  # overflows float16
    assert calls == [1] and not all_finite(out)
    slerp_blend(a, b, 0.5, 0.5, out=torch.empty_like(a), backend="torch")
    slerp_blend(a.double(), b.double(), 0.5, 0.5, out=torch.empty(1000, dtype=torch.float64), backend="cpu")
    assert calls == [1]
