"""linear: the weighted average Σ w_i x_i / Σ w_i of two or more models (mergekit's ``linear``)."""

from __future__ import annotations

from typing import Any, Sequence

from cpift.errors import ParameterError
from cpift.kernels.linear import linear as linear_kernel
from cpift.merge.engine import MergeResult, open_models, stream_merge
from cpift.merge.io.dryrun import MergePlan
from cpift.merge.options import MergeOptions, merge_options

from .params import Param, PathLike, check_all, check_scale, float_names, value, weights_for


def linear(models: Sequence[PathLike], out: PathLike, *, weights: Sequence[Param] | None = None,
           options: MergeOptions | None = None, **overrides: Any) -> MergeResult | MergePlan:
    """Weighted average Σ w_i x_i / Σ w_i of two or more models.

    Args:
        models: model directories (the first one's config and tokenizer are copied).
        out: output directory (must not exist unless ``overwrite=True``).
        weights: one weight per model (default all 1); their sum must not be 0.
        options, **overrides: how to read, compute and write (merge/options.py: dtype, out_dtype,
            max_shard_size, overwrite, allow_nonfinite, copy_tokenizer_from, progress, backend,
            device, dry_run, resume).

    Returns:
        MergeResult with counts, bytes and seconds (with ``dry_run``: the MergePlan).

    Raises:
        ParameterError, CheckpointError, MismatchError, NonFiniteError, OutputError.

    Example:
        >>> linear(["a", "b"], "out", weights=[1, 3])
    """
    opts = merge_options(options, overrides)
    if len(models) < 2:
        raise ParameterError(f"models: linear needs at least 2 models, got {len(models)}")
    ws = weights_for(weights, len(models))
    ckpts = open_models(models)
    names = float_names(ckpts)
    for i, w in enumerate(ws):
        check_all(w, names, f"weights[{i}]")
    check_scale(ws, names)
    for n in names if any(callable(w) for w in ws) else names[:1]:
        if sum(value(w, n, "weights") for w in ws) == 0:
            raise ParameterError(f"weights: sum to 0 for tensor '{n}' (a linear merge divides by it)")

    be = opts.backend

    def combine(name, xs, out_t):
        linear_kernel(xs, [value(w, name, "weights") for w in ws], out=out_t, backend=be)

    return stream_merge("linear", ckpts, out, combine, params={"weights": ws}, **opts.as_kwargs())
