"""kernels/_ties_cpu.py: the fused CPU delta_merge (trim, band, drop, election), bit for bit against the
torch backend and within the comparison rule of the float64 oracle; DARE's Philox stream, the tie rule at
unaligned starts, thread counts, dispatch and the in-pass finiteness record."""

from __future__ import annotations

import pytest
import torch
from _compare import DTYPE_IDS, DTYPES, TORCH_FMA, assert_close_to_ref, assert_exact, nonzero_randn
from _cpu_cases import BLOCK, CPU_LENGTH_IDS, CPU_LENGTHS, needs_numba, torch_threads

from cpift.kernels.backend import resolve
from cpift.kernels.band import magnitude_band
from cpift.kernels.dare import keep_mask, tensor_seed
from cpift.kernels.finite import all_finite
from cpift.kernels.select import Cut, cut_mask, magnitude_cut
from cpift.kernels.ties import delta_merge, delta_merge_ref

pytestmark = needs_numba

WEIGHTS = [0.5, 0.25, 0.625]  # dyadic: see tests/kernels/test_ties_kernel.py
MODES = {
    "task_arithmetic": dict(elect_sign=False),
    "ties": dict(elect_sign=True, trim=0.3),
    "dare_linear": dict(elect_sign=False, density=0.375),
    "trim_drop_elect": dict(elect_sign=True, trim=0.5, density=0.25),
    "dare_ties_per_model": dict(elect_sign=True, density=[0.5, 0.25, 1.0]),
    "ties_sum": dict(elect_sign=True, trim=0.3, normalize=False),
    "breadcrumbs": dict(elect_sign=False, band=(0.39, 0.97)),
    "breadcrumbs_ties_drop": dict(elect_sign=True, band=(0.05, 0.6), density=0.5),
}
LARGE_MODES = ["trim_drop_elect"]  # trim, drop and election at once: the torch path is slow at this size


def _models(n: int, dtype: torch.dtype, count: int = 3):
    base = nonzero_randn(n, dtype)
    xs = [(base.double() + nonzero_randn(n, torch.float64, scale=0.05, offset=0.01)).to(dtype)
          for _ in range(count)]
    return base, xs


def _options(mode: dict, base: torch.Tensor, xs: list[torch.Tensor]) -> dict:
    opts: dict = {"elect_sign": mode["elect_sign"], "lam": 0.9, "normalize": mode.get("normalize", True)}
    if "trim" in mode:
        opts["cuts"] = [magnitude_cut(x, base, int(mode["trim"] * base.numel()), backend="torch") for x in xs]
    if "band" in mode:  # breadcrumbs: ascending ranks lo .. hi − 1 by |δ|
        n = base.numel()
        lo, hi = (int(f * n) for f in mode["band"])
        opts["bands"] = [magnitude_band(x, base, lo, hi, backend="torch") for x in xs]
    if "density" in mode:
        density = mode["density"]
        opts["drop_density"] = density[:len(xs)] if isinstance(density, list) else density
        # Seeds above 2^63: the key's high word uses all 32 bits.
        seeds = [tensor_seed(17, "w", 0), (1 << 64) - 1, tensor_seed(17, "w", 2) | (1 << 63)]
        opts["drop_seeds"] = seeds[:len(xs)]
    return opts


def _check(n: int, dtype: torch.dtype, mode: str) -> None:
    base, xs = _models(n, dtype)
    before = [t.clone() for t in (base, *xs)]
    opts = _options(MODES[mode], base, xs)
    got = delta_merge(base, xs, WEIGHTS, out=torch.empty_like(base), backend="cpu", **opts)
    want = delta_merge(base, xs, WEIGHTS, out=torch.empty_like(base), backend="torch", **opts)
    if TORCH_FMA:  # λ = 0.9: the kernel's fma(merged, λ, b) is torch's add_(alpha=λ) only where that fuses
        assert_exact(got, want)
    ref = delta_merge_ref(base, xs, WEIGHTS, **opts)
    naive = delta_merge_ref(base, xs, WEIGHTS, precision=torch.float32, **opts).to(dtype)
    assert_close_to_ref(got, ref, naive)
    for t, t0 in zip((base, *xs), before):
        assert_exact(t, t0)


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", CPU_LENGTHS[:-1], ids=CPU_LENGTH_IDS[:-1])
def test_matches_torch_bit_for_bit_and_the_oracle(n: int, dtype: torch.dtype, mode: str) -> None:
    _check(n, dtype, mode)


