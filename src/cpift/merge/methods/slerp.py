"""slerp: spherical interpolation of two models, each tensor one vector (mergekit's ``slerp``; the
definition: docs of kernels/slerp.py). Matches mergekit (colinearity threshold 0.9995, epsilon 1e-8)."""

from __future__ import annotations

from typing import Any, Sequence

from .declare import Inputs, method
from .registry import MergekitSpec, ParamSpec

T = ParamSpec("t", "--t", "number", 0.5, "Interpolation factor in [0, 1]: 0 gives MODEL_A, 1 gives MODEL_B.",
              lo=0.0, hi=1.0, mergekit="t")


@method("slerp", inputs=Inputs("pair"), params=(T,),
        definition="spherical interpolation, each tensor one vector; t = 0 gives the first model",
        paper="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH)",
        summary="Spherical interpolation of two models, tensor by tensor (each tensor one vector).",
        mergekit=MergekitSpec((), ("t", "int8_mask"), normalize=None, cpift_normalize=None), bench={"--t": "0.3"})
def slerp_tensor(xs: Sequence[Any], out: Any, *, backend: str | None, shape: Any, t: float) -> None:
    from cpift.kernels.slerp import slerp_blend, slerp_coefficients, slerp_reduce
    from cpift.kernels.threads import serial_reductions

    a, b = xs
    with serial_reductions():
        aa, bb, ab = slerp_reduce(a, b, backend=backend)
    ca, cb = slerp_coefficients(aa, bb, ab, t)
    slerp_blend(a, b, ca, cb, out=out, backend=backend)
