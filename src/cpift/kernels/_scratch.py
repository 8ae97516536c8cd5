# Reused scratch buffers and the chunk loop shared by every kernel in this package.
#
# Why: on the reference machine a fresh large allocation costs page faults (~3.5 GB/s), several
# times slower than the arithmetic done on it. Every kernel therefore walks its 1-D inputs in
# chunks of CHUNK elements, converts each chunk into a cached float32 (or float64) buffer, works in
# place there and copies the result into a caller-given output. CHUNK = 2^18 (1 MiB of float32) was
# measured fastest: large enough to amortise the Python overhead per chunk, small enough to stay
# in L2/L3 between the ops of one chunk.
#
# Buffers are cached per thread (threading.local) and per named slot, so two kernels running in
# different threads never share memory, and one kernel can hold several buffers at once by using
# distinct slot names. A returned buffer is only valid until the next call with the same slot in
# the same thread: never keep it across calls to another kernel that might use that slot.
# Buffers live on the device of the data they hold (`device`, default the CPU): a fallback that runs
# torch ops on CUDA inputs (a tie search, float64 inputs on the Triton path) keeps its scratch there.
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
