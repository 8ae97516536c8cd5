# Finiteness checks for input tensors (NaN/Inf in an input is an error, or a warning with
# --allow-nonfinite: docs/safety.md): a float32 sum per chunk proves a chunk finite, an exact isfinite
# only where the sum is not; the fused CPU kernels record the finiteness of what they store, so the
# writer's check reads nothing again. Exact: never a false answer.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernelsfinitepy
from __future__ import annotations

import math
import threading

import torch

from ._scratch import chunks

_CHUNK = 1 << 24
_written = threading.local()


def _key(x: torch.Tensor) -> tuple[int, int, torch.dtype, int]:
    return x.data_ptr(), x.numel(), x.dtype, x._version


def note_written(x: torch.Tensor, finite: bool) -> None:
    """Record that a kernel has just written every entry of x, and whether all of them are finite."""
    _written.record = (_key(x), finite)


def _chunk_sum(x: torch.Tensor, s: int, e: int) -> float:
    # No dtype= argument: for bf16/fp16 it would materialise a float32 copy of the chunk (fresh
    # memory, ~1.5 GB/s here) where the plain sum accumulates in float32 internally (~20 GB/s).
    # A float16 sum can overflow to inf on finite data; that only sends us to the exact check.
    return float(x[s:e].sum())


def all_finite(x: torch.Tensor) -> bool:
    """True when every entry of the 1-D tensor x is finite (no NaN, no ±inf)."""
    if not x.is_floating_point():
        return True
    record = getattr(_written, "record", None)
    _written.record = None
    if record is not None and record[0] == _key(x):
        return record[1]
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
