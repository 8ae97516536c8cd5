"""linear: the weighted average Σ w_i x_i / Σ w_i of two or more models (mergekit's ``linear``; the
first model's config and tokenizer are copied). The kernel and the precision: kernels/linear.py."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from cpift.errors import ParameterError

from .declare import Inputs, method
from .params import check_scale
from .registry import WEIGHTS, MergekitSpec


def _check(values: Mapping[str, Any], tensor: str) -> None:
    check_scale(values["weights"], [tensor])
    if sum(values["weights"]) == 0:
        raise ParameterError(f"weights: sum to 0 for tensor '{tensor}' (a linear merge divides by it)")


@method("linear", inputs=Inputs("none", min_models=2), params=(WEIGHTS,), check=_check,
        definition="Σ w_i x_i / Σ w_i", paper="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
        summary="Weighted average Σ w_i x_i / Σ w_i of two or more models.",
        mergekit=MergekitSpec(("weight",), ("normalize", "int8_mask"), normalize=True, cpift_normalize=True))
def linear_tensor(xs: Sequence[Any], out: Any, *, backend: str | None, shape: Any, weights: list[float]) -> None:
    from cpift.kernels.linear import linear

    linear(list(xs), weights, out=out, backend=backend)
