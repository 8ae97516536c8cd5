"""ram: RAM, Reinforced Agent Merging (arXiv:2601.13572), mergekit 0.1.5's ``ram``, over a base b and
N ≥ 1 fine-tunes: an entry that one fine-tune moves (|x_i − b| > epsilon) takes its delta, one that
several move takes the mean of their deltas, the rest stay b. Kernels and precision: kernels/ram.py."""

from __future__ import annotations

from typing import Any, Sequence

from .declare import Inputs, method
from .registry import MergekitSpec, ParamSpec

EPSILON = ParamSpec("epsilon", "--epsilon", "number", 1e-5,
                    "A delta entry counts as a move when its magnitude exceeds this (≥ 0; mergekit's 1e-5).",
                    lo=0.0, mergekit="epsilon", mergekit_default=1e-5)
DEFINITION = ("δ_i = x_i − b, n_i = [|δ_i| > ε], c = Σ n_i; b + Σ_i n_i δ_i ([c = 1]·λ_i + [c > 1] / c), "
              "an entry moved by one model takes its delta, by several the mean of theirs")
PAPER = "Reinforced Agent Merging (arXiv:2601.13572), as mergekit 0.1.5 cites it"


@method("ram", inputs=Inputs("required"), params=(EPSILON,), definition=DEFINITION.replace("·λ_i", ""),
        paper=PAPER, summary="RAM: where one fine-tune moves an entry take its delta, where several do their mean.",
        mergekit=MergekitSpec((), ("epsilon",), normalize=None, cpift_normalize=None))
def ram_tensor(xs: Sequence[Any], out: Any, *, backend: str | None, shape: Any, epsilon: float) -> None:
    from cpift.kernels.ram import ram_blend

    ram_blend(xs[0], list(xs[1:]), epsilon, out=out, backend=backend)
