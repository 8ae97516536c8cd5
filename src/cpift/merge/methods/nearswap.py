"""nearswap: mergekit 0.1.5's ``nearswap`` (its reference:
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001) of a base a and one other model b.

Per entry, w = clamp(t / max(|a − b|, 1e-6), 0, 1) and out = w·b + (1 − w)·a: entries within t of
each other take the other model's value, the rest move towards it by t. t = 0 gives the base. The
kernel and the precision: kernels/nearswap.py (mergekit's float32 operations in its order).
"""

from __future__ import annotations

from typing import Any, Sequence

from .declare import Inputs, method
from .registry import MergekitSpec, ParamSpec

T = ParamSpec("t", "--t", "number", None,
              "Distance ≥ 0: entries of MODEL_B within t of MODEL_A (the base) are taken, the rest move by t.",
              lo=0.0, mergekit="t", missing="a distance t ≥ 0 (mergekit has no default; its reference model uses "
              "0.0001), e.g. --t 0.0001")


@method("nearswap", inputs=Inputs("pair"), params=(T,),
        definition="w = clamp(t / max(|a − b|, 1e-6), 0, 1), w·b + (1 − w)·a with a the base; t = 0 gives the base",
        paper="mergekit (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)",
        summary="NearSwap: take the other model's value where it lies within t of the base, else move towards it by t.",
        mergekit=MergekitSpec((), ("t",), normalize=None, cpift_normalize=None), bench={"--t": "0.001"})
def nearswap_tensor(xs: Sequence[Any], out: Any, *, backend: str | None, shape: Any, t: float) -> None:
    from cpift.kernels.nearswap import nearswap

    nearswap(xs[0], xs[1], t, out=out, backend=backend)
