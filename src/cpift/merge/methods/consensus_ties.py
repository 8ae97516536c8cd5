"""consensus_ties: Consensus TIES with TALL masks (Wang et al. 2024, arXiv:2405.07813), mergekitty 0.3.1's
``consensus_ties``: TIES over a base b and N ≥ 1 fine-tunes (each delta trimmed to its top-density share by
magnitude, a sign elected per entry, the agreeing deltas averaged), its merged delta kept only where at
least k tasks agree with it. Definition and precision: kernels/tall.py."""

from __future__ import annotations

import math
from typing import Any, Sequence

from .consensus_ta import PAPER, TALL, TALL_LAMBDA, K, normalize_flag
from .declare import Inputs, method
from .registry import WEIGHTS, MergekitSpec, ParamSpec

DENSITY = ParamSpec("density", "--density", "number_or_per_model", 1.0,
                    "Share of each delta kept by magnitude (k = floor(density × numel)). One value, or "
                    "comma-separated per model, each in (0, 1].", lo=0.0, hi=1.0, lo_open=True,
                    mergekit="density", mergekit_default=1.0)


@method("consensus_ties", inputs=Inputs("required"),
        params=(WEIGHTS, DENSITY, TALL_LAMBDA, K, normalize_flag(True)),
        definition="t_i = δ_i trimmed to its floor(density·n) largest |δ_i| (ties: lowest index), v_i = w_i t_i, "
        "s = sign(Σ v_i) (+1 at 0), m = Σ_{sign v_i = s} v_i (normalize: / Σ_{same i} w_i)" + TALL, paper=PAPER,
        summary="Consensus TIES: TIES, then keep the merged delta where at least k tasks' TALL masks agree.",
        mergekit=MergekitSpec(("weight", "density", "lambda"), ("k", "normalize", "rescale", "int8_mask"),
                              normalize=True, cpift_normalize=True, rescale=False, cpift_rescale=False),
        bench={"--density": "0.5"})
def consensus_ties_tensor(xs: Sequence[Any], out: Any, *, backend: str | None, shape: Any, weights: list[float],
                          density: list[float], tall_lambda: list[float], k: int, normalize: bool) -> None:
    from cpift.kernels.select import Cut, magnitude_cut
    from cpift.kernels.tall import tall_merge

    base, rest = xs[0], list(xs[1:])
    cuts = [Cut.all() if d >= 1 else magnitude_cut(x, base, math.floor(d * x.numel()), backend=backend)
            for x, d in zip(rest, density)]
    tall_merge(base, rest, weights, tall_lambda, k, cuts=cuts, elect_sign=True, normalize=normalize, out=out,
               backend=backend)
