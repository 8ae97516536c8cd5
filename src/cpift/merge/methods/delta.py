"""The delta methods over a base b, inputs x_i, weights w_i, deltas δ_i = x_i − b:

- task_arithmetic: b + λ Σ w_i δ_i
- ties:            trim each δ_i to its k = floor(density·numel) largest |δ| (ties: lowest index first),
                   s = sign(Σ w_i δ_i); b + λ Σ_{sign δ_i = s ≠ 0} w_i δ_i / Σ_{same i} w_i (0 if none agree);
                   ``rescale`` (mergekit's L1 rescale): each trimmed δ_i × Σ|δ_i| / Σ|trimmed δ_i| (unscaled
                   when either sum is below 1e-7), a per-tensor scale of the numerator only, as in mergekit
- dare_linear/dare_ties: keep each δ entry with probability density (seeded counter-based RNG),
                   scale kept entries by 1/density, then combine as task_arithmetic / ties
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from cpift.errors import ParameterError
from cpift.kernels.dare import tensor_seed
from cpift.kernels.select import Cut, cut_mask, magnitude_cut
from cpift.kernels.ties import delta_merge
from cpift.merge.engine import MergeResult, model_paths, open_models, stream_merge
from cpift.merge.io.device import check_backend, parse_device
from cpift.merge.io.dryrun import MergePlan
from cpift.merge.io.publish import check_output
from cpift.merge.methods.global_trim import global_magnitude_cuts
from cpift.merge.options import MergeOptions, merge_options

from .params import Param, PathLike, check_all, check_scale, float_names, per_model, value, weights_for

RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor: below this either L1 norm leaves the delta as is


def l1_scale(x: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> float:
    """mergekit's L1 rescale of a masked delta: Σ|δ| / Σ|kept δ| (1 when either is below 1e-7)."""
    d = torch.abs(x.float() - b.float()).double()
    before, after = float(d.sum()), float(d[keep].sum())
    return 1.0 if before < RESCALE_EPS or after < RESCALE_EPS else before / after


def trim_l1_scale(x: torch.Tensor, b: torch.Tensor, cut: Cut) -> float:
    """l1_scale of the entries a TIES trim keeps (the Cut on the float32 |x − b|)."""
    return l1_scale(x, b, cut_mask(torch.abs(x.float() - b.float()), cut, 0))


def open_delta_inputs(method: str, base: PathLike, models: Sequence[PathLike], weights, lam) -> tuple:
    """The checks and opened inputs every base-plus-deltas method starts with: (λ, per-model weights,
    checkpoints [base, *models], the floating tensor names), weights and λ checked on every tensor."""
    if len(models) < 1:
        raise ParameterError(f"models: {method} needs at least 1 model besides the base")
    lam = value(lam, "", "lambda")
    ws = weights_for(weights, len(models))
    ckpts = open_models([base, *models])
    names = float_names(ckpts)
    for i, w in enumerate(ws):
        check_all(w, names, f"weights[{i}]")
    check_scale(ws, names, lam=lam)
    return lam, ws, ckpts, names


