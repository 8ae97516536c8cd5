"""passthrough: one model's tensors as they are, or each times ``scale`` (mergekit's ``passthrough``).

With a mergekit config of several ``slices`` (merge/mergekit/stack.py) the one model is a view that
stacks layer ranges of several models (frankenmerges, SOLAR-style depth up-scaling); the tensors are
copied bit for bit. ``scale`` multiplies in the tensor's dtype, as mergekit's ``tensor * scale`` does
(one rounding); a copy and a multiply need no fused kernel (torch runs both on CPU and CUDA).
"""

from __future__ import annotations

from typing import Any, Sequence

from .declare import Inputs, method
from .registry import MergekitSpec, ParamSpec

SCALE = ParamSpec("scale", "--scale", "number", None, "Multiply every tensor by this (default: copy bit for bit).",
                  mergekit="scale", optional=True)


@method("passthrough", inputs=Inputs("none", max_models=1), params=(SCALE,),
        definition="x (or scale · x): one model's tensors; with mergekit slices, layer ranges of several models "
                   "stacked",
        paper="mergekit (Goddard et al. 2024, arXiv:2403.13257); SOLAR depth up-scaling (Kim et al. 2023, "
              "arXiv:2312.15166)",
        summary="Copy one model (times --scale); stacking layer ranges (slices) runs from a mergekit YAML.",
        mergekit=MergekitSpec(("scale",), (), normalize=None, cpift_normalize=None))
def passthrough_tensor(xs: Sequence[Any], out: Any, *, backend: str | None, shape: Any, scale: float | None) -> None:
    out.copy_(xs[0] if scale is None or scale == 1.0 else xs[0] * scale)
