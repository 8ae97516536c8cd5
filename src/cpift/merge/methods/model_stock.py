"""model_stock: Model Stock over a base b and N ≥ 2 fine-tunes x_i (mergekit's ``model_stock``).

Per tensor, δ_i = x_i − b; c = the mean over pairs i < j of cos(δ_i, δ_j); t = N·c / (1 + (N−1)·c);
out = t·mean_i x_i + (1−t)·b (t = 0 where the denominator is within 1e-6 of 0, as in mergekit).
``filter_wise``: c and t per row of the last dimension (1-D tensors: one row). The kernels and the
precision: kernels/model_stock.py.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .declare import Inputs, method
from .registry import MergekitSpec, ParamSpec

FILTER_WISE = ParamSpec("filter_wise", "--filter-wise", "flag", False,
                        "One t per row of the last dimension instead of one per tensor (torch ops, not fused).",
                        mergekit="filter_wise", mergekit_default=False)


def _notes(values: Mapping[str, Any]) -> list[str]:
    return (["note: filter_wise: the per-row cosines and blend run as torch operations (no fused kernel for "
             "them yet)"] if values["filter_wise"] else [])


@method("model_stock", inputs=Inputs("required", min_models=2), params=(FILTER_WISE,),
        definition="c = mean pairwise cosine of the deltas x_i − b, t = N·c / (1 + (N−1)·c), "
                   "t·mean x_i + (1 − t)·b (t = 0 where 1 + (N−1)·c ≈ 0)",
        paper="Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models (arXiv:2403.19522)",
        summary="Model Stock: move from the base towards the fine-tunes' average by a ratio set by their deltas' "
                "angle.",
        mergekit=MergekitSpec((), ("filter_wise",), normalize=None, cpift_normalize=None), bench={}, notes=_notes)
def model_stock_tensor(xs: Sequence[Any], out: Any, *, backend: str | None, shape: Any, filter_wise: bool) -> None:
    from cpift.kernels.model_stock import model_stock, model_stock_rows
    from cpift.kernels.threads import serial_reductions

    if filter_wise and len(shape) > 1:
        with serial_reductions():  # the same t per row whatever --threads is
            model_stock_rows(xs[0], xs[1:], shape[-1], out=out)
    else:
        model_stock(xs[0], xs[1:], out=out, backend=backend)  # reduction serial inside, blend threaded