@pytest.mark.parametrize("mode", LARGE_MODES, ids=LARGE_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_large_tensor(dtype: torch.dtype, mode: str) -> None:
    _check(CPU_LENGTHS[-1], dtype, mode)


def test_mixed_storage_dtypes() -> None:
    base = nonzero_randn(3 * BLOCK + 5, torch.bfloat16)
    xs = [(base.float() + 0.05 * torch.randn(base.numel())).to(d) for d in (torch.float16, torch.float32)]
    opts = _options(MODES["trim_drop_elect"], base, xs)
    for out_dtype in DTYPES:
        got = delta_merge(base, xs, [0.75, 0.5], out=torch.empty(base.numel(), dtype=out_dtype), backend="cpu", **opts)
        want = delta_merge(base, xs, [0.75, 0.5], out=torch.empty(base.numel(), dtype=out_dtype), backend="torch",
                           **opts)
        if TORCH_FMA:
            assert_exact(got, want)


@pytest.mark.parametrize("seed", [0, 123, (1 << 63) - 1, (1 << 64) - 1], ids=["0", "123", "2^63-1", "2^64-1"])
@pytest.mark.parametrize("start", [1, 6, 4 * BLOCK + 3, (1 << 34) - 6], ids=["1", "6", "4block+3", "2^34-6"])
def test_dare_mask_is_keep_mask_at_unaligned_starts(seed: int, start: int) -> None:
    from cpift.kernels._ties_cpu import delta_merge_cpu

    n = BLOCK + 11
    base = torch.zeros(n)
    x = torch.ones(n)
    out = torch.empty(n)
    delta_merge_cpu(base, [x], [1.0], [1.0 / 0.375], lam=1.0, cuts=None, densities=[0.375], drop_seeds=[seed],
                    elect_sign=False, normalize=True, out=out, start=start)
    assert_exact(out != 0, keep_mask(seed, start, n, 0.375))


@pytest.mark.parametrize("start", [0, 3, BLOCK - 2], ids=["0", "3", "block-2"])
def test_ties_at_the_cut_keep_the_lowest_global_indices(start: int) -> None:
    from cpift.kernels._ties_cpu import delta_merge_cpu

    n = 2 * BLOCK + 9
    base = torch.zeros(n)
    x = (torch.randint(1, 5, (n,)) * (1 - 2 * torch.randint(0, 2, (n,)))).float()  # many ties at |x| = 2
    cut = Cut(value=2.0, last_tie=start + BLOCK + 4)
    out = torch.empty(n)
    delta_merge_cpu(base, [x], [1.0], [1.0], lam=1.0, cuts=[cut], densities=None, drop_seeds=None,
                    elect_sign=False, normalize=True, out=out, start=start)
    assert_exact(out, torch.where(cut_mask(x.abs(), cut, start), x, 0.0))


def test_same_bytes_for_any_thread_count() -> None:
    base, xs = _models(5 * BLOCK + 3, torch.bfloat16)
    opts = _options(MODES["trim_drop_elect"], base, xs)
    outs = []
    for threads in (1, 2):
        with torch_threads(threads):
            outs.append(delta_merge(base, xs, WEIGHTS, out=torch.empty_like(base), backend="cpu", **opts))
    assert_exact(outs[0], outs[1])


def test_dispatch(monkeypatch) -> None:
    from cpift.kernels import _ties_cpu

    monkeypatch.delenv("CPIFT_BACKEND", raising=False)
    base, xs = _models(1000, torch.float32)
    assert resolve(None, base) == "cpu"
    calls = []
    real = _ties_cpu.delta_merge_cpu
    monkeypatch.setattr(_ties_cpu, "delta_merge_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    delta_merge(base, xs, WEIGHTS, elect_sign=True, out=torch.empty_like(base))
    assert calls == [1]
    delta_merge(base, xs, WEIGHTS, elect_sign=True, out=torch.empty_like(base), backend="torch")
    # float64 inputs keep the torch path (the oracle's precision) whatever the backend.
    b64 = base.double()
    delta_merge(b64, [x.double() for x in xs], WEIGHTS, elect_sign=True, out=torch.empty_like(b64), backend="cpu")
    assert calls == [1]


def test_overflow_is_reported_from_the_merge_pass() -> None:
    base = torch.zeros(BLOCK + 3, dtype=torch.float16)
    xs = [torch.full_like(base, 60000.0), torch.full_like(base, 60000.0)]
    xs[0][BLOCK + 1] = 1.0
    xs[1][BLOCK + 1] = 1.0
    out = delta_merge(base, xs, [1.0, 1.0], elect_sign=False, out=torch.empty_like(base), backend="cpu")
    assert torch.isinf(out[0]) and not all_finite(out)  # answered from the kernel's record
    fine = delta_merge(base, xs, [0.25, 0.25], elect_sign=False, out=torch.empty_like(base), backend="cpu")
    fine[5] = float("nan")  # an in-place write after the kernel voids its record
    assert not all_finite(fine)
