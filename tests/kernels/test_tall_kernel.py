"""kernels/tall.py (TALL consensus merge: consensus_ta, consensus_ties) on every backend against a float64
oracle, and bit for bit against mergekitty 0.3.1's float32 expression (written out here), on awkward
lengths and several dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from _compare import (
    DTYPES,
    assert_close_to_ref,
    assert_exact,
    backend_cases,
    nonzero_randn,
)

from cpift.kernels.backend import HAS_NUMBA, HAS_TRITON
from cpift.kernels.select import cut_mask, magnitude_cut
from cpift.kernels.tall import tall_merge, tall_ref

CASES = backend_cases(skip=1)
IDS = [f"{b}-{i}" for b, _, i in CASES]
W, LAM = [1.0, 0.5, 0.8], [1.0, 0.7, 1.5]
VARIANTS = {"ta": (False, False, 1, None), "ta-normalize-k2": (False, True, 2, None),
            "ties": (True, True, 1, [0.4, 0.7, 1.0]), "ties-sum-k2": (True, False, 2, [0.5, 0.5, 0.3])}


def family(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = nonzero_randn(n, dtype)
    return base, [(base.double() + 0.05 * torch.randn(n, dtype=torch.float64)).to(dtype) for _ in range(3)]


def mergekitty_float32(base, xs, keep, elect, normalize, k, dtype):
    """mergekitty's generalized task arithmetic + TALL arithmetic on float32 tensors, in its order."""
    b = base.float()
    deltas = torch.stack([x.float() - b for x in xs])
    trimmed = deltas * torch.stack(keep).float() if keep is not None else deltas
    w = torch.tensor(W, dtype=torch.float32)[:, None]
    wd = trimmed * w
    if elect:
        majority = (wd.sum(dim=0) >= 0).float() * 2 - 1
        agree = wd.sign() == majority
        mixed, divisor = (wd * agree).sum(dim=0), (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = wd.sum(dim=0), w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    tall = torch.stack([deltas[i].abs() > LAM[i] * (mixed - deltas[i]).abs() for i in range(len(xs))])
    consensus = tall.sum(dim=0) >= k
    return (b + mixed * consensus).to(dtype), consensus


def trims(base, xs, density):
    if density is None:
        return None, None
    cuts = [magnitude_cut(x, base, math.floor(d * x.numel()), backend="torch") for x, d in zip(xs, density)]
    return cuts, [cut_mask((x.float() - base.float()).abs(), c, 0) for x, c in zip(xs, cuts)]


# Every variant on every backend and dtype at the small lengths; the large ones with the TIES variant only.
GRID = [(b, n, d, v) for (b, n, i) in CASES for d in DTYPES for v in VARIANTS if n <= 3000 or v == "ties"]
GRID_IDS = [f"{b}-{n}-{str(d).removeprefix('torch.')}-{v}" for b, n, d, v in GRID]


@pytest.mark.parametrize("backend,n,dtype,variant", GRID, ids=GRID_IDS)
def test_matches_the_oracle_and_mergekittys_float32_bits(backend: str, n: int, dtype: torch.dtype,
                                                       variant: str) -> None:
    elect, normalize, k, density = VARIANTS[variant]
    base, xs = family(n, dtype)
    before = [t.clone() for t in (base, *xs)]
    cuts, keep = trims(base, xs, density)
    got = tall_merge(base, xs, W, LAM, k, cuts=cuts, elect_sign=elect, normalize=normalize,
                     out=torch.empty(n, dtype=dtype), backend=backend)
    expected, consensus = mergekitty_float32(base, xs, keep, elect, normalize, k, dtype)
    assert_exact(got, expected)
    ref = tall_ref(base, xs, W, LAM, k, keep=keep, elect_sign=elect, normalize=normalize)
    # The consensus mask is a threshold: where float32 and float64 disagree on it the reference differs by
    # the whole merged delta, so compare where both keep the same entries (all but a handful).
    unmasked = tall_ref(base, xs, W, LAM, 0, keep=keep, elect_sign=elect, normalize=normalize)
    same = ((ref == unmasked) == consensus) | (unmasked == base.double())  # a zero merged delta: either way
    assert int((~same).sum()) <= max(2, n // 10000)
    assert_close_to_ref(got[same], ref[same], expected[same])
    for t, b in zip((base, *xs), before):
        assert_exact(t, b)
    if n > 1000 and k == 2:  # the consensus drops some entries and keeps others
        assert bool(consensus.any()) and bool((~consensus).any())


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_a_nonfinite_delta_reaches_the_output(backend: str) -> None:
    if (backend == "cpu" and not HAS_NUMBA) or (backend == "triton" and not HAS_TRITON):
        pytest.skip(f"{backend} is not available")
    base, xs = family(1023, torch.float32)
    xs[0][5] = float("nan")
    got = tall_merge(base, xs, W, LAM, 1, elect_sign=True, normalize=True, out=torch.empty(1023), backend=backend)
    assert torch.isnan(got[5])
