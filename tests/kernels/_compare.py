"""One comparison rule for the kernel tests, and the shared test inputs.

Floating results: cpift may be at most twice as far from the float64 reference as plain torch
computing naively in the same dtype, plus an atol per dtype. Exact artefacts: bit-for-bit equal.
Both print the first mismatching indices with their values.
"""

from __future__ import annotations

import torch

from cpift.kernels._scratch import CHUNK

# Absolute slack for entries whose result cancels to ~0, at unit-scale inputs: float32 rounding of the
# intermediates (a few float32 eps), not the storage dtype's precision: looser values would let a
# kernel with a 1% coefficient error pass in bf16.
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6, torch.float64: 1e-12}

LENGTHS = [0, 1, 1023, 3000, CHUNK + 1, 1823 * 781]
LENGTH_IDS = ["n0", "n1", "n1023", "n3000", "chunk+1", "1823x781"]
SMALL_LENGTHS = LENGTHS[:5]
SMALL_LENGTH_IDS = LENGTH_IDS[:5]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

_SHOW = 8


def _torch_add_alpha_fuses() -> bool:
    """Whether torch's float32 ``add_(t, alpha=w)`` rounds once (a fused multiply-add) on this CPU.

    ATen's vectorized kernels (AVX2, AVX-512, NEON) use fmadd; its default capability (a CPU it does
    not vectorize for, or ATEN_CPU_CAPABILITY=default) computes a + w·t with two roundings. cpift's
    fused CPU and Triton kernels spell every such sum as an explicit fma, so they equal the torch path
    bit for bit only where torch fuses. Probe: (1 + 2^-12)² − (1 + 2^-11) is 2^-24 with one rounding,
    0 with two.
    """
    acc = torch.full((64,), -(1.0 + 2.0 ** -11))
    acc.add_(torch.full((64,), 1.0 + 2.0 ** -12), alpha=1.0 + 2.0 ** -12)
    return bool((acc == 2.0 ** -24).all())


# Tests claiming bit-identity with a torch path that weights by a non-dyadic alpha check this first.
TORCH_FMA = _torch_add_alpha_fuses()


def backend_cases(backends=("torch", "cpu", "triton"), *, skip: int = 0) -> list[tuple[str, int, str]]:
    """(backend, length, length id) for each backend present: LENGTHS on torch and cpu (numba), the
    interpreter-sized SMALL_LENGTHS on triton; ``skip`` drops the first lengths (e.g. n = 0)."""
    from cpift.kernels.backend import HAS_NUMBA, HAS_TRITON

    present = {"torch": True, "cpu": HAS_NUMBA, "triton": HAS_TRITON}
    cases = []
    for b in backends:
        lengths, ids = (SMALL_LENGTHS, SMALL_LENGTH_IDS) if b == "triton" else (LENGTHS, LENGTH_IDS)
        cases += [(b, n, i) for n, i in zip(lengths[skip:], ids[skip:])] if present[b] else []
    return cases


def nonzero_randn(n: int, dtype: torch.dtype, *, scale: float = 1.0, offset: float = 0.1) -> torch.Tensor:
    """randn pushed at least `offset` away from zero (in every storage dtype), then stored in dtype."""
    x = torch.randn(n, dtype=torch.float64) * scale
    x = x + torch.where(x < 0, -offset, offset)
    return x.to(dtype)


def _first(bad: torch.Tensor) -> list[int]:
    return bad.nonzero().flatten()[:_SHOW].tolist()


def assert_close_to_ref(got: torch.Tensor, ref: torch.Tensor, naive: torch.Tensor,
                        *, atol: float | None = None) -> None:
    """|got − ref| ≤ 2·|naive − ref| + atol element-wise; non-finite entries must match exactly."""
    assert got.shape == ref.shape == naive.shape, (got.shape, ref.shape, naive.shape)
    atol = ATOL[got.dtype] if atol is None else atol
    g, r, nv = got.double(), ref.double(), naive.double()
    finite = torch.isfinite(r)
    err = (g - r).abs()
    # 2x the naive error, plus one unit of the dtype's precision at |ref| (the naive value may happen
    # to round exactly where ours lands one ulp away), plus atol for results that cancel to ~0.
    bound = 2.0 * (nv - r).abs() + torch.finfo(got.dtype).eps * r.abs() + atol
    ok = torch.where(finite, err <= bound, (g == r) | (g.isnan() & r.isnan()))
    if not bool(ok.all()):
        idx = _first(~ok)
        rows = "\n".join(
            f"  [{i}] got={g[i].item()!r} ref={r[i].item()!r} naive={nv[i].item()!r} "
            f"err={err[i].item():.3g} bound={bound[i].item():.3g}" for i in idx)
        raise AssertionError(f"{int((~ok).sum())} of {ok.numel()} entries too far from the "
                             f"float64 reference ({got.dtype}, atol {atol}); first:\n{rows}")


def assert_exact(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-for-bit equality (same dtype and shape; NaN payloads compared as bits)."""
    assert got.dtype == expected.dtype, (got.dtype, expected.dtype)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    if got.is_floating_point():
        same = (got == expected) | (got.isnan() & expected.isnan())
        same &= torch.signbit(got) == torch.signbit(expected)
    else:
        same = got == expected
    if not bool(same.all()):
        idx = _first(~same)
        rows = "\n".join(f"  [{i}] got={got[i].item()!r} expected={expected[i].item()!r}" for i in idx)
        raise AssertionError(f"{int((~same).sum())} of {same.numel()} entries differ; first:\n{rows}")
