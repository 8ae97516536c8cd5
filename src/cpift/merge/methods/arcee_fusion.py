"""arcee_fusion: Arcee Fusion (mergekit 0.1.5's ``arcee_fusion``) of a base a and one other model b: the
entries whose change is an outlier of importance |b − a|·KL(softmax b ‖ softmax a) per row take b,
the rest stay a. Definition and precision: kernels/arcee_fusion.py."""

from __future__ import annotations

from typing import Any, Sequence

from .declare import Inputs, method
from .registry import MergekitSpec


@method("arcee_fusion", inputs=Inputs("pair"),
        definition="importance = |b − a|·Σ_row p log(p/q), p = softmax(b) + 1e-8, q = softmax(a) + 1e-8 per row "
        "of the last dimension; a + (b − a)·[importance ≥ Q(0.5) + 1.5·(Q(0.75) − Q(0.25))], Q the "
        "importance's quantiles (exact; mergekit samples 10^6 entries of larger tensors), a the base",
        paper="Arcee AI, Arcee Fusion (https://arcee.ai), as mergekit 0.1.5 cites it",
        summary="Arcee Fusion: take the other model's entries where their importance is an outlier, else the base.",
        mergekit=MergekitSpec((), (), normalize=None, cpift_normalize=None))
def arcee_fusion_tensor(xs: Sequence[Any], out: Any, *, backend: str | None, shape: Any) -> None:
    from cpift.kernels.arcee_fusion import arcee_fusion

    arcee_fusion(xs[0], xs[1], shape, out=out)
