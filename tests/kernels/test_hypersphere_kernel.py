"""kernels/hypersphere.py (nuslerp, multislerp, karcher), kernels/gram.py and linear.weighted_sum against
float64 oracles written here from mergekit 0.1.5's formulas (per element, as mergekit computes them),
on every backend (Triton under the interpreter on small sizes), awkward sizes and dtypes, and the
fallbacks: colinear, antipodal, zero tensors, one model, the zero-mean error."""

from __future__ import annotations

import math

import pytest
import torch
from _compare import DTYPE_IDS, DTYPES, LENGTH_IDS, LENGTHS, TORCH_FMA, assert_close_to_ref, assert_exact, nonzero_randn
from oracles import karcher64, multislerp64, nuslerp64

from cpift.kernels import hypersphere as H
from cpift.kernels.backend import HAS_NUMBA, HAS_TRITON
from cpift.kernels.gram import gram, gram_ref
from cpift.kernels.linear import weighted_sum

BACKENDS = ["torch"] + (["cpu"] if HAS_NUMBA else [])
TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
SMALL = [1, 1023, 3000]
# Relative error of the coefficients from the reduction (as in tests/merge/test_model_stock.py): the
# fused CPU kernel sums float64 products (float32-accurate inputs), Triton folds float32 partials of
# 1024 entries, the torch path float32 torch.dot partials over 2^18-entry chunks.
COEF_ERR = {"cpu": 1e-6, "triton": 1e-5, "torch": 1e-4}


# --------------------------------------------------------------------------------------------------


def family(n, dtype, k, *, seed=0, spread=1.0):
    """k tensors with a shared component (angles well inside (0, π/2)) and a base, non-zero entries."""
    g = torch.Generator().manual_seed(seed)
    base = nonzero_randn(n, torch.float64)
    common = torch.randn(n, generator=g, dtype=torch.float64)
    xs = [base + common + spread * (0.3 + 0.2 * i) * torch.randn(n, generator=g, dtype=torch.float64)
          for i in range(k)]
    return base.to(dtype), [x.to(dtype) for x in xs]


def check(got, want, xs, coefficients, backend, base=None, name=""):
    """|got − want| within twice the rounding to got's dtype, plus 4 float32 eps of the blend's scale
    Σ|c_i x_i| (+|b|), plus the coefficients' reduction error COEF_ERR times that scale."""
    want = want.reshape(-1).double()
    ref = base.double() if base is not None else torch.zeros_like(want)
    scale = (ref.abs() if base is not None else torch.zeros_like(want)).clone()
    for x, c in zip(xs, coefficients):
        d = x.double() - (ref if base is not None else 0.0)
        scale += (c.abs() if torch.is_tensor(c) else abs(c)) * d.abs()
    rounding = (want.to(got.dtype).double() - want).abs()
    tol = 2 * rounding + (4 * torch.finfo(torch.float32).eps + COEF_ERR[backend]) * scale + 1e-12
    err = (got.double() - want).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (name, int(bad.sum()), float(err.max()), bad.nonzero()[:5].flatten().tolist())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_base", [False, True], ids=["no-base", "base"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", LENGTHS, ids=LENGTH_IDS)
def test_nuslerp_whole_tensor(n, dtype, with_base, backend):
    base, (x0, x1) = family(n, dtype, 2)
    b = base if with_base else None
    out = torch.empty(n, dtype=dtype)
    c = H.nuslerp(x0, x1, 0.3, base=b, out=out, backend=backend)
    check(out, nuslerp64(0.3, x0, x1, base=b), [x0, x1], c, backend, b, "nuslerp")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [2, 3, 5], ids=["N2", "N3", "N5"])
