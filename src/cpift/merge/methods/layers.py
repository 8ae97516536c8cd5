"""passthrough: one model's tensors as they are, or each times ``scale`` (mergekit's ``passthrough``).

With a mergekit config of several ``slices`` (merge/mergekit/stack.py) the one model is a view that
stacks layer ranges of several models (frankenmerges, SOLAR-style depth up-scaling); the tensors are
copied bit for bit. ``scale`` multiplies in the tensor's dtype, as mergekit's ``tensor * scale`` does
(one rounding); a copy and a multiply need no fused kernel (torch runs both on CPU and CUDA).
"""

from __future__ import annotations

from typing import Any

from cpift.merge.engine import MergeResult, open_models, stream_merge
from cpift.merge.io.dryrun import MergePlan
from cpift.merge.options import MergeOptions, merge_options

from .params import Param, PathLike, check_all, float_names, value


def passthrough(model: PathLike, out: PathLike, *, scale: Param | None = None,
                options: MergeOptions | None = None, **overrides: Any) -> MergeResult | MergePlan:
    """Copy one model's tensors (times ``scale`` where given).

    Args:
        model: the model directory (or a stacked layer view from a mergekit ``slices`` config).
        out: output directory.
        scale: None (copy bit for bit), a number, or a function of the tensor name (mergekit filters).
        options, **overrides: the common merge options (merge/options.py).

    Returns:
        MergeResult (with ``dry_run``: the MergePlan).

    Example:
        >>> passthrough("a", "out", scale=0.5)
    """
    opts = merge_options(options, overrides)
    ckpts = open_models([model])
    if scale is not None:
        check_all(scale, float_names(ckpts), "scale")

    def combine(name, xs, out_t):
        s = None if scale is None else value(scale, name, "scale")
        out_t.copy_(xs[0] if s is None or s == 1.0 else xs[0] * s)

    return stream_merge("passthrough", ckpts, out, combine, params={"scale": scale}, options=opts)
