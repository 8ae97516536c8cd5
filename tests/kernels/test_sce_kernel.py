"""kernels/sce.py on every backend (torch, the fused CPU kernels, Triton under TRITON_INTERPRET=1):
the variance scores bit for bit against torch.var (what mergekit ranks), the selection with ties to
the lowest index, the whole merge against a float64 oracle written here from mergekit 0.1.5's sce,
and the fused backends bit for bit against the torch one."""

from __future__ import annotations

import pytest
import torch
from _compare import (
    DTYPE_IDS,
    DTYPES,
    LENGTH_IDS,
    LENGTHS,
    assert_close_to_ref,
    assert_exact,
    backend_cases,
    nonzero_randn,
)
from oracles import sce64

from cpift.kernels.backend import HAS_NUMBA, HAS_TRITON
from cpift.kernels.sce import sce_combine, sce_merge, sce_square_sums, sce_variance, sce_weights, select_cut
from cpift.kernels.select import cut_mask

FUSED = (["cpu"] if HAS_NUMBA else []) + (["triton"] if HAS_TRITON else [])
CASES = backend_cases(("cpu", "triton"))
TOPKS = [1.0, 0.5, 0.13, 0.0]


def naive(base: torch.Tensor, xs: list[torch.Tensor], topk: float, dtype: torch.dtype) -> torch.Tensor:
    """The same in float32 (plain torch, mergekit's order), rounded to the storage dtype."""
    return oracle_in(base, xs, topk, torch.float32).to(dtype)


def oracle_in(base, xs, topk, dt):
    tau = torch.stack([x.to(dt) - base.to(dt) for x in xs])
    if topk < 1:
        var = torch.var(tau.float(), dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * topk) if topk > 0 else 0
        keep = torch.zeros(base.numel(), dtype=dt)
        keep[torch.sort(var, descending=True, stable=True).indices[:k]] = 1.0
        tau = tau * keep
    wts = tau.square().mean(dim=1)
    wts = wts / wts.sum() if abs(float(wts.sum())) >= 1e-6 else torch.full_like(wts, 1.0 / len(xs))
    majority = torch.where(tau.sum(dim=0) >= 0, 1.0, -1.0).to(dt)
    erased = wts[:, None] * (torch.sign(tau) == majority)
    return base.to(dt) + (tau * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)


