"""kernels/_ties_triton.py (interpreter on CPU) against the float64 oracle and, bit for bit, the torch path.

The kernel runs the torch path's float32 operations in the same order (fmas for the weighted sums,
IEEE division), so every comparison with backend="torch" is exact, sign of zero included.
"""

from __future__ import annotations

import pytest
import torch
from _compare import DTYPE_IDS, DTYPES, TORCH_FMA, assert_close_to_ref, assert_exact, nonzero_randn
from test_ties_kernel import MODES, WEIGHTS, _models, _options

from cpift.kernels.backend import HAS_NUMBA, HAS_TRITON
from cpift.kernels.dare import keep_mask, tensor_seed
from cpift.kernels.select import Cut, cut_mask, magnitude_cut
from cpift.kernels.ties import delta_merge, delta_merge_ref

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

if HAS_TRITON:
    from cpift.kernels._ties_triton import _ROWS_INTERPRETER, delta_merge_triton

    BLOCK = 4 * _ROWS_INTERPRETER  # entries per program under the interpreter
else:
    BLOCK = 1

# The torch tests' modes (dyadic weights, see test_ties_kernel.py) plus trim + drop without normalising.
MODES = {**MODES, "trim_drop_sum": dict(elect_sign=True, trim=0.5, density=0.5, normalize=False)}


def _both(base, xs, weights, opts, out_dtype=None):
    """(triton, torch) results of delta_merge; the fused CPU kernel stands in for torch where torch's
    add_(alpha=) rounds twice (ATen's default capability: see _compare.TORCH_FMA)."""
    out_dtype = out_dtype or base.dtype
    got = delta_merge(base, xs, weights, out=torch.empty(base.numel(), dtype=out_dtype),
                      backend="triton", **opts)
    if TORCH_FMA or not HAS_NUMBA or torch.float64 in {t.dtype for t in (base, *xs)}:  # float64: torch on both
        want = delta_merge(base, xs, weights, out=torch.empty(base.numel(), dtype=out_dtype), backend="torch", **opts)
    else:  # the fused CPU kernel stores no float64: its float32 result, which a float64 output holds exactly
        stand_in = torch.float32 if out_dtype == torch.float64 else out_dtype
        want = delta_merge(base, xs, weights, out=torch.empty(base.numel(), dtype=stand_in), backend="cpu",
                           **opts).to(out_dtype)
    return got, want


def _check(base, xs, weights, opts, out_dtype=None) -> torch.Tensor:
    got, want = _both(base, xs, weights, opts, out_dtype)
    assert_exact(got, want)
    # A float64 output holds a float32 result exactly: judge it at float32 precision.
    judged = got.float() if got.dtype == torch.float64 else got
    ref = delta_merge_ref(base, xs, weights, **opts)
    naive = delta_merge_ref(base, xs, weights, precision=torch.float32, **opts).to(judged.dtype)
    assert_close_to_ref(judged, ref, naive)
    return got


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [0, 1, 3001], ids=["n0", "n1", "n3001"])
def test_modes_match_torch_and_reference(n: int, dtype: torch.dtype, mode: str) -> None:
    base, xs = _models(n, dtype)
    before = [t.clone() for t in (base, *xs)]
    _check(base, xs, WEIGHTS, _options(MODES[mode], base, xs))
    for t, t0 in zip((base, *xs), before):
        assert_exact(t, t0)


