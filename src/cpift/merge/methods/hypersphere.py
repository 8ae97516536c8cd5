"""hypersphere: nuslerp, multislerp and karcher, mergekit 0.1.5's spherical merges of two or more models.

nuslerp: SLERP of exactly two models by t = w_1 / (w_0 + w_1), each tensor one vector (mergekit's
default ``nuslerp_flatten: true``), one per row of the last dimension (``flatten=False``) or one per
index along dimension 0 (``row_wise=True``, with ``flatten=False``). multislerp: barycentric
interpolation of N ≥ 1 models on the hypersphere (tangent space at the weighted mean, exponential map
back, scaled by the weighted mean norm). karcher: the Karcher (Riemannian) mean of the unit vectors with
equal weights, iterated ``max_iter`` times or until the step is below ``tol``, scaled by the mean norm.
With ``base``, nuslerp and multislerp interpolate the deltas x_i − b and add b back (mergekit's
optional base); karcher has none (mergekit counts a base_model as one more input).

Per tensor the kernels (kernels/hypersphere.py) take the N×N Gram matrix in one fused reduction pass,
compute the coefficients on the host in float64, and blend in one fused pass; the per-row nuslerp
forms run as torch operations. Differences from mergekit: float64 coefficients against mergekit's
float32 per-element arithmetic (agreement to float32 rounding), and a tensor missing from one model is
an error where mergekit's nuslerp passes the present one through.
"""

from __future__ import annotations

from typing import Any, Sequence

from cpift.errors import ParameterError
from cpift.kernels import hypersphere as sphere
from cpift.merge.engine import MergeResult, open_models, stream_merge
from cpift.merge.io.dryrun import MergePlan
from cpift.merge.options import MergeOptions, merge_options

from .params import Param, PathLike, check_all, check_scale, float_names, value, weights_for


def _flag(v: Any, field: str) -> bool:
    if not isinstance(v, bool):
        raise ParameterError(f"{field}: expected true or false, got {v!r}")
    return v


def _open(models: Sequence[PathLike], base: PathLike | None, method: str, lo: int, hi: int | None):
    models = list(models)
    if len(models) < lo or (hi is not None and len(models) > hi):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}"
        raise ParameterError(f"models: {method} merges {want} model{'s' if lo > 1 else ''}"
                             f"{' besides the base' if base is not None else ''}, got {len(models)}")
    ckpts = open_models([base, *models] if base is not None else models)
    roles = (["base"] if base is not None else []) + ["model"] * len(models)
    return ckpts, roles


def _split(xs, has_base):
    return (xs[0], xs[1:]) if has_base else (None, xs)


