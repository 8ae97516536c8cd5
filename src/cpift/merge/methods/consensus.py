"""consensus: sce, SCE (select, calculate, erase; Deng et al. 2024, FuseChat, arXiv:2408.07990) over a
base b and N ≥ 1 fine-tunes x_i, mergekit 0.1.5's ``sce``.

Per tensor, τ_i = x_i − b. With ``select_topk`` < 1 the entries of largest variance over the models
are kept (k = int(count_nonzero(Var_i τ_i) · select_topk); ties: lowest flat index first, where
mergekit's torch.topk breaks them its own way, so tied variances may keep other entries there), the
rest of every τ_i zeroed. Weights w_i = mean(τ_i²) / Σ_j mean(τ_j²) (1/N when that sum is below 1e-6).
Sign s = +1 where Σ_i τ_i ≥ 0, else −1; out = b + Σ_{sign τ_i = s} w_i τ_i / max(Σ_{same i} w_i, 1e-6).
mergekit's sce has no per-model weight and no lambda. The kernels and the precision: kernels/sce.py.
"""

from __future__ import annotations

from typing import Any, Sequence

from cpift.errors import ParameterError
from cpift.kernels.sce import sce_merge
from cpift.kernels.threads import serial_reductions
from cpift.merge.engine import MergeResult, open_models, stream_merge
from cpift.merge.io.dryrun import MergePlan
from cpift.merge.options import MergeOptions, merge_options

from .params import Param, PathLike, check_all, float_names, value


def sce(base: PathLike, models: Sequence[PathLike], out: PathLike, *, select_topk: Param = 1.0,
        options: MergeOptions | None = None, **overrides: Any) -> MergeResult | MergePlan:
    """SCE: keep the entries where the fine-tunes disagree most, weigh each fine-tune by its mean
    squared delta, elect a sign per entry and average the agreeing deltas.

    Args:
        base: the pre-trained model the fine-tunes started from (its config and tokenizer are copied).
        models: one or more fine-tuned model directories.
        out: output directory (must not exist unless ``overwrite=True``).
        select_topk: share in [0, 1] of the entries with non-zero variance kept (1: all; mergekit's default).
        options, **overrides: how to read, compute and write (merge/options.py).

    Returns:
        MergeResult with counts, bytes and seconds (with ``dry_run``: the MergePlan).

    Raises:
        ParameterError, CheckpointError, MismatchError, NonFiniteError, OutputError.

    Example:
        >>> sce("base", ["math", "code", "chat"], "out", select_topk=0.5)
    """
    if len(models) < 1:
        raise ParameterError("models: sce needs at least 1 model besides the base")
    opts = merge_options(options, overrides)
    ckpts = open_models([base, *models])
    check_all(select_topk, float_names(ckpts), "select_topk", lo=0.0, hi=1.0)
    be = opts.backend

    def combine(name, xs, out_t):
        topk = value(select_topk, name, "select_topk", lo=0.0, hi=1.0)
        with serial_reductions():  # the same weights whatever --threads is
            sce_merge(xs[0], xs[1:], topk, out=out_t, backend=be)

    return stream_merge("sce", ckpts, out, combine, params={"select_topk": select_topk}, **opts.as_kwargs())
