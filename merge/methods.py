"""The merge methods, each a typed function over model directories: linear, slerp, task arithmetic,
TIES, DARE. Inputs x_i, base b, weights w_i, deltas δ_i = x_i − b:

- linear:          Σ w_i x_i / Σ w_i
- slerp:           DESIGN §2 over the whole tensor as one vector (t = 0 gives model_a)
- task_arithmetic: b + λ Σ w_i δ_i
- ties:            trim each δ_i to its k = floor(density·numel) largest |δ| (ties: lowest index first),
                   s = sign(Σ w_i δ_i); b + λ Σ_{sign δ_i = s ≠ 0} w_i δ_i / Σ_{same i} w_i (0 if none agree)
- dare_linear/dare_ties: keep each δ entry with probability density (seeded counter-based RNG),
                   scale kept entries by 1/density, then combine as task_arithmetic / ties

A parameter is a number or a function of the tensor name (mergekit-style gradients and filters come in
as functions from cpift.merge.config). Every value is validated before anything is written.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Callable, Sequence, Union

from cpift.kernels.dare import tensor_seed
from cpift.kernels.linear import linear as linear_kernel
from cpift.kernels.select import magnitude_cut
from cpift.kernels.slerp import slerp_blend, slerp_coefficients, slerp_reduce
from cpift.kernels.ties import delta_merge

from .engine import MergeResult, model_paths, open_models, stream_merge
from .errors import ParameterError

Param = Union[float, Callable[[str], float]]
PathLike = Union[str, os.PathLike]

# Largest finite float32: the kernels compute in float32, so a parameter (or a sum of weights, or
# lambda times them) beyond it would turn into inf there and the merge into NaN.
F32_MAX = 3.4028234663852886e38


def _value(p: Param, name: str, field: str, *, lo: float = -math.inf, hi: float = math.inf,
           lo_open: bool = False) -> float:
    """Resolve a parameter for one tensor and range-check it; the error names field and tensor."""
    v = p(name) if callable(p) else p
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise ParameterError(f"{field}: expected a number, got {v!r}") from None
    bad_lo = v <= lo if lo_open else v < lo
    if not math.isfinite(v) or bad_lo or v > hi:
        lo_s = "(" if lo_open else "["
        where = f" for tensor '{name}'" if callable(p) else ""
        raise ParameterError(f"{field}: {v} is outside {lo_s}{lo}, {hi}]{where}")
    if abs(v) > F32_MAX:
        where = f" for tensor '{name}'" if callable(p) else ""
        raise ParameterError(f"{field}: {v:g} overflows float32, in which the merge computes "
                             f"(|value| must be at most {F32_MAX:.7g}){where}")
    return v


def _check_scale(ws: list[Param], names: list[str], *, lam: float = 1.0) -> None:
    """Σ|w_i| (and λ·Σ|w_i|) must stay finite in float32 for every tensor."""
    for n in names if any(callable(w) for w in ws) else names[:1]:
        total = sum(abs(_value(w, n, "weights")) for w in ws)
        if total > F32_MAX:
            raise ParameterError(f"weights: their magnitudes sum to {total:g}, which overflows float32 "
                                 f"(at most {F32_MAX:.7g})")
        if abs(lam) * total > F32_MAX:
            raise ParameterError(f"lambda: {lam:g} times the weights' sum {total:g} overflows float32 "
                                 f"(at most {F32_MAX:.7g})")


def _check_all(p: Param, names: list[str], field: str, **kw) -> None:
    """Validate a parameter for every tensor before the merge starts."""
    for n in names if callable(p) else names[:1]:
        _value(p, n, field, **kw)


def _weights(weights: Sequence[Param] | None, n: int) -> list[Param]:
    if weights is None:
        return [1.0] * n
    weights = list(weights)
    if len(weights) != n:
        raise ParameterError(f"weights: got {len(weights)} values for {n} models")
    return weights


def _per_model(p: Param | Sequence[Param], n: int, field: str) -> list[Param]:
    if isinstance(p, (list, tuple)):
        if len(p) != n:
            raise ParameterError(f"{field}: got {len(p)} values for {n} models")
        return list(p)
    return [p] * n


@contextmanager
def serial_reductions():
    """Run the enclosed torch CPU reductions on one thread, so their result does not depend on the
    thread count. torch's (MKL's) dot and sum split a vector among threads and add the partial sums
    in another order, so SLERP's norms and dot product, and through them its coefficients and some
    output bits, would change with --threads. One thread is also faster here: the reduction reads
    two vectors once, and thread barriers stall when another process holds a core (5x measured on
    2 shared cores).
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _float_names(models) -> list[str]:
    return [n for n in models[0].names() if models[0].info(n).dtype.is_floating_point] or ["<none>"]


