# Reused per-thread scratch buffers and the chunk loop (CHUNK = 2^18 elements) shared by the torch
# kernels: a fresh large tensor costs page faults that are slower than the arithmetic done on it.
# A buffer is valid until the next call with the same slot name in the same thread.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernels_scratchpy
from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

CHUNK = 1 << 18

_local = threading.local()


def scratch(slot: str, n: int, dtype: torch.dtype = torch.float32,
            device: torch.device | str | None = None) -> torch.Tensor:
    """Return a cached, uninitialised 1-D buffer of length n for (slot, dtype, device) in this thread."""
    cache: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] | None = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    dev = torch.device(device if device is not None else "cpu")
    key = (slot, dtype, dev)
    buf = cache.get(key)
    if buf is None or buf.numel() < n:
        # Never smaller than one chunk, so the ragged tail and later calls reuse the same memory.
        buf = torch.empty(max(n, CHUNK), dtype=dtype, device=dev)
        cache[key] = buf
    return buf[:n]


def chunks(n: int, size: int = CHUNK) -> Iterator[tuple[int, int]]:
    """Yield (start, end) pairs covering range(n) in order, each at most `size` long."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (the oracle precision), else float32 (the working precision)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def check_flat(name: str, x: torch.Tensor, n: int | None = None) -> None:
    """Raise ValueError unless x is a 1-D tensor (of length n when given)."""
    if x.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D (flattened) tensor, got shape {tuple(x.shape)}")
    if n is not None and x.numel() != n:
        raise ValueError(f"{name}: expected {n} elements, got {x.numel()}")
