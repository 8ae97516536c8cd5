"""slerp: spherical interpolation of two models, each tensor one vector (docs/cpi-ft.md#slerp; mergekit's ``slerp``)."""

from __future__ import annotations

from typing import Any

from cpift.kernels.slerp import slerp_blend, slerp_coefficients, slerp_reduce
from cpift.kernels.threads import serial_reductions
from cpift.merge.engine import MergeResult, open_models, stream_merge
from cpift.merge.io.dryrun import MergePlan
from cpift.merge.options import MergeOptions, merge_options

from .params import Param, PathLike, check_all, float_names, value


def slerp(model_a: PathLike, model_b: PathLike, out: PathLike, *, t: Param = 0.5,
          options: MergeOptions | None = None, **overrides: Any) -> MergeResult | MergePlan:
    """Spherical interpolation of two models, each tensor one vector (docs/cpi-ft.md#slerp); t = 0 gives model_a.

    Matches mergekit's ``slerp`` (same colinearity threshold 0.9995 and epsilon 1e-8).

    Example:
        >>> slerp("a", "b", "out", t=0.3)
    """
    opts = merge_options(options, overrides)
    ckpts = open_models([model_a, model_b])
    check_all(t, float_names(ckpts), "t", lo=0.0, hi=1.0)

    be = opts.backend

    def combine(name, xs, out_t):
        a, b = xs
        with serial_reductions():
            aa, bb, ab = slerp_reduce(a, b, backend=be)
        ca, cb = slerp_coefficients(aa, bb, ab, value(t, name, "t", lo=0.0, hi=1.0))
        slerp_blend(a, b, ca, cb, out=out_t, backend=be)

    return stream_merge("slerp", ckpts, out, combine, params={"t": t}, **opts.as_kwargs())