def linear(models: Sequence[PathLike], out: PathLike, *, weights: Sequence[Param] | None = None,
           **common) -> MergeResult:
    """Weighted average Σ w_i x_i / Σ w_i of two or more models.

    Args:
        models: model directories (the first one's config and tokenizer are copied).
        out: output directory (must not exist unless ``overwrite=True``).
        weights: one weight per model (default all 1); their sum must not be 0.
        **common: dtype, out_dtype, max_shard_size, overwrite, allow_nonfinite,
            copy_tokenizer_from, progress.

    Returns:
        MergeResult with counts, bytes and seconds.

    Raises:
        ParameterError, CheckpointError, MismatchError, NonFiniteError, OutputError.

    Example:
        >>> linear(["a", "b"], "out", weights=[1, 3])
    """
    if len(models) < 2:
        raise ParameterError(f"models: linear needs at least 2 models, got {len(models)}")
    ws = _weights(weights, len(models))
    ckpts = open_models(models)
    names = _float_names(ckpts)
    for i, w in enumerate(ws):
        _check_all(w, names, f"weights[{i}]")
    _check_scale(ws, names)
    for n in names if any(callable(w) for w in ws) else names[:1]:
        if sum(_value(w, n, "weights") for w in ws) == 0:
            raise ParameterError(f"weights: sum to 0 for tensor '{n}' (a linear merge divides by it)")

    be = common.get("backend")

    def combine(name, xs, out_t):
        linear_kernel(xs, [_value(w, name, "weights") for w in ws], out=out_t, backend=be)

    return stream_merge("linear", ckpts, out, combine, params={"weights": ws}, **common)


def slerp(model_a: PathLike, model_b: PathLike, out: PathLike, *, t: Param = 0.5, **common) -> MergeResult:
    """Spherical interpolation of two models, each tensor one vector (DESIGN §2); t = 0 gives model_a.

    Matches mergekit's ``slerp`` (same colinearity threshold 0.9995 and epsilon 1e-8).

    Example:
        >>> slerp("a", "b", "out", t=0.3)
    """
    ckpts = open_models([model_a, model_b])
    _check_all(t, _float_names(ckpts), "t", lo=0.0, hi=1.0)

    be = common.get("backend")

    def combine(name, xs, out_t):
        a, b = xs
        with serial_reductions():
            aa, bb, ab = slerp_reduce(a, b, backend=be)
        ca, cb = slerp_coefficients(aa, bb, ab, _value(t, name, "t", lo=0.0, hi=1.0))
        slerp_blend(a, b, ca, cb, out=out_t, backend=be)

    return stream_merge("slerp", ckpts, out, combine, params={"t": t}, **common)