@pytest.mark.parametrize("with_base", [False, True], ids=["no-base", "base"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", LENGTHS, ids=LENGTH_IDS)
def test_multislerp(n, dtype, with_base, k, backend):
    base, xs = family(n, dtype, k)
    b = base if with_base else None
    w = [1.0, 0.5, 2.0, 0.75, 1.25][:k]
    out = torch.empty(n, dtype=dtype)
    if n == 0 and k > 2:  # an empty tensor's mean is zero: mergekit raises, and so does cpift
        with pytest.raises(ValueError):
            multislerp64(xs, w, base=b)
        with pytest.raises(H.ZeroMean):
            H.multislerp(xs, w, base=b, out=out, backend=backend)
        return
    c = H.multislerp(xs, w, base=b, out=out, backend=backend)
    check(out, multislerp64(xs, w, base=b), xs, c, backend, b, "multislerp")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [2, 3, 4], ids=["N2", "N3", "N4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", LENGTHS, ids=LENGTH_IDS)
def test_karcher(n, dtype, k, backend):
    _, xs = family(n, dtype, k, spread=3.0)  # wide angles: several iterations before the step is < tol
    out = torch.empty(n, dtype=dtype)
    c = H.karcher(xs, out=out, backend=backend)
    check(out, karcher64(xs), xs, c, backend, None, "karcher")


@TRITON
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", SMALL, ids=[f"n{n}" for n in SMALL])
def test_triton_interpreter(n, dtype):
    base, xs = family(n, dtype, 3)
    for b in (None, base):
        out, ref = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
        c = H.nuslerp(xs[0], xs[1], 0.7, base=b, out=out, backend="triton")
        check(out, nuslerp64(0.7, xs[0], xs[1], base=b), xs[:2], c, "triton", b, "nuslerp")
        c = H.multislerp(xs, [1.0, 2.0, 0.5], base=b, out=out, backend="triton")
        H.multislerp(xs, [1.0, 2.0, 0.5], base=b, out=ref, backend="torch")
        check(out, multislerp64(xs, [1.0, 2.0, 0.5], base=b), xs, c, "triton", b, "multislerp")
    c = H.karcher(xs, out=out, backend="triton")
    check(out, karcher64(xs), xs, c, "triton", None, "karcher")


ROW_SHAPES = [(33, 97), (1, 5), (7, 1), (3, 1 << 17), (5, 3001), (4, 5, 6)]
ROW_IDS = ["33x97", "1x5", "7x1", "3xhalfchunk", "5x3001", "4x5x6"]


@pytest.mark.parametrize("with_base", [False, True], ids=["no-base", "base"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=ROW_IDS)
def test_nuslerp_rows_and_columns(shape, dtype, with_base):
    n = math.prod(shape)
    base, (x0, x1) = family(n, dtype, 2)
    b = base if with_base else None
    out = torch.empty(n, dtype=dtype)
    bs = None if b is None else b.reshape(shape)
    H.nuslerp_rows(x0, x1, 0.25, shape[-1], base=b, out=out)
    want = nuslerp64(0.25, x0.reshape(shape), x1.reshape(shape), base=bs, flatten=False)
    check(out, want, [x0, x1], vector_coefficients(x0, x1, b, shape, 0.25, False), "torch", b, "rows")
    H.nuslerp_columns(x0, x1, 0.25, n // shape[0], base=b, out=out)
    want = nuslerp64(0.25, x0.reshape(shape), x1.reshape(shape), base=bs, flatten=False, row_wise=True)
    check(out, want, [x0, x1], vector_coefficients(x0, x1, b, shape, 0.25, True), "torch", b, "columns")


def vector_coefficients(x0, x1, b, shape, t, row_wise):
    """Per entry, the float64 |c_0|, |c_1| of the vector (row or column) it belongs to, for the tolerance;
    vectors within 0.1 rad of antipodal (c ~ 1/sin θ, ill-conditioned in any float32 arithmetic) are
    also given a tolerance scaled by 1/sin²θ."""
    d0, d1 = (x.double().reshape(shape) - (0.0 if b is None else b.double().reshape(shape)) for x in (x0, x1))
    if row_wise:
        d0, d1 = d0.transpose(0, -1), d1.transpose(0, -1)
    cos = ((d0 * d1).sum(-1, keepdim=True) / (d0.norm(dim=-1, keepdim=True) * d1.norm(dim=-1, keepdim=True))
           ).clamp(-1, 1)
    theta = torch.acos(cos).clamp(1e-3, math.pi - 1e-3)
    sin = torch.sin(theta)
    c0, c1 = (torch.sin((1 - t) * theta) / sin).abs(), (torch.sin(t * theta) / sin).abs()
    c0, c1 = (c / sin.square().clamp(max=1.0) * torch.ones_like(d0) for c in (c0, c1))
    if row_wise:
        c0, c1 = c0.transpose(0, -1), c1.transpose(0, -1)
    return [c0.reshape(-1), c1.reshape(-1)]


def test_rows_really_differ_from_the_whole_tensor():
    _, (x0, x1) = family(33 * 97, torch.float32, 2)
    x1 = x1.reshape(33, 97)
    x1[::2] = -x1[::2]  # half the rows point away from x0: their angles differ from the others'
    x1 = x1.reshape(-1)
    rows, whole = torch.empty_like(x0), torch.empty_like(x0)
    H.nuslerp_rows(x0, x1, 0.5, 97, out=rows)
    H.nuslerp(x0, x1, 0.5, out=whole)
    assert (rows - whole).abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gram_and_weighted_sum(dtype, backend):
    n = (1 << 18) * 2 + 5
    base, xs = family(n, dtype, 3)
    for b in (None, base):
        g = gram(xs, base=b, backend=backend)
        assert torch.equal(g, g.T)
        assert torch.allclose(g, gram_ref(xs, base=b), rtol=COEF_ERR[backend])
    assert gram(xs[:1], backend=backend)[0, 0] == pytest.approx(float(xs[0].double().square().sum()), rel=1e-4)
    cs = [1.7, -2.25, 0.4]  # summing to anything: no normalisation
    out = torch.empty(n, dtype=dtype)
    weighted_sum(xs, cs, out=out, backend=backend)
    check(out, sum(c * x.double() for c, x in zip(cs, xs)), xs, cs, "cpu", None, "weighted_sum")
    if TORCH_FMA:  # the fused CPU pass does the torch path's operations in its order (fmas included)
        torch_out = torch.empty(n, dtype=dtype)
        weighted_sum(xs, cs, out=torch_out, backend="torch")
        assert_exact(out, torch_out)


@TRITON
def test_weighted_sum_triton_is_the_fma_chain():
    # Triton runs acc = fma(c_i, x_i, acc) (the delta kernel over a zero base), as the fused CPU kernel
    # does; the torch path's add_(alpha=) is that fma only where ATen vectorizes (TORCH_FMA), else it
    # rounds the product first: up to one float32 ulp per step away, hence no bit claim there.
    cs = [0.3, -1.1, 2.0]  # not dyadic: fused and unfused sums differ in float32
    xs = [nonzero_randn(3001, torch.bfloat16) for _ in range(3)]
    got = weighted_sum(xs, cs, out=torch.empty(3001, dtype=torch.bfloat16), backend="triton")
    for backend, claimed in (("cpu", HAS_NUMBA), ("torch", TORCH_FMA)):
        if claimed:
            assert_exact(got, weighted_sum(xs, cs, out=torch.empty_like(got), backend=backend))
    naive = sum(c * x.float() for c, x in zip(cs, xs)).to(torch.bfloat16)
    ref = sum(c * x.double() for c, x in zip(cs, xs))
    assert_close_to_ref(got, ref, naive)


def test_bad_arguments():
    x = torch.ones(4)
    with pytest.raises(ValueError, match="one coefficient per tensor"):
        weighted_sum([x, x], [1.0], out=torch.empty(4))
    with pytest.raises(ValueError, match="not rows of 3"):
        H.nuslerp_rows(x, x, 0.5, 3, out=torch.empty(4))
    with pytest.raises(ValueError, match="at least one tensor"):
        gram([])


# --------------------------------------------------------------------------------------------------
# Fallbacks and edge cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_nuslerp_colinear_antipodal_and_zero(backend):
    x = nonzero_randn(1001, torch.float32)
    out = torch.empty_like(x)
    for other, what in ((2.5 * x, "colinear"), (-x, "antipodal"), (-3.0 * x, "antipodal, scaled")):
        c = H.nuslerp(x, other, 0.3, out=out, backend=backend)
        assert c == pytest.approx((0.7, 0.3), abs=1e-12), what  # the lerp branch
        check(out, nuslerp64(0.3, x, other), [x, other], c, backend, None, what)
    zero = torch.zeros_like(x)
    c = H.nuslerp(x, zero, 0.3, out=out, backend=backend)  # cos = 0: the spherical branch at θ = π/2
    assert c == pytest.approx((math.sin(0.7 * math.pi / 2), math.sin(0.3 * math.pi / 2)))
    H.nuslerp(zero, zero.clone(), 0.3, out=out, backend=backend)
    assert not out.any()
    # the base: x_i − b colinear
    H.nuslerp(x + 1.0, 2 * x + 1.0, 0.5, base=torch.ones_like(x), out=out, backend=backend)
    check(out, nuslerp64(0.5, x + 1.0, 2 * x + 1.0, base=torch.ones_like(x)), [x, 2 * x], [0.5, 0.5], backend,
          torch.ones_like(x))


def test_nuslerp_t_from_the_weights():
    assert H.nuslerp_t(1.0, 3.0) == 0.75
    assert H.nuslerp_t(1.0, -1.0) == 0.5  # |w_0 + w_1| < 1e-6: mergekit's 0.5
    assert H.nuslerp_t(-1.0, 3.0) == 1.5  # not clamped, as in mergekit


@pytest.mark.parametrize("backend", BACKENDS)
def test_multislerp_fallbacks(backend):
    x = nonzero_randn(777, torch.float32)
    out = torch.empty_like(x)
    # two antipodal inputs with equal weights: mergekit's linear fallback (here 0)
    c = H.multislerp([x, -x], [1.0, 1.0], out=out, backend=backend)
    assert c == [0.5, 0.5] and out.abs().max() == 0.0
    # three: the error, as mergekit raises
    with pytest.raises(H.ZeroMean, match="weighted mean of the unit vectors is zero"):
        H.multislerp([x, -x, x], [1.0, 2.0, 1.0], out=out, backend=backend)
    with pytest.raises(ValueError):
        multislerp64([x, -x, x], [1.0, 2.0, 1.0])
    # one model: a copy, bit for bit
    y = nonzero_randn(777, torch.bfloat16)
    got = torch.empty_like(y)
    H.multislerp([y], [3.0], base=torch.zeros_like(y), out=got, backend=backend)
    assert_exact(got, y)
    # a zero input among others; normalize_weights off
    z = torch.zeros_like(x)
    w = [1.0, 0.5, 0.25]
    c = H.multislerp([x, z, 2 * x + 1], w, normalize_weights=False, out=out, backend=backend)
    check(out, multislerp64([x, z, 2 * x + 1], w, normalize=False), [x, z, 2 * x + 1], c, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_karcher_edge_cases(backend):
    x = nonzero_randn(513, torch.float32)
    out = torch.empty_like(x)
    H.karcher([x], out=out, backend=backend)
    assert_exact(out, x)
    z = torch.zeros_like(x)
    assert H.karcher([z, z.clone()], out=out, backend=backend) == [0.0, 0.0] and not out.any()
    # exact opposites: the mean starts at the first unit vector and the step is exactly zero
    H.karcher([x, -x], out=out, backend=backend)
    check(out, karcher64([x, -x]), [x, -x], [1.0, 1.0], backend)
    assert torch.allclose(out, x, rtol=1e-6, atol=1e-7)
    # a zero input: left out of the mean, counted in the norm scale (1/N of each norm)
    c = H.karcher([x, z, 2 * x], out=out, backend=backend)
    check(out, karcher64([x, z, 2 * x]), [x, z, 2 * x], c, backend)
    # max_iter = 0: the normalised mean, scaled
    c = H.karcher([x, x + 1], max_iter=0, out=out, backend=backend)
    check(out, karcher64([x, x + 1], max_iter=0), [x, x + 1], c, backend)


def test_non_finite_inputs_give_non_finite_outputs():
    """The engine names the input holding a NaN/Inf from a non-finite output (merge/engine.py)."""
    x = nonzero_randn(100, torch.float32)
    bad = x.clone()
    bad[7] = math.inf
    out = torch.empty_like(x)
    for run in (lambda: H.nuslerp(x, bad, 0.5, out=out), lambda: H.multislerp([x, bad, x + 1], [1, 1, 1], out=out),
                lambda: H.karcher([x, bad], out=out), lambda: H.nuslerp_rows(x, bad, 0.5, 10, out=out)):
        run()
        assert not torch.isfinite(out).all()


def test_coefficient_forms_match_the_per_element_oracles_in_float64():
    """The Gram-matrix formulation (the kernels' *_ref) is mergekit's arithmetic, to float64 rounding."""
    for seed in range(5):
        base, xs = family(2001, torch.float64, 4, seed=seed, spread=2.0)
        for b in (None, base):
            assert torch.allclose(H.nuslerp_ref(xs[0], xs[1], 0.35, base=b), nuslerp64(0.35, xs[0], xs[1], base=b),
                                  rtol=1e-12, atol=1e-12)
            assert torch.allclose(H.multislerp_ref(xs, [1, 2, 3, 4], base=b), multislerp64(xs, [1, 2, 3, 4], base=b),
                                  rtol=1e-12, atol=1e-12)
        assert torch.allclose(H.karcher_ref(xs), karcher64(xs), rtol=1e-11, atol=1e-11)


def test_karcher_against_mergekits_float32_iteration():
    """mergekit iterates in float32 per element; cpift in float64 on the Gram matrix. Measured here: the
    float32 iteration stays within 2e-6 of the scale of the float64 result (its arccos near 1 and the
    float32 sums), cpift's within its float32 blend rounding."""
    worst32 = worst = 0.0
    for seed in range(4):
        _, xs = family(20001, torch.float32, 3, seed=seed, spread=3.0)
        exact = karcher64(xs)
        mk32 = karcher64(xs, dtype=torch.float32)
        out = torch.empty(20001)
        H.karcher(xs, out=out)
        scale = float(exact.abs().max())
        worst32 = max(worst32, float((mk32.double() - exact).abs().max()) / scale)
        worst = max(worst, float((out.double() - exact).abs().max()) / scale)
    print(f"karcher vs float64: mergekit's float32 iteration {worst32:.2e}, cpift {worst:.2e} of the scale")
    assert worst <= 4 * torch.finfo(torch.float32).eps and worst32 <= 2e-6
