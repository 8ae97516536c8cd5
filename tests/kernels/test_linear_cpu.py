"""kernels/_linear_cpu.py: the fused CPU weighted average, bit for bit against the torch backend and
within the comparison rule of the float64 oracle; thread counts, dispatch, finiteness record."""

from __future__ import annotations

import pytest
import torch
from _compare import DTYPE_IDS, DTYPES, TORCH_FMA, assert_close_to_ref, assert_exact, nonzero_randn
from _cpu_cases import BLOCK, CPU_LENGTH_IDS, CPU_LENGTHS, needs_numba, torch_threads

from cpift.kernels.backend import resolve
from cpift.kernels.finite import all_finite
from cpift.kernels.linear import linear, linear_ref

pytestmark = needs_numba

WEIGHTS = [1.0, 3.0, 0.7]


def _naive(xs: list[torch.Tensor], ws: list[float], dtype: torch.dtype) -> torch.Tensor:
    return (sum(w * x.float() for x, w in zip(xs, ws)) / sum(ws)).to(dtype)


@pytest.mark.parametrize("count", [1, 3], ids=["1model", "3models"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", CPU_LENGTHS, ids=CPU_LENGTH_IDS)
def test_matches_torch_bit_for_bit_and_the_oracle(n: int, dtype: torch.dtype, count: int) -> None:
    xs = [nonzero_randn(n, dtype) for _ in range(count)]
    before = [x.clone() for x in xs]
    ws = WEIGHTS[:count]
    got = linear(xs, ws, out=torch.empty(n, dtype=dtype), backend="cpu")
    if TORCH_FMA:  # torch's add_(alpha=) rounds once here, as the kernel's fma does
        assert_exact(got, linear(xs, ws, out=torch.empty(n, dtype=dtype), backend="torch"))
    assert_close_to_ref(got, linear_ref(xs, ws), _naive(xs, ws, dtype))
    for x, x0 in zip(xs, before):
        assert_exact(x, x0)


@pytest.mark.skipif(not TORCH_FMA, reason="torch's add_(alpha=) rounds twice on this CPU (no vectorized fma)")
def test_mixed_storage_dtypes() -> None:
    xs = [nonzero_randn(3 * BLOCK + 5, d) for d in DTYPES]
    for out_dtype in DTYPES:
        got = linear(xs, WEIGHTS, out=torch.empty(xs[0].numel(), dtype=out_dtype), backend="cpu")
        assert_exact(got, linear(xs, WEIGHTS, out=torch.empty(xs[0].numel(), dtype=out_dtype), backend="torch"))


def test_same_bytes_for_any_thread_count() -> None:
    xs = [nonzero_randn(5 * BLOCK + 3, torch.bfloat16) for _ in range(3)]
    outs = []
    for threads in (1, 2):
        with torch_threads(threads):
            outs.append(linear(xs, WEIGHTS, out=torch.empty_like(xs[0]), backend="cpu"))
    assert_exact(outs[0], outs[1])


def test_dispatch_and_finiteness_record(monkeypatch) -> None:
    from cpift.kernels import _linear_cpu

    monkeypatch.delenv("CPIFT_BACKEND", raising=False)
    xs = [torch.full((BLOCK + 1,), 60000.0, dtype=torch.float16), torch.full((BLOCK + 1,), -60000.0)]
    assert resolve(None, *xs) == "cpu"
    calls = []
    real = _linear_cpu.linear_cpu
    monkeypatch.setattr(_linear_cpu, "linear_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    # Normalised weights 1.5 and -0.5: 90000 + 30000 overflows float16.
    out = linear(xs, [3.0, -1.0], out=torch.empty(BLOCK + 1, dtype=torch.float16))
    assert calls == [1] and bool(torch.isinf(out).all()) and not all_finite(out)
    linear(xs, [1.0, 1.0], out=torch.empty(BLOCK + 1), backend="torch")
    linear([x.double() for x in xs], [1.0, 1.0], out=torch.empty(BLOCK + 1, dtype=torch.float64), backend="cpu")
    assert calls == [1]