def _delta_method(method: str, base: PathLike, models: Sequence[PathLike], out: PathLike, *,
                  weights, lam: float, density=None, trim: bool, drop: bool, elect_sign: bool,
                  seed: int = 0, global_trim: bool = False, normalize: bool = True,
                  **common) -> MergeResult:
    if len(models) < 1:
        raise ParameterError(f"models: {method} needs at least 1 model besides the base")
    lam = _value(lam, "", "lambda")
    ws = _weights(weights, len(models))
    ckpts = open_models([base, *models])
    names = _float_names(ckpts)
    for i, w in enumerate(ws):
        _check_all(w, names, f"weights[{i}]")
    _check_scale(ws, names, lam=lam)
    ds = _per_model(density if density is not None else 1.0, len(models), "density")
    for i, d in enumerate(ds):
        field = f"density[{i}]" if isinstance(density, (list, tuple)) else "density"
        _check_all(d, names, field, lo=0.0, hi=1.0, lo_open=True)
    if not isinstance(seed, int) or seed < 0:
        raise ParameterError(f"seed: expected a non-negative integer, got {seed!r}")
    global_cuts = None
    if trim and global_trim:
        if any(callable(d) for d in ds):
            raise ParameterError("density: --global-trim needs one constant density per model")
        from .global_trim import global_magnitude_cuts
        from .publish import check_output

        # Refuse a bad -o before the full pass over the inputs, not after it (stream_merge checks again).
        check_output(out, overwrite=common.get("overwrite", False),
                     inputs=[*model_paths(ckpts), common.get("copy_tokenizer_from"), *common.get("inputs", ())])
        if not common.get("dry_run"):  # a dry run validates; the cuts cost a full pass over the inputs
            global_cuts = global_magnitude_cuts(ckpts[0], ckpts[1:], [float(d) for d in ds])

    be = common.get("backend")

    def combine(name, xs, out_t):
        b, rest = xs[0], xs[1:]
        w = [_value(p, name, "weights") for p in ws]
        d = [_value(p, name, "density", lo=0.0, hi=1.0, lo_open=True) for p in ds]
        cuts = None
        if trim:
            cuts = (global_cuts[name] if global_cuts is not None else
                    [magnitude_cut(x, b, math.floor(di * x.numel()), backend=be) for x, di in zip(rest, d)])
        delta_merge(b, rest, w, lam=lam, cuts=cuts, elect_sign=elect_sign, normalize=normalize,
                    drop_density=d if drop else None,
                    drop_seeds=[tensor_seed(seed, name, i) for i in range(len(rest))] if drop else None,
                    out=out_t, backend=be)

    # What the card shows and the recipe reproduces: only the parameters this method uses.
    params = {"weights": ws, **({"density": ds} if trim or drop else {}), "lambda": lam,
              **({"normalize": normalize} if elect_sign else {}),
              **({"global_trim": global_trim} if trim else {}), **({"seed": seed} if drop else {})}
    return stream_merge(method, ckpts, out, combine, params=params, **common)


def task_arithmetic(base: PathLike, models: Sequence[PathLike], out: PathLike, *,
                    weights: Sequence[Param] | None = None, lam: float = 1.0, **common) -> MergeResult:
    """b + λ Σ w_i (x_i − b).

    Example:
        >>> task_arithmetic("base", ["math", "code"], "out", weights=[0.5, 0.7], lam=0.8)
    """
    return _delta_method("task_arithmetic", base, models, out, weights=weights, lam=lam,
                         trim=False, drop=False, elect_sign=False, **common)


def ties(base: PathLike, models: Sequence[PathLike], out: PathLike, *,
         weights: Sequence[Param] | None = None, density: Param | Sequence[Param] = 1.0,
         lam: float = 1.0, global_trim: bool = False, normalize: bool = True, **common) -> MergeResult:
    """TIES: trim to the top-density share of |δ| (per tensor, or over the whole model with
    ``global_trim``), elect the sign, average the agreeing deltas (``normalize=False``: sum them).

    Example:
        >>> ties("base", ["a", "b", "c"], "out", weights=[1, 0.5, 0.8], density=0.3)
    """
    return _delta_method("ties", base, models, out, weights=weights, lam=lam, density=density,
                         trim=True, drop=False, elect_sign=True, global_trim=global_trim,
                         normalize=normalize, **common)


def dare_linear(base: PathLike, models: Sequence[PathLike], out: PathLike, *,
                weights: Sequence[Param] | None = None, density: Param | Sequence[Param] = 0.5,
                lam: float = 1.0, seed: int = 0, **common) -> MergeResult:
    """DARE then task arithmetic: each δ entry kept with probability density, rescaled by 1/density.

    The drop mask depends only on (seed, tensor name, model index, flat index).
    """
    return _delta_method("dare_linear", base, models, out, weights=weights, lam=lam, density=density,
                         trim=False, drop=True, elect_sign=False, seed=seed, **common)


def dare_ties(base: PathLike, models: Sequence[PathLike], out: PathLike, *,
              weights: Sequence[Param] | None = None, density: Param | Sequence[Param] = 0.5,
              lam: float = 1.0, seed: int = 0, normalize: bool = True, **common) -> MergeResult:
    """DARE then TIES sign election and disjoint mean (``normalize=False``, mergekit's default for
    dare_ties: the agreeing deltas are summed, not averaged)."""
    return _delta_method("dare_ties", base, models, out, weights=weights, lam=lam, density=density,
                         trim=False, drop=True, elect_sign=True, seed=seed, normalize=normalize, **common)
