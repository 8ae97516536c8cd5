"""ramplus_tl: RAM+ tensor-local (arXiv:2601.13572), mergekit 0.1.5's ``ramplus_tl``: RAM (ram.py) with
each fine-tune's unique deltas scaled by λ_i = 1 + r·clamp(S_i / max(U_i, ε), 0, α), S_i and U_i the
entries of the tensor it moves together with others and alone. Kernels and precision: kernels/ram.py."""

from __future__ import annotations

from typing import Any, Sequence

from .declare import Inputs, method
from .ram import DEFINITION, EPSILON, PAPER
from .registry import MergekitSpec, ParamSpec

R = ParamSpec("r", "--r", "number", 0.1, "Gain r of a unique delta's scale λ_i = 1 + r·clamp(ρ_i, 0, α) (≥ 0).",
              lo=0.0, mergekit="r", mergekit_default=0.1)
ALPHA = ParamSpec("alpha", "--alpha", "number", 0.2, "Cap α of the shared/unique ratio ρ_i in λ_i (≥ 0).",
                  lo=0.0, mergekit="alpha", mergekit_default=0.2)


@method("ramplus_tl", inputs=Inputs("required"), params=(R, ALPHA, EPSILON),
        definition=DEFINITION + "; λ_i = 1 + r·clamp(S_i / max(U_i, ε), 0, α), S_i (U_i) the entries of the "
        "tensor model i moves with others (alone)", paper=PAPER,
        summary="RAM+ (tensor-local): RAM with each model's unique deltas scaled up by its shared/unique ratio.",
        mergekit=MergekitSpec((), ("r", "alpha", "epsilon"), normalize=None, cpift_normalize=None))
def ramplus_tl_tensor(xs: Sequence[Any], out: Any, *, backend: str | None, shape: Any, r: float, alpha: float,
                      epsilon: float) -> None:
    from cpift.kernels.ram import ram_blend, ram_counts, ramplus_scales

    base, rest = xs[0], list(xs[1:])
    shared, alone = ram_counts(base, rest, epsilon, backend=backend)
    ram_blend(base, rest, epsilon, ramplus_scales(shared, alone, r, alpha, epsilon), out=out, backend=backend)
