# Finiteness checks for input tensors (DESIGN §5: NaN/Inf in inputs is an error or a warning).
#
# Fast path: per chunk, a sum in float32 (float64 for float64 tensors). NaN and ±inf propagate
# through a sum (inf − inf is NaN), so a finite sum proves the chunk finite; only a non-finite sum
# (a real NaN/Inf, or an overflow of finite values) falls back to the exact element-wise isfinite.
# Reads each element once, writes nothing large. Integer and bool tensors are always finite.
# Chunks of 2^24 elements: a sum allocates nothing, and large chunks run at memory speed
# (≈12–19 GB/s here for bf16) where 2^18-element chunks pay per-call overhead.
from __future__ import annotations

import math

import torch

from ._scratch import chunks

_CHUNK = 1 << 24


def _chunk_sum(x: torch.Tensor, s: int, e: int) -> float:
    # No dtype= argument: for bf16/fp16 it would materialise a float32 copy of the chunk (fresh
    # memory, ~1.5 GB/s here) where the plain sum accumulates in float32 internally (~20 GB/s).
    # A float16 sum can overflow to inf on finite data; that only sends us to the exact check.
    return float(x[s:e].sum())


def all_finite(x: torch.Tensor) -> bool:
    """True when every entry of the 1-D tensor x is finite (no NaN, no ±inf)."""
    if not x.is_floating_point():
        return True
    for s, e in chunks(x.numel(), _CHUNK):
        if not math.isfinite(_chunk_sum(x, s, e)) and not bool(torch.isfinite(x[s:e]).all()):
            return False
    return True


def first_nonfinite(x: torch.Tensor) -> int | None:
    """Flat index of the first NaN/±inf entry of the 1-D tensor x, or None when all are finite."""
    if not x.is_floating_point():
        return None
    for s, e in chunks(x.numel(), _CHUNK):
        if math.isfinite(_chunk_sum(x, s, e)):
            continue
        bad = (~torch.isfinite(x[s:e])).nonzero()
        if bad.numel():
            return s + int(bad[0])
    return None
