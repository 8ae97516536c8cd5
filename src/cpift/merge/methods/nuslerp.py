"""nuslerp: mergekit 0.1.5's NuSLERP, spherical interpolation of exactly two models by t = w_1 / (w_0 + w_1).

Each tensor is one vector (mergekit's default ``nuslerp_flatten: true``), or one per row of the last
dimension (``flatten=False``), or one per index along dimension 0 (``row_wise=True`` with
``flatten=False``). With a base, the deltas x_i − b are interpolated and b added back (mergekit's
optional base). Kernels and precision: kernels/hypersphere.py (the Gram matrix in one fused pass,
float64 coefficients, one fused blend; the per-row forms as torch operations). A tensor missing from
one model is an error, where mergekit's nuslerp passes the present one through.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .declare import Inputs, method
from .registry import WEIGHTS, MergekitSpec, ParamSpec

FLATTEN = ParamSpec("flatten", "--flatten", "flag", True,
                    "Each tensor one vector (default); --no-flatten: one vector per row of the last dimension "
                    "(torch ops, not fused).", mergekit="nuslerp_flatten", mergekit_default=True)
ROW_WISE = ParamSpec("row_wise", "--row-wise", "flag", False,
                     "With --no-flatten: the vectors run along dimension 0 instead (torch ops, not fused).",
                     mergekit="nuslerp_row_wise", mergekit_default=False)
DEFINITION = ("SLERP of two models by t = w_1 / (w_0 + w_1) (0.5 where |w_0 + w_1| < 1e-6): cos = ⟨x_0, x_1⟩ / "
              "(max(‖x_0‖, 1e-7)·max(‖x_1‖, 1e-7)), (1 − t)·x_0 + t·x_1 where 1 − cos² ≤ 1e-16, else "
              "(sin((1 − t)θ)·x_0 + sin(tθ)·x_1) / sin θ; with a base on the deltas x_i − b, b added back")


def _notes(values: Mapping[str, Any]) -> list[str]:
    if not values["flatten"]:
        return ["note: nuslerp_flatten: false: the per-row reductions and blend run as torch operations "
                "(no fused kernel for them yet)"]
    if values["row_wise"]:
        return ["note: row_wise has no effect while flatten is on (each tensor is one vector, as in mergekit, "
                "where nuslerp_flatten: true wins); add --no-flatten / nuslerp_flatten: false"]
    return []


@method("nuslerp", inputs=Inputs("optional", min_models=2, max_models=2), params=(WEIGHTS, FLATTEN, ROW_WISE),
        definition=DEFINITION, paper="mergekit (Goddard et al. 2024, arXiv:2403.13257): NuSLERP",
        summary="NuSLERP: SLERP of two models by their weights' ratio, optionally on deltas from --base.",
        mergekit=MergekitSpec(("weight",), ("nuslerp_flatten", "nuslerp_row_wise"), normalize=None,
                              cpift_normalize=None), bench={}, notes=_notes)
def nuslerp_tensor(xs: Sequence[Any], out: Any, *, backend: str | None, shape: Any, base: Any,
                   weights: list[float], flatten: bool, row_wise: bool) -> None:
    from cpift.kernels import hypersphere as sphere

    x0, x1 = xs
    t = sphere.nuslerp_t(*weights)
    if flatten or len(shape) < 2:
        sphere.nuslerp(x0, x1, t, base=base, out=out, backend=backend)
    elif row_wise:
        sphere.nuslerp_columns(x0, x1, t, out.numel() // shape[0], base=base, out=out)
    else:
        sphere.nuslerp_rows(x0, x1, t, shape[-1], base=base, out=out)
