# Finiteness checks for input tensors (DESIGN §5: NaN/Inf in inputs is an error or a warning).
#
# Fast path: per chunk, a sum in float32 (float64 for float64 tensors). NaN and ±inf propagate
# through a sum (inf − inf is NaN), so a finite sum proves the chunk finite; only a non-finite sum
# (a real NaN/Inf, or an overflow of finite values) falls back to the exact element-wise isfinite.
# Reads each element once, writes nothing large. Integer and bool tensors are always finite.
from __future__ import annotations

import math

import torch

from ._scratch import chunks, compute_dtype


def _chunk_sum(x: torch.Tensor, s: int, e: int) -> float:
    return float(x[s:e].sum(dtype=compute_dtype(x)))


def all_finite(x: torch.Tensor) -> bool:
    """True when every entry of the 1-D tensor x is finite (no NaN, no ±inf)."""
    if not x.is_floating_point():
        return True
    for s, e in chunks(x.numel()):
        if not math.isfinite(_chunk_sum(x, s, e)) and not bool(torch.isfinite(x[s:e]).all()):
            return False
    return True


def first_nonfinite(x: torch.Tensor) -> int | None:
    """Flat index of the first NaN/±inf entry of the 1-D tensor x, or None when all are finite."""
    if not x.is_floating_point():
        return None
    for s, e in chunks(x.numel()):
        if math.isfinite(_chunk_sum(x, s, e)):
            continue
        bad = (~torch.isfinite(x[s:e])).nonzero()
        if bad.numel():
            return s + int(bad[0])
    return None
