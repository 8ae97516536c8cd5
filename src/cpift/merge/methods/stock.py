"""stock: model_stock, Model Stock over a base b and N ≥ 2 fine-tunes x_i (mergekit's ``model_stock``).

Per tensor, δ_i = x_i − b; c = the mean over pairs i < j of cos(δ_i, δ_j); t = N·c / (1 + (N−1)·c);
out = t·mean_i x_i + (1−t)·b (t = 0 where the denominator is within 1e-6 of 0, as in mergekit).
``filter_wise``: c and t per row of the last dimension (1-D tensors: one row). The kernels and the
precision: kernels/model_stock.py.
"""

from __future__ import annotations

from typing import Any, Sequence

from cpift.errors import ParameterError
from cpift.kernels.model_stock import model_stock as stock_kernel
from cpift.kernels.model_stock import model_stock_rows
from cpift.kernels.threads import serial_reductions
from cpift.merge.engine import MergeResult, open_models, stream_merge
from cpift.merge.io.dryrun import MergePlan
from cpift.merge.options import MergeOptions, merge_options

from .params import PathLike


def model_stock(base: PathLike, models: Sequence[PathLike], out: PathLike, *, filter_wise: bool = False,
                options: MergeOptions | None = None, **overrides: Any) -> MergeResult | MergePlan:
    """Model Stock: move from the base towards the fine-tunes' average by t, from their deltas' angle.

    Args:
        base: the pre-trained model the fine-tunes started from (its config and tokenizer are copied).
        models: two or more fine-tuned model directories.
        out: output directory (must not exist unless ``overwrite=True``).
        filter_wise: one t per row of the last dimension instead of one per tensor (mergekit's
            ``filter_wise``); runs on torch operations, not the fused kernels.
        options, **overrides: how to read, compute and write (merge/options.py).

    Returns:
        MergeResult with counts, bytes and seconds (with ``dry_run``: the MergePlan).

    Raises:
        ParameterError, CheckpointError, MismatchError, NonFiniteError, OutputError.

    Example:
        >>> model_stock("base", ["ft1", "ft2", "ft3"], "out")
    """
    if len(models) < 2:
        raise ParameterError(f"models: model_stock needs at least 2 models besides the base, got {len(models)}")
    if not isinstance(filter_wise, bool):
        raise ParameterError(f"filter_wise: expected true or false, got {filter_wise!r}")
    opts = merge_options(options, overrides)
    ckpts = open_models([base, *models])
    be = opts.backend
    shapes = {n: ckpts[0].info(n).shape for n in ckpts[0].names()}

    def combine(name, xs, out_t):
        b, rest = xs[0], xs[1:]
        shape = shapes[name]
        if filter_wise and len(shape) > 1:
            with serial_reductions():  # the same t per row whatever --threads is
                model_stock_rows(b, rest, shape[-1], out=out_t)
        else:
            stock_kernel(b, rest, out=out_t, backend=be)  # reduction serial inside, blend threaded

    notes = (["note: filter_wise: the per-row cosines and blend run as torch operations "
              "(no fused kernel for them yet)"] if filter_wise else [])
    return stream_merge("model_stock", ckpts, out, combine, params={"filter_wise": filter_wise}, notes=notes,
                        options=opts)