def nuslerp(models: Sequence[PathLike], out: PathLike, *, weights: Sequence[Param] | None = None,
            base: PathLike | None = None, flatten: bool = True, row_wise: bool = False,
            options: MergeOptions | None = None, **overrides: Any) -> MergeResult | MergePlan:
    """NuSLERP of two models: spherical interpolation by t = w_1 / (w_0 + w_1) (0.5 if that sum is ~0).

    Args:
        models: the two models.
        out: output directory (must not exist unless ``overwrite=True``).
        weights: one per model (default 1, 1: t = 0.5); only their ratio matters.
        base: optional; then the deltas x_i − base are interpolated and the base added back.
        flatten: each tensor one vector (mergekit's ``nuslerp_flatten``, default true); false: one vector
            per row of the last dimension, or along dimension 0 with ``row_wise`` (torch operations).
        row_wise: with ``flatten=False``, the vectors run along dimension 0 (``nuslerp_row_wise``).
        options, **overrides: how to read, compute and write (merge/options.py).

    Returns:
        MergeResult (with ``dry_run``: the MergePlan).

    Raises:
        ParameterError, CheckpointError, MismatchError, NonFiniteError, OutputError.

    Example:
        >>> nuslerp(["a", "b"], "out", weights=[1.0, 3.0])  # t = 0.75
    """
    flatten, row_wise = _flag(flatten, "flatten"), _flag(row_wise, "row_wise")
    ckpts, roles = _open(models, base, "nuslerp", 2, 2)
    ws = weights_for(weights, 2)
    names = float_names(ckpts)
    for w in ws:
        check_all(w, names, "weights")
    opts = merge_options(options, overrides)
    be = opts.backend
    shapes = {n: ckpts[0].info(n).shape for n in ckpts[0].names()}

    def combine(name, xs, out_t):
        b, (x0, x1) = _split(xs, base is not None)
        t = sphere.nuslerp_t(value(ws[0], name, "weights"), value(ws[1], name, "weights"))
        shape = shapes[name]
        if flatten or len(shape) < 2:
            sphere.nuslerp(x0, x1, t, base=b, out=out_t, backend=be)
        elif row_wise:
            sphere.nuslerp_columns(x0, x1, t, out_t.numel() // shape[0], base=b, out=out_t)
        else:
            sphere.nuslerp_rows(x0, x1, t, shape[-1], base=b, out=out_t)

    notes = [] if flatten else ["note: nuslerp_flatten: false: the per-row reductions and blend run as torch "
                                "operations (no fused kernel for them yet)"]
    if flatten and row_wise:
        notes.append("note: row_wise has no effect while flatten is on (each tensor is one vector, as in "
                     "mergekit, where nuslerp_flatten: true wins); add --no-flatten / nuslerp_flatten: false")
    return stream_merge("nuslerp", ckpts, out, combine, params={"weights": ws, "flatten": flatten,
                                                               "row_wise": row_wise},
                        notes=notes, roles=roles, options=opts)


def multislerp(models: Sequence[PathLike], out: PathLike, *, weights: Sequence[Param] | None = None,
               base: PathLike | None = None, normalize_weights: bool = True, eps: Param = sphere.MULTISLERP_EPS,
               options: MergeOptions | None = None, **overrides: Any) -> MergeResult | MergePlan:
    """Multi-SLERP: barycentric interpolation of N models on the hypersphere (mergekit's ``multislerp``).

    Args:
        models: one or more models (one: copied).
        out: output directory.
        weights: one per model (default all 1).
        base: optional; then the deltas x_i − base are interpolated and the base added back.
        normalize_weights: divide the weights by their sum (mergekit's default true).
        eps: mergekit's stabilising constant (added to the norms, the threshold of a zero mean).
        options, **overrides: how to read, compute and write.

    Raises:
        ParameterError: also when, for more than two models, the weighted mean of the unit vectors is
            zero for some tensor (antipodal inputs with balancing weights; mergekit raises there too).

    Example:
        >>> multislerp(["a", "b", "c"], "out", weights=[1, 1, 2], base="base")
    """
    normalize_weights = _flag(normalize_weights, "normalize_weights")
    ckpts, roles = _open(models, base, "multislerp", 1, None)
    k = len(models)
    ws = weights_for(weights, k)
    names = float_names(ckpts)
    for w in ws:
        check_all(w, names, "weights")
    check_scale(ws, names)
    check_all(eps, names, "eps", lo=0.0)

    def weights_of(name: str) -> list[float]:
        vals = [value(w, name, "weights") for w in ws]
        if normalize_weights and k > 1 and sum(vals) == 0.0:
            where = f" for tensor '{name}'" if any(callable(w) for w in ws) else ""
            raise ParameterError(f"weights: they sum to 0{where}, and normalize_weights divides by their sum")
        return vals

    weights_of(names[0])
    opts = merge_options(options, overrides)
    be = opts.backend

    def combine(name, xs, out_t):
        b, rest = _split(xs, base is not None)
        try:
            sphere.multislerp(rest, weights_of(name), base=b, normalize_weights=normalize_weights,
                              eps=value(eps, name, "eps", lo=0.0), out=out_t, backend=be)
        except sphere.ZeroMean as e:
            raise ParameterError(f"tensor '{name}': multislerp: {e}") from None

    return stream_merge("multislerp", ckpts, out, combine,
                        params={"weights": ws, "normalize_weights": normalize_weights, "eps": eps},
                        roles=roles, options=opts)


def karcher(models: Sequence[PathLike], out: PathLike, *, max_iter: Param = sphere.KARCHER_ITER,
            tol: Param = sphere.KARCHER_TOL, options: MergeOptions | None = None,
            **overrides: Any) -> MergeResult | MergePlan:
    """Karcher mean of N models on the hypersphere, equal weights (mergekit's ``karcher``).

    Args:
        models: one or more models (one: copied); a mergekit base_model is just one more of them.
        out: output directory.
        max_iter: iterations at most (an integer ≥ 0; mergekit's default 10).
        tol: below it a norm counts as zero, an angle as no step, and a step ends the iteration (1e-5).
        options, **overrides: how to read, compute and write.

    Example:
        >>> karcher(["a", "b", "c"], "out", max_iter=20)
    """
    ckpts, roles = _open(models, None, "karcher", 1, None)
    names = float_names(ckpts)
    check_all(tol, names, "tol", lo=0.0)

    def iterations(name: str) -> int:
        v = value(max_iter, name, "max_iter", lo=0.0, hi=1e6)
        if not v.is_integer():
            raise ParameterError(f"max_iter: expected a whole number of iterations, got {v:g}")
        return int(v)

    for n in names if callable(max_iter) else names[:1]:
        iterations(n)
    opts = merge_options(options, overrides)
    be = opts.backend

    def combine(name, xs, out_t):
        sphere.karcher(xs, max_iter=iterations(name), tol=value(tol, name, "tol", lo=0.0), out=out_t, backend=be)

    shown = max_iter if callable(max_iter) else iterations(names[0])
    return stream_merge("karcher", ckpts, out, combine, params={"max_iter": shown, "tol": tol}, roles=roles,
                        options=opts)