def family(n: int, dtype: torch.dtype, count: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = nonzero_randn(n, dtype)
    # different delta scales, so the weights differ; signs disagree often
    xs = [(base.double() + (0.01 * (i + 1)) * torch.randn(n, dtype=torch.float64)).to(dtype) for i in range(count)]
    return base, xs


@pytest.mark.parametrize("topk", TOPKS, ids=[f"topk{t}" for t in TOPKS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", LENGTHS, ids=LENGTH_IDS)
def test_torch_backend_matches_the_oracle(n: int, dtype: torch.dtype, topk: float) -> None:
    if dtype != torch.float32 and topk < 1:
        # bf16/fp16 deltas are coarse: equal variances are common, and the float32 naive version's
        # tie order (any) is not the rule; the oracle's and cpift's (lowest index) must agree exactly.
        base, xs = family(n, dtype)
        got = sce_merge(base, xs, topk, out=torch.empty(n, dtype=torch.float32), backend="torch")
        assert_close_to_ref(got, sce64(base, xs, topk), sce64(base, xs, topk).float())
        return
    base, xs = family(n, dtype)
    before = [x.clone() for x in (base, *xs)]
    got = sce_merge(base, xs, topk, out=torch.empty(n, dtype=dtype), backend="torch")
    assert_close_to_ref(got, sce64(base, xs, topk), naive(base, xs, topk, dtype))
    for x, x0 in zip((base, *xs), before):
        assert_exact(x, x0)


@pytest.mark.parametrize("topk", [1.0, 0.37], ids=["all", "topk0.37"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend,n", [(b, n) for b, n, _ in CASES], ids=[f"{b}-{i}" for b, _, i in CASES])
def test_fused_backends_match_torch_bit_for_bit(backend: str, n: int, dtype: torch.dtype, topk: float) -> None:
    base, xs = family(n, dtype, count=4)
    scores_t = sce_variance(base, xs, out=torch.empty(n), backend="torch")
    scores = sce_variance(base, xs, out=torch.empty(n), backend=backend)
    assert_exact(scores, scores_t)
    cut = select_cut(scores, topk, backend=backend)
    assert cut == select_cut(scores_t, topk, backend="torch")
    sums = sce_square_sums(base, xs, scores=scores, cut=cut, backend=backend)
    sums_t = sce_square_sums(base, xs, scores=scores, cut=cut, backend="torch")
    assert all(abs(s - t) <= 1e-12 * abs(t) for s, t in zip(sums, sums_t)), (sums, sums_t)
    ws = sce_weights(sums_t, n)
    got = sce_combine(base, xs, ws, scores=scores, cut=cut, out=torch.empty(n, dtype=dtype), backend=backend)
    assert_exact(got, sce_combine(base, xs, ws, scores=scores, cut=cut, out=torch.empty(n, dtype=dtype),
                                  backend="torch"))


@pytest.mark.parametrize("backend", ["torch", *FUSED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_variance_is_torch_var_bit_for_bit(backend: str, dtype: torch.dtype) -> None:
    """The scores are what mergekit ranks: torch.var(float32 deltas, unbiased=False)."""
    base, xs = family(5000, dtype, count=3)
    tau = torch.stack([x.float() - base.float() for x in xs])
    got = sce_variance(base, xs, out=torch.empty(5000), backend=backend)
    assert_exact(got, torch.var(tau, dim=0, unbiased=False))


@pytest.mark.parametrize("backend", ["torch", *FUSED])
def test_tied_variances_keep_the_lowest_indices(backend: str) -> None:
    # every entry's deltas are a permutation-free pattern of ±1 or ±2: the variances take 2 values
    n = 1001
    base = torch.zeros(n)
    pattern = torch.arange(n) % 3 == 0  # variance 4 here (deltas ±2), 1 elsewhere (deltas ±1)
    x1 = torch.where(pattern, 2.0, 1.0)
    x2 = -x1
    scores = sce_variance(base, [x1, x2], out=torch.empty(n), backend=backend)
    assert torch.equal(torch.unique(scores), torch.tensor([1.0, 4.0]))
    cut = select_cut(scores, 0.5, backend=backend)  # k = 500: the 334 fours, then the first 166 ones
    keep = cut_mask(scores, cut, 0)
    ones = (~pattern).nonzero().flatten()
    assert int(keep.sum()) == 500 and bool(keep[pattern].all())
    assert bool(keep[ones[:166]].all()) and not bool(keep[ones[166:]].any())
    got = sce_merge(base, [x1, x2], 0.5, out=torch.empty(n), backend=backend)
    assert_close_to_ref(got, sce64(base, [x1, x2], 0.5), sce64(base, [x1, x2], 0.5).float())


@pytest.mark.parametrize("backend", ["torch", *FUSED])
def test_zero_sum_elects_plus_and_the_1e6_floor(backend: str) -> None:
    """mergekit's get_mask: Σ τ = 0 elects +1; its divisor is max(Σ agreeing w, 1e-6), not the sum."""
    base = torch.zeros(4)
    x1 = torch.tensor([1.0, -1.0, 3.0, 1e-5])  # model 1: tiny weight after the 1e-6 floor matters
    x2 = torch.tensor([-1.0, 1.0, -1.0, -1e4])
    got = sce_merge(base, [x1, x2], 1.0, out=torch.empty(4), backend=backend)
    assert torch.allclose(got.double(), sce64(base, [x1, x2], 1.0), rtol=1e-6, atol=0)
    # Σ τ = 0 at entries 0 and 1: the positive delta wins alone (model 1's at 0, model 2's at 1)
    assert 0 < float(got[0]) < 1.0 and abs(float(got[1]) - 1.0) < 1e-6
    tau = torch.stack([x1, x2]).double()
    w = tau.square().mean(1) / tau.square().mean(1).sum()
    assert w[0] < 1e-6  # entry 2: model 1 agrees alone, divided by 1e-6, not by its own weight
    assert abs(float(got[2]) - float(w[0] * 3.0 / 1e-6)) <= 1e-6 * abs(float(got[2]))


@pytest.mark.parametrize("backend", ["torch", *FUSED])
def test_degenerate_inputs(backend: str) -> None:
    base, xs = family(777, torch.float32)
    # equal models: every delta 0, the weights fall back to 1/N, nobody agrees, the base comes back
    assert_exact(sce_merge(base, [base, base], 0.5, out=torch.empty(777), backend=backend), base)
    assert_exact(sce_merge(base, [base, base], 1.0, out=torch.empty(777), backend=backend), base)
    # select_topk 0 keeps nothing; one model has zero variance everywhere (k = 0): the base
    assert_exact(sce_merge(base, xs, 0.0, out=torch.empty(777), backend=backend), base)
    assert_exact(sce_merge(base, xs[:1], 0.5, out=torch.empty(777), backend=backend), base)
    # one model, no selection: its own sign always agrees, weight 1: the model itself (to rounding)
    assert torch.allclose(sce_merge(base, xs[:1], 1.0, out=torch.empty(777), backend=backend), xs[0], rtol=0,
                          atol=1e-6)


def test_float64_inputs_run_the_oracle_precision() -> None:
    base, xs = family(3001, torch.float64)
    for topk in (1.0, 0.4):
        got = sce_merge(base, xs, topk, out=torch.empty(3001, dtype=torch.float64),
                        backend="cpu" if HAS_NUMBA else "torch")
        assert torch.allclose(got, sce64(base, xs, topk), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("topk", [-0.1, 1.5, float("nan")])
def test_bad_select_topk_is_refused(topk: float) -> None:
    base, xs = family(10, torch.float32)
    with pytest.raises(ValueError, match=r"select_topk must be in \[0, 1\]"):
        sce_merge(base, xs, topk, out=torch.empty(10), backend="torch")
    with pytest.raises(ValueError, match="need at least one task tensor"):
        sce_merge(base, [], 0.5, out=torch.empty(10), backend="torch")
