"""consensus_ta: Consensus Task Arithmetic with TALL masks (Wang et al. 2024, arXiv:2405.07813),
mergekitty 0.3.1's ``consensus_ta``: task arithmetic over a base b and N ≥ 1 fine-tunes, its merged
delta kept only where at least k tasks agree with it (|δ_i| > λ_i·|m − δ_i|). Definition and
precision: kernels/tall.py."""

from __future__ import annotations

from typing import Any, Sequence

from .declare import Inputs, method
from .registry import WEIGHTS, MergekitSpec, ParamSpec

TALL_LAMBDA = ParamSpec("tall_lambda", "--tall-lambda", "number_or_per_model", 1.0,
                        "TALL mask λ: task i keeps an entry when |δ_i| > λ·|m − δ_i| (≥ 0). One value, or "
                        "comma-separated per model.", lo=0.0, mergekit="lambda", mergekit_default=1.0)
K = ParamSpec("k", "--k", "integer", 1, "Keep the merged delta where at least k TALL masks hold (an integer ≥ 0).",
              lo=0.0, mergekit="k", mergekit_default=1)
PAPER = ("Wang et al. 2024, Localizing Task Information for Improved Model Merging and Compression "
         "(TALL masks, arXiv:2405.07813), as mergekitty 0.3.1 implements it")
TALL = "; keep m where Σ_i [|δ_i| > λ_i·|m − δ_i|] ≥ k (the untrimmed δ_i), b + m"


def normalize_flag(default: bool) -> ParamSpec:
    return ParamSpec("normalize", "--normalize", "flag", default,
                     "Divide the merged delta by the (agreeing) weights' sum." if not default else
                     "Divide the merged delta by the agreeing weights' sum (default); --no-normalize sums them.",
                     mergekit="normalize", mergekit_default=default)


@method("consensus_ta", inputs=Inputs("required"), params=(WEIGHTS, TALL_LAMBDA, K, normalize_flag(False)),
        definition="m = Σ w_i δ_i (normalize: / Σ w_i), δ_i = x_i − b" + TALL, paper=PAPER,
        summary="Consensus task arithmetic: keep the merged delta where at least k tasks' TALL masks agree.",
        mergekit=MergekitSpec(("weight", "lambda"), ("k", "normalize", "rescale", "int8_mask"), normalize=False,
                              cpift_normalize=False, rescale=False, cpift_rescale=False))
def consensus_ta_tensor(xs: Sequence[Any], out: Any, *, backend: str | None, shape: Any, weights: list[float],
                        tall_lambda: list[float], k: int, normalize: bool) -> None:
    from cpift.kernels.tall import tall_merge

    tall_merge(xs[0], list(xs[1:]), weights, tall_lambda, k, normalize=normalize, out=out, backend=backend)
