"""multislerp: mergekit 0.1.5's Multi-SLERP, barycentric interpolation of N ≥ 1 models on the hypersphere.

The unit vectors' weighted mean is the tangent point; their weighted tangent vectors are mapped back by
the exponential map and scaled by the weighted mean norm (one model: copied). With a base, the deltas
x_i − b are interpolated and b added back (mergekit's optional base). For more than two models a zero
weighted mean of the unit vectors is an error, as in mergekit. Kernels and precision:
kernels/hypersphere.py (the Gram matrix in one fused pass, float64 coefficients, one fused blend).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from cpift.errors import ParameterError

from .declare import Inputs, method
from .params import check_scale
from .registry import WEIGHTS, MergekitSpec, ParamSpec

NORMALIZE = ParamSpec("normalize_weights", "--normalize-weights", "flag", True,
                      "Divide the weights by their sum (default); --no-normalize-weights uses them as given.",
                      mergekit="normalize_weights", mergekit_default=True)
EPS = ParamSpec("eps", "--eps", "number", 1e-8, "Stabilising constant added to the norms (mergekit's eps).",
                lo=0.0, mergekit="eps", mergekit_default=1e-8)
DEFINITION = ("barycentric interpolation on the hypersphere: u_i = x_i / (‖x_i‖ + eps), m̂ the normalised "
              "Σ w_i u_i, τ = Σ w_i (u_i − ⟨u_i, m̂⟩ m̂), s = ‖τ‖ + eps, (m̂ cos s + τ sin(s)/s)·Σ w_i ‖x_i‖; with a "
              "base on the deltas x_i − b, b added back; ‖Σ w_i u_i‖ < eps: two models the lerp Σ w_i x_i, more "
              "an error")
PAPER = ("C. Goddard, Multi-SLERP (blog: https://goddard.blog/posts/multislerp-wow-what-a-cool-idea), as mergekit "
         "cites it")


def _check(values: Mapping[str, Any], tensor: str) -> None:
    ws = values["weights"]
    check_scale(ws, [tensor])
    if values["normalize_weights"] and len(ws) > 1 and sum(ws) == 0.0:
        raise ParameterError(f"weights: they sum to 0 for tensor '{tensor}', and normalize_weights divides by "
                             f"their sum")


@method("multislerp", inputs=Inputs("optional"), params=(WEIGHTS, NORMALIZE, EPS), check=_check,
        definition=DEFINITION, paper=PAPER,
        summary="Multi-SLERP: barycentric interpolation of N models on the hypersphere, optionally on deltas "
                "from --base.",
        mergekit=MergekitSpec(("weight",), ("normalize_weights", "eps"), normalize=None, cpift_normalize=None),
        bench={})
def multislerp_tensor(xs: Sequence[Any], out: Any, *, backend: str | None, shape: Any, base: Any,
                      weights: list[float], normalize_weights: bool, eps: float) -> None:
    from cpift.kernels import hypersphere as sphere

    try:
        sphere.multislerp(xs, weights, base=base, normalize_weights=normalize_weights, eps=eps, out=out,
                          backend=backend)
    except sphere.ZeroMean as e:
        raise ParameterError(f"multislerp: {e}") from None
