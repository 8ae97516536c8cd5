"""karcher: mergekit 0.1.5's ``karcher``, the Karcher (Riemannian) mean of N ≥ 1 models on the hypersphere.

Equal weights: from the unit vectors' normalised mean, step along the mean of their log maps up to
``max_iter`` times (a step below ``tol`` stops), then scale by the mean norm (one model: copied). No base:
a mergekit base_model is one more input. Kernels and precision: kernels/hypersphere.py (the Gram matrix in
one fused pass, the iteration on it in float64, one fused blend).
"""

from __future__ import annotations

from typing import Any, Sequence

from .declare import Inputs, method
from .registry import MergekitSpec, ParamSpec

MAX_ITER = ParamSpec("max_iter", "--max-iter", "integer", 10, "Iterations at most (a whole number, 0 to 1000000).",
                     lo=0.0, hi=1e6, unit="iterations", mergekit="max_iter", mergekit_default=10)
TOL = ParamSpec("tol", "--tol", "number", 1e-5,
                "Norms and angles below it count as zero; a step below it ends the iteration.",
                lo=0.0, mergekit="tol", mergekit_default=1e-5)
DEFINITION = ("Karcher mean of the unit vectors x_i / ‖x_i‖ (norms > tol), weights 1/N: from their normalised "
              "mean, m ← exp_m(Σ_i θ_i/sin θ_i·(u_i − cos θ_i·m) / N) up to max_iter times (a step < tol stops), "
              "times Σ_i ‖x_i‖ / N")
PAPER = ("arXiv:2603.04972, as mergekit 0.1.5 cites it; the Karcher mean: Karcher 1977, Riemannian center of mass "
         "and mollifier smoothing")


@method("karcher", inputs=Inputs("none"), params=(MAX_ITER, TOL), definition=DEFINITION, paper=PAPER,
        summary="Karcher mean: the equal-weight Riemannian mean of N models on the hypersphere.",
        mergekit=MergekitSpec((), ("max_iter", "tol"), normalize=None, cpift_normalize=None), bench={})
def karcher_tensor(xs: Sequence[Any], out: Any, *, backend: str | None, shape: Any, max_iter: int,
                   tol: float) -> None:
    from cpift.kernels import hypersphere as sphere

    sphere.karcher(xs, max_iter=max_iter, tol=tol, out=out, backend=backend)
