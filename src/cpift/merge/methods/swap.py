"""swap: nearswap, mergekit 0.1.5's ``nearswap`` (its reference:
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001) of a base a and one other model b.

Per entry, w = clamp(t / max(|a − b|, 1e-6), 0, 1) and out = w·b + (1 − w)·a: entries within t of
each other take the other model's value, the rest move towards it by t. t = 0 gives the base. The
kernel and the precision: kernels/nearswap.py (mergekit's float32 operations in its order).
"""

from __future__ import annotations

from typing import Any

from cpift.errors import ParameterError
from cpift.kernels.nearswap import nearswap as nearswap_kernel
from cpift.merge.engine import MergeResult, open_models, stream_merge
from cpift.merge.io.dryrun import MergePlan
from cpift.merge.options import MergeOptions, merge_options

from .params import Param, PathLike, check_all, float_names, value


def nearswap(model_a: PathLike, model_b: PathLike, out: PathLike, *, t: Param | None = None,
             options: MergeOptions | None = None, **overrides: Any) -> MergeResult | MergePlan:
    """NearSwap: take model_b's value where the two models lie within t, else move model_a towards it by t.

    Args:
        model_a: the base (mergekit's base_model; its config and tokenizer are copied).
        model_b: the other model.
        out: output directory (must not exist unless ``overwrite=True``).
        t: the distance ≥ 0 (mergekit has no default; its reference model uses 0.0001).
        options, **overrides: how to read, compute and write (merge/options.py).

    Returns:
        MergeResult with counts, bytes and seconds (with ``dry_run``: the MergePlan).

    Raises:
        ParameterError, CheckpointError, MismatchError, NonFiniteError, OutputError.

    Example:
        >>> nearswap("base", "other", "out", t=0.0001)
    """
    if t is None:
        raise ParameterError("t: missing; nearswap needs a distance t ≥ 0 (mergekit has no default; "
                             "its reference model uses 0.0001), e.g. --t 0.0001")
    opts = merge_options(options, overrides)
    ckpts = open_models([model_a, model_b])
    check_all(t, float_names(ckpts), "t", lo=0.0)
    be = opts.backend

    def combine(name, xs, out_t):
        nearswap_kernel(xs[0], xs[1], value(t, name, "t", lo=0.0), out=out_t, backend=be)

    return stream_merge("nearswap", ckpts, out, combine, params={"t": t}, **opts.as_kwargs())