def _delta_method(method: str, base: PathLike, models: Sequence[PathLike], out: PathLike, *,
                  weights, lam: float, density=None, trim: bool, drop: bool, elect_sign: bool,
                  seed: int = 0, global_trim: bool = False, normalize: bool = True, rescale: bool = False,
                  options: MergeOptions | None = None, **overrides: Any) -> MergeResult | MergePlan:
    for fld, flag in (("normalize", normalize), ("rescale", rescale)):
        if not isinstance(flag, bool):
            raise ParameterError(f"{fld}: expected true or false, got {flag!r}")
    lam, ws, ckpts, names = open_delta_inputs(method, base, models, weights, lam)
    ds = per_model(density if density is not None else 1.0, len(models), "density")
    for i, d in enumerate(ds):
        field = f"density[{i}]" if isinstance(density, (list, tuple)) else "density"
        check_all(d, names, field, lo=0.0, hi=1.0, lo_open=True)
    if not isinstance(seed, int) or seed < 0:
        raise ParameterError(f"seed: expected a non-negative integer, got {seed!r}")
    opts = merge_options(options, overrides)
    be = opts.backend
    global_cuts = None
    if trim and global_trim:
        if any(callable(d) for d in ds):
            raise ParameterError("density: --global-trim needs one constant density per model")
        dev = parse_device(opts.device)
        check_backend(be, dev)
        # Refuse a bad -o before the full pass over the inputs, not after it (stream_merge checks again).
        check_output(out, overwrite=opts.overwrite,
                     inputs=[*model_paths(ckpts), opts.copy_tokenizer_from, *opts.inputs])
        if not opts.dry_run:  # a dry run validates; the cuts cost a full pass over the inputs
            global_cuts = global_magnitude_cuts(ckpts[0], ckpts[1:], [float(d) for d in ds], device=dev, backend=be)

    def combine(name, xs, out_t):
        b, rest = xs[0], xs[1:]
        w = [value(p, name, "weights") for p in ws]
        d = [value(p, name, "density", lo=0.0, hi=1.0, lo_open=True) for p in ds]
        cuts = None
        if trim:
            cuts = (global_cuts[name] if global_cuts is not None else
                    [magnitude_cut(x, b, math.floor(di * x.numel()), backend=be) for x, di in zip(rest, d)])
        scales = [trim_l1_scale(x, b, c) for x, c in zip(rest, cuts)] if trim and rescale else None
        delta_merge(b, rest, w, lam=lam, cuts=cuts, elect_sign=elect_sign, normalize=normalize, scales=scales,
                    drop_density=d if drop else None,
                    drop_seeds=[tensor_seed(seed, name, i) for i in range(len(rest))] if drop else None,
                    out=out_t, backend=be)

    # What the card shows and the recipe reproduces: only the parameters this method uses.
    params = {"weights": ws, **({"density": ds} if trim or drop else {}), "lambda": lam,
              **({"normalize": normalize} if elect_sign else {}),
              **({"global_trim": global_trim} if trim else {}), **({"rescale": True} if rescale else {}),
              **({"seed": seed} if drop else {})}
    return stream_merge(method, ckpts, out, combine, params=params, options=opts)


def task_arithmetic(base: PathLike, models: Sequence[PathLike], out: PathLike, *,
                    weights: Sequence[Param] | None = None, lam: float = 1.0, options: MergeOptions | None = None,
        **overrides: Any) -> MergeResult | MergePlan:
    """b + λ Σ w_i (x_i − b).

    Example:
        >>> task_arithmetic("base", ["math", "code"], "out", weights=[0.5, 0.7], lam=0.8)
    """
    return _delta_method("task_arithmetic", base, models, out, weights=weights, lam=lam,
                         trim=False, drop=False, elect_sign=False, options=options, **overrides)


def ties(base: PathLike, models: Sequence[PathLike], out: PathLike, *,
         weights: Sequence[Param] | None = None, density: Param | Sequence[Param] = 1.0,
         lam: float = 1.0, global_trim: bool = False, normalize: bool = True, rescale: bool = False,
         options: MergeOptions | None = None, **overrides: Any) -> MergeResult | MergePlan:
    """TIES: trim to the top-density share of |δ| (per tensor, or over the whole model with
    ``global_trim``), elect the sign, average the agreeing deltas (``normalize=False``: sum them;
    ``rescale``: scale each trimmed delta back to its L1 norm first, mergekit's ``rescale: true``).

    Example:
        >>> ties("base", ["a", "b", "c"], "out", weights=[1, 0.5, 0.8], density=0.3)
    """
    return _delta_method("ties", base, models, out, weights=weights, lam=lam, density=density,
                         trim=True, drop=False, elect_sign=True, global_trim=global_trim,
                         normalize=normalize, rescale=rescale, options=options, **overrides)


def dare_linear(base: PathLike, models: Sequence[PathLike], out: PathLike, *,
                weights: Sequence[Param] | None = None, density: Param | Sequence[Param] = 0.5,
                lam: float = 1.0, seed: int = 0, options: MergeOptions | None = None,
        **overrides: Any) -> MergeResult | MergePlan:
    """DARE then task arithmetic: each δ entry kept with probability density, rescaled by 1/density.

    The drop mask depends only on (seed, tensor name, model index, flat index).
    """
    return _delta_method("dare_linear", base, models, out, weights=weights, lam=lam, density=density,
                         trim=False, drop=True, elect_sign=False, seed=seed, options=options, **overrides)


def dare_ties(base: PathLike, models: Sequence[PathLike], out: PathLike, *,
              weights: Sequence[Param] | None = None, density: Param | Sequence[Param] = 0.5,
              lam: float = 1.0, seed: int = 0, normalize: bool = True, options: MergeOptions | None = None,
        **overrides: Any) -> MergeResult | MergePlan:
    """DARE then TIES sign election and disjoint mean (``normalize=False``, mergekit's default for
    dare_ties: the agreeing deltas are summed, not averaged)."""
    return _delta_method("dare_ties", base, models, out, weights=weights, lam=lam, density=density,
                         trim=False, drop=True, elect_sign=True, seed=seed, normalize=normalize, options=options,
                         **overrides)