@pytest.mark.parametrize("count", [1, 2, 3], ids=["N1", "N2", "N3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [BLOCK - 1, BLOCK + 5], ids=["block-1", "block+5"])
def test_model_counts_across_blocks(n: int, dtype: torch.dtype, count: int) -> None:
    base, xs = _models(n, dtype, count)
    _check(base, xs, WEIGHTS[:count], _options(MODES["trim_drop_elect"], base, xs))


@pytest.mark.parametrize("elect,normalize", [(False, True), (True, True), (True, False)],
                         ids=["sum", "elect", "elect_sum"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["to_fp32", "to_bf16", "to_fp64"])
def test_other_output_dtypes(out_dtype: torch.dtype, elect: bool, normalize: bool) -> None:
    base, xs = _models(2000, torch.float16)
    opts = _options({"elect_sign": elect, "normalize": normalize, "trim": 0.4, "density": 0.5}, base, xs)
    _check(base, xs, WEIGHTS, opts, out_dtype)


def _tied_models(n: int, count: int, dtype: torch.dtype):
    """Deltas drawn from ±{1/8, 1/4}: exact in every dtype, so most |δ| tie with many others."""
    base = nonzero_randn(n, dtype)
    steps = torch.tensor([-0.25, -0.125, 0.125, 0.25], dtype=torch.float64)
    xs = [(base.double() + steps[torch.randint(0, 4, (n,))]).to(dtype) for _ in range(count)]
    return base, xs


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_trim_with_ties_keeps_exactly_the_cut(dtype: torch.dtype) -> None:
    n = 5003
    base, (x,) = _tied_models(n, 1, dtype)
    cut = magnitude_cut(x, base, 3 * n // 4)  # all 0.25s and part of the 0.125s
    assert cut.value == 0.125 and 0 < cut.last_tie < n - 1
    opts = {"elect_sign": False, "cuts": [cut]}
    got, want = _both(base, [x], [1.0], opts, torch.float32)
    assert_exact(got, want)
    # δ ≠ 0 everywhere and b + δ is exact: an entry moved iff the trim kept it.
    scores = (x.float() - base.float()).abs()
    assert torch.equal(got != base.float(), cut_mask(scores, cut, 0))
    assert int((got != base.float()).sum()) == 3 * n // 4


def test_elect_with_ties_and_cancellation() -> None:
    """Equal deltas, zero sums (elected sign 0), agreeing weights that cancel, ±0 bases."""
    n = 4000
    base, xs = _tied_models(n, 3, torch.float32)
    xs[1][: n // 2] = xs[0][: n // 2]  # equal deltas: with w0 = -w1 these sum to 0
    base[::7] = -0.0
    xs[2][::7] = -0.0  # δ = 0 against a -0 base
    for weights in ([0.5, -0.5, 0.25], [0.5, 0.5, -1.0]):  # the second cancels in the denominator
        cuts = [magnitude_cut(x, base, n // 2) for x in xs]
        for normalize in (True, False):
            opts = {"elect_sign": True, "normalize": normalize, "cuts": cuts, "lam": 1.0}
            _check(base, xs, weights, opts)


@pytest.mark.parametrize("seed", [tensor_seed(3, "w", 0), 0, (1 << 63) + 5, (1 << 64) - 1],
                         ids=["hashed", "zero", "2^63+5", "2^64-1"])
def test_drop_mask_equals_keep_mask(seed: int) -> None:
    n, density = 6007, 0.375
    base, (x,) = _models(n, torch.float32, 1)
    got, want = _both(base, [x], [1.0], {"elect_sign": False, "drop_density": density,
                                         "drop_seeds": [seed]}, torch.float32)
    assert_exact(got, want)
    assert torch.equal(got != base, keep_mask(seed, 0, n, density))


@pytest.mark.parametrize("mode", ["trim_drop_elect", "trim_drop_sum"])
def test_pieces_with_start_offsets_equal_the_whole(mode: str) -> None:
    """Launching on pieces with their global start gives the whole tensor's tie rule and DARE mask."""
    n = 9001
    base, xs = _tied_models(n, 3, torch.bfloat16)
    opts = _options(MODES[mode], base, xs)
    whole = delta_merge(base, xs, WEIGHTS, out=torch.empty(n, dtype=torch.bfloat16),
                        backend="torch", **opts)
    assert 0 < opts["cuts"][0].last_tie < n - 1
    density = opts["drop_density"]
    launch = dict(weights=WEIGHTS, num_weights=[w / density for w in WEIGHTS], lam=opts["lam"],
                  cuts=opts["cuts"], densities=[density] * 3, drop_seeds=opts["drop_seeds"],
                  elect_sign=True, normalize=opts["normalize"])
    bounds = [0, 1, 3, 6, 4097, 4101, 8190, n]  # every start % 4, ragged lengths
    pieces = [delta_merge_triton(base[s:e], [x[s:e] for x in xs], start=s, **launch,
                                 out=torch.empty(e - s, dtype=torch.bfloat16))
              for s, e in zip(bounds, bounds[1:])]
    assert_exact(torch.cat(pieces), whole)


@pytest.mark.parametrize("rows", [2, 16, 128], ids=["rows2", "rows16", "rows128"])
def test_result_does_not_depend_on_block_size(rows: int) -> None:
    n = 333
    base, xs = _tied_models(n, 2, torch.float16)
    cuts = [magnitude_cut(x, base, n // 2) for x in xs]
    launch = dict(weights=WEIGHTS[:2], num_weights=[w * 2 for w in WEIGHTS[:2]], lam=0.75, cuts=cuts,
                  densities=[0.5, 0.5], drop_seeds=[11, 12], elect_sign=True, normalize=True)
    got = delta_merge_triton(base, xs, out=torch.empty(n, dtype=torch.float16), rows=rows, start=2, **launch)
    want = delta_merge_triton(base, xs, out=torch.empty(n, dtype=torch.float16), start=2, **launch)
    assert_exact(got, want)


def test_float64_inputs_take_the_torch_path(monkeypatch) -> None:
    import cpift.kernels._ties_triton as tt

    def refuse(*args, **kwargs):
        raise AssertionError("float64 must not reach the Triton kernel")

    monkeypatch.setattr(tt, "delta_merge_triton", refuse)
    base, xs = _models(100, torch.float64, 2)
    opts = {"elect_sign": True, "cuts": [Cut.all(), Cut.none()]}
    got, want = _both(base, xs, WEIGHTS[:2], opts)
    assert_exact(got, want)


def test_strided_views_are_refused() -> None:
    base, xs = _models(200, torch.float32, 1)
    with pytest.raises(ValueError, match="contiguous"):
        delta_merge(base[::2], [xs[0][::2]], [1.0], elect_sign=False, out=torch.empty(100), backend="triton")
