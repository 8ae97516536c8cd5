"""NaN and ±inf inputs come out of every combine as torch's path lets them, on every backend.

The merge engine checks outputs, not inputs, for finiteness (kernels/finite.py): a backend that
turned a NaN input into a finite output (a where() that drops it, a maximum that ignores it) would
let `--backend triton` merge a NaN model silently. Each combine here gets NaN, +inf and −inf deltas
(kept, trimmed and dropped ones) and a NaN base entry; every backend must give the torch path's
result bit for bit (NaN as NaN), or, where a selection ranks a NaN score (undefined: callers check
finiteness first), non-finite values at the same entries.
"""

from __future__ import annotations

import math

import pytest
import torch

from cpift.kernels import nearswap, sce, select, slerp, ties
from cpift.kernels.backend import HAS_NUMBA, HAS_TRITON
from cpift.kernels.linear import linear

BACKENDS = [b for b, ok in (("cpu", HAS_NUMBA), ("triton", HAS_TRITON)) if ok]
N = 5003
BAD = [7, 11, 13, 17, 4099]  # NaN delta, +inf delta, NaN base, ±inf in two models, a NaN late in a tie run


def models(dtype: torch.dtype = torch.float32):
    base = torch.randn(N, dtype=torch.float64)
    xs = [base + 0.1 * torch.randn(N, dtype=torch.float64) for _ in range(3)]
    xs[1][7] = math.nan
    xs[2][11] = math.inf
    base[13] = math.nan
    xs[0][17], xs[1][17] = -math.inf, math.inf
    xs[2][4099] = math.nan
    return base.to(dtype), [x.to(dtype) for x in xs]


def same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal entries, NaN where torch has NaN (the sign of a NaN is not compared)."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), (got.isnan() ^ nan).nonzero().flatten()[:8].tolist()
    assert torch.equal(got[~nan], want[~nan])


def _cuts(base, xs):
    return [select.magnitude_cut(x, base.nan_to_num(0.0), N // 3, backend="torch") for x in xs]


MODES = {
    "sum": dict(elect_sign=False),
    "ties": dict(elect_sign=True),
    "ties_trim": dict(elect_sign=True, trim=True),
    "drop": dict(elect_sign=False, drop_density=0.5, drop_seeds=[1, 2, 3]),
    "dare_ties_sum": dict(elect_sign=True, drop_density=0.5, drop_seeds=[1, 2, 3], normalize=False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_merge(backend: str, mode: str, dtype: torch.dtype) -> None:
    base, xs = models(dtype)
    opts = dict(MODES[mode])
    if opts.pop("trim", False):
        opts["cuts"] = _cuts(base, xs)
    ws = [1.0, 0.5, 0.3]
    want = ties.delta_merge(base, xs, ws, out=torch.empty(N, dtype=dtype), backend="torch", **opts)
    assert want[BAD].isnan().all() or not torch.isfinite(want[BAD]).any()
    same_bits(ties.delta_merge(base, xs, ws, out=torch.empty(N, dtype=dtype), backend=backend, **opts), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sce(backend: str) -> None:
    base, xs = models()
    ws = [0.2, 0.3, 0.5]
    want = sce.sce_merge(base, xs, 1.0, out=torch.empty(N), backend="torch")
    same_bits(sce.sce_merge(base, xs, 1.0, out=torch.empty(N), backend=backend), want)
    # With a selection: the torch path's scores and cut for every backend (a NaN score's rank is undefined).
    scores = sce.sce_variance(base, xs, out=torch.empty(N), backend="torch")
    cut = select.magnitude_cut(scores.nan_to_num(0.0, 0.0, 0.0), None, N // 2, backend="torch")
    want = sce.sce_combine(base, xs, ws, scores=scores, cut=cut, out=torch.empty(N), backend="torch")
    got = sce.sce_combine(base, xs, ws, scores=scores, cut=cut, out=torch.empty(N), backend=backend)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert not torch.isfinite(got[BAD]).any()
    finite = torch.isfinite(want)
    assert torch.equal(got[finite], want[finite])


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_combines(backend: str) -> None:
    base, xs = models()
    for name, run in {
        "linear": lambda be: linear(xs, [1.0, 2.0, 1.0], out=torch.empty(N), backend=be),
        "nearswap": lambda be: nearswap.nearswap(xs[0], xs[1], 0.01, out=torch.empty(N), backend=be),
        "slerp": lambda be: slerp.slerp(xs[0], xs[2], 0.3, out=torch.empty(N), backend=be),
    }.items():
        want, got = run("torch"), run(backend)
        assert torch.equal(got.isnan(), want.isnan()), name
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), name
