"""kernels/ties.py: task arithmetic / TIES / DARE deltas against the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from _compare import (
    DTYPE_IDS,
    DTYPES,
    SMALL_LENGTH_IDS,
    SMALL_LENGTHS,
    assert_close_to_ref,
    assert_exact,
    nonzero_randn,
)

from cpift.kernels.dare import tensor_seed
from cpift.kernels.select import magnitude_cut
from cpift.kernels.ties import delta_merge, delta_merge_ref

# Dyadic weights and densities: w·δ and the sums are then exact in float32 as in float64, so an
# elected sign never differs between them. With weights such as 0.5, 0.3, 0.8 a bf16 entry whose
# weighted deltas cancel exactly rounds to ±tiny in float32 and to another ±tiny in float64, two
# different (both legitimate) elections.
WEIGHTS = [0.5, 0.25, 0.625]
MODES = {
    "task_arithmetic": dict(elect_sign=False),
    "trim": dict(elect_sign=False, trim=0.3),
    "ties": dict(elect_sign=True, trim=0.3),
    "ties_no_trim": dict(elect_sign=True),
    "dare_linear": dict(elect_sign=False, density=0.375),
    "dare_ties": dict(elect_sign=True, density=0.5),
    "trim_drop_elect": dict(elect_sign=True, trim=0.5, density=0.25),
    "dare_ties_per_model": dict(elect_sign=True, density=[0.5, 0.25, 1.0]),
    "ties_sum": dict(elect_sign=True, trim=0.3, normalize=False),
    "dare_ties_sum": dict(elect_sign=True, density=0.5, normalize=False),
}


def _models(n: int, dtype: torch.dtype, count: int = 3):
    base = nonzero_randn(n, dtype)
    xs = [(base.double() + nonzero_randn(n, torch.float64, scale=0.05, offset=0.01)).to(dtype)
          for _ in range(count)]
    return base, xs


def _options(mode: dict, base: torch.Tensor, xs: list[torch.Tensor]) -> dict:
    opts: dict = {"elect_sign": mode["elect_sign"], "lam": 0.9, "normalize": mode.get("normalize", True)}
    if "trim" in mode:
        opts["cuts"] = [magnitude_cut(x, base, int(mode["trim"] * base.numel())) for x in xs]
    if "density" in mode:
        density = mode["density"]
        opts["drop_density"] = density[:len(xs)] if isinstance(density, list) else density
        opts["drop_seeds"] = [tensor_seed(17, "layer.weight", i) for i in range(len(xs))]
    return opts


def _run_and_compare(base, xs, weights, opts, out_dtype) -> torch.Tensor:
    got = delta_merge(base, xs, weights, out=torch.empty(base.numel(), dtype=out_dtype), **opts)
    ref = delta_merge_ref(base, xs, weights, **opts)
    naive = delta_merge_ref(base, xs, weights, precision=torch.float32, **opts).to(out_dtype)
    assert_close_to_ref(got, ref, naive)
    return got


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", SMALL_LENGTHS[:4], ids=SMALL_LENGTH_IDS[:4])
def test_delta_merge_matches_reference(n: int, dtype: torch.dtype, mode: str) -> None:
    base, xs = _models(n, dtype)
    before = [t.clone() for t in (base, *xs)]
    _run_and_compare(base, xs, WEIGHTS, _options(MODES[mode], base, xs), dtype)
    for t, t0 in zip((base, *xs), before):
        assert_exact(t, t0)


@pytest.mark.parametrize("mode,dtype", [("ties", torch.float16), ("dare_linear", torch.float32),
                                        ("trim_drop_elect", torch.bfloat16)],
                         ids=["ties-fp16", "dare_linear-fp32", "trim_drop_elect-bf16"])
def test_chunk_boundary(mode: str, dtype: torch.dtype) -> None:
    base, xs = _models(SMALL_LENGTHS[4], dtype)
    _run_and_compare(base, xs, WEIGHTS, _options(MODES[mode], base, xs), dtype)


def test_large_bf16() -> None:
    base, xs = _models(1823 * 781, torch.bfloat16, count=2)
    opts = _options(MODES["trim_drop_elect"], base, xs)
    _run_and_compare(base, xs, WEIGHTS[:2], opts, torch.bfloat16)


def test_no_model_agrees_gives_base() -> None:
    # Small dyadic values, so x − b recovers ±δ exactly: opposite deltas, equal weights, Σ w δ = 0.
    base = torch.randint(-8, 8, (3000,)).float() / 4
    delta = torch.randint(1, 8, (3000,)).float() / 8
    xs = [base + delta, base - delta]
    got = delta_merge(base, xs, [1.0, 1.0], elect_sign=True, out=torch.empty_like(base))
    assert_exact(got, base)
    assert_exact(delta_merge_ref(base, xs, [1.0, 1.0], elect_sign=True).float(), base)
    # Unchanged models: every δ_i = 0, nothing agrees, the base comes back.
    same = delta_merge(base, [base.clone(), base.clone()], [0.5, 0.5], elect_sign=True,
                       out=torch.empty_like(base))
    assert_exact(same, base)


def test_agreeing_weights_that_cancel_give_base() -> None:
    base = torch.zeros(4)
    xs = [torch.tensor([2.0, 2.0, -1.0, 1.0]), torch.tensor([1.0, -1.0, -3.0, 1.0])]
    # Entry 0: both positive, s = +1, Σ_A w = 1 − 1 = 0 → no delta. Entry 3: same.
    got = delta_merge(base, xs, [1.0, -1.0], elect_sign=True, out=torch.empty(4))
    ref = delta_merge_ref(base, xs, [1.0, -1.0], elect_sign=True)
    assert got[0].item() == 0.0 and got[3].item() == 0.0
    assert_close_to_ref(got, ref, ref.float())


def test_elect_sign_by_hand() -> None:
    base = torch.zeros(3)
    xs = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([-0.5, -1.0, 0.0]), torch.tensor([3.0, 1.0, -0.25])]
    # Entry 0: Σ = 3.5 > 0, agree {0, 2}: (1 + 3)/2 = 2. Entry 1: Σ = −2, agree {0, 1}: −1.5.
    # Entry 2: Σ = 0.25 > 0, agree {0}: 0.5.
    got = delta_merge(base, xs, [1.0, 1.0, 1.0], elect_sign=True, out=torch.empty(3))
    assert got.tolist() == [2.0, -1.5, 0.5]
    task = delta_merge(base, xs, [1.0, 1.0, 1.0], lam=2.0, elect_sign=False, out=torch.empty(3))
    assert task.tolist() == [7.0, -4.0, 0.5]


def test_mixed_dtypes_and_float64() -> None:
    base = nonzero_randn(3000, torch.bfloat16)
    xs = [(base.float() + 0.05 * torch.randn(3000)).to(d) for d in (torch.float16, torch.float32)]
    opts = _options(MODES["trim_drop_elect"], base, xs)
    _run_and_compare(base, xs, [0.75, 0.5], opts, torch.bfloat16)
    b64, x64 = base.double(), [x.double() for x in xs]
    got = delta_merge(b64, x64, [0.75, 0.5], out=torch.empty(3000, dtype=torch.float64), **opts)
    ref = delta_merge_ref(b64, x64, [0.75, 0.5], **opts)
    assert_close_to_ref(got, ref, ref, atol=1e-12)


def test_dare_mask_is_the_same_in_every_chunking() -> None:
    # delta_merge draws per chunk, the reference in one call over the whole tensor.
    base, xs = _models(2 * 262144 + 3, torch.float32, count=2)
    opts = _options(MODES["dare_linear"], base, xs)
    got = delta_merge(base, xs, [1.0, 1.0], out=torch.empty_like(base), **opts)
    dropped_ref = delta_merge_ref(base, xs, [1.0, 1.0], **opts).float() == base
    assert_exact(got == base, dropped_ref)


def test_rejects_bad_arguments() -> None:
    b = torch.zeros(5)
    with pytest.raises(ValueError, match="at least one"):
        delta_merge(b, [], [], elect_sign=False, out=torch.empty(5))
    with pytest.raises(ValueError, match="drop_density must be in"):
        delta_merge(b, [b], [1.0], drop_density=0.0, drop_seeds=[1], elect_sign=False, out=torch.empty(5))
    with pytest.raises(ValueError, match="one drop seed per tensor"):
        delta_merge(b, [b], [1.0], drop_density=0.5, elect_sign=False, out=torch.empty(5))
    with pytest.raises(ValueError, match="1 tensors but 2 drop densities"):
        delta_merge(b, [b], [1.0], drop_density=[0.5, 0.5], drop_seeds=[1], elect_sign=False,
                    out=torch.empty(5))
    with pytest.raises(ValueError, match="1 tensors but 2 cuts"):
        delta_merge(b, [b], [1.0], cuts=[None, None], elect_sign=False, out=torch.empty(5))
