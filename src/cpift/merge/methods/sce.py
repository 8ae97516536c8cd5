"""sce: SCE (select, calculate, erase; Deng et al. 2024, FuseChat, arXiv:2408.07990) over a base b and
N ≥ 1 fine-tunes x_i, mergekit 0.1.5's ``sce``.

Per tensor, τ_i = x_i − b. With ``select_topk`` < 1 the entries of largest variance over the models
are kept (k = int(count_nonzero(Var_i τ_i) · select_topk); ties: lowest flat index first, where
mergekit's torch.topk breaks them its own way, so tied variances may keep other entries there), the
rest of every τ_i zeroed. Weights w_i = mean(τ_i²) / Σ_j mean(τ_j²) (1/N when that sum is below 1e-6).
Sign s = +1 where Σ_i τ_i ≥ 0, else −1; out = b + Σ_{sign τ_i = s} w_i τ_i / max(Σ_{same i} w_i, 1e-6).
mergekit's sce has no per-model weight and no lambda. The kernels and the precision: kernels/sce.py.
"""

from __future__ import annotations

from typing import Any, Sequence

from .declare import Inputs, method
from .registry import MergekitSpec, ParamSpec

SELECT_TOPK = ParamSpec("select_topk", "--select-topk", "number", 1.0,
                        "Share in [0, 1] of the entries (those of non-zero variance over the models) kept, by "
                        "variance.", lo=0.0, hi=1.0, mergekit="select_topk", mergekit_default=1.0)


@method("sce", inputs=Inputs("required"), params=(SELECT_TOPK,),
        definition="keep the select_topk share of entries of largest variance of the deltas over the models, weigh "
        "model i by mean(δ_i²) / Σ_j mean(δ_j²), elect s = sign(Σ δ_i) (+1 at 0), "
        "b + Σ_{sign δ_i = s} w_i δ_i / max(Σ_{same i} w_i, 1e-6)",
        paper="Deng et al. 2024, FuseChat (SCE: select, calculate, erase; arXiv:2408.07990)",
        summary="SCE: keep the entries where the deltas vary most, weigh models by their mean squared delta, "
        "TIES-style erase.",
        mergekit=MergekitSpec((), ("select_topk", "int8_mask"), normalize=None, cpift_normalize=None),
        bench={"--select-topk": "0.5"})
def sce_tensor(xs: Sequence[Any], out: Any, *, backend: str | None, shape: Any, select_topk: float) -> None:
    from cpift.kernels.sce import sce_merge
    from cpift.kernels.threads import serial_reductions

    with serial_reductions():  # the same weights whatever --threads is
        sce_merge(xs[0], list(xs[1:]), select_topk, out=out, backend=backend)
