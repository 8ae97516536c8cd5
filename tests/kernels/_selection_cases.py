"""Shared cases of the fused CPU selection kernels' tests (scores, masks, select): awkward lengths around
the work block, the dtypes, thread counts, and quantized inputs that make many exact ties."""

from __future__ import annotations

import contextlib

import torch

from cpift.kernels._backend import HAS_NUMBA

BLOCK = 1 << 16  # kernels/_cpu.py's work block (not imported here: that imports numba)
LENGTHS = [0, 1, 7, BLOCK - 1, BLOCK + 1, 3 * BLOCK + 5, 1823 * 781]
LENGTH_IDS = ["n0", "n1", "n7", "block-1", "block+1", "3block+5", "1823x781"]
NEEDS_NUMBA = "numba is not installed (the cpu backend's fused kernels need it)"


@contextlib.contextmanager
def threads(n: int):
    """Run with n torch threads (the fused kernels follow torch's count); restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quantized(n: int, dtype: torch.dtype, step: float) -> torch.Tensor:
    """Multiples of `step` in [-40, 40) steps, none zero: scores with many exact ties."""
    q = torch.randint(-40, 40, (n,), dtype=torch.float64)
    q = torch.where(q >= 0, q + 1, q)
    return (q * step).to(dtype)


__all__ = ["BLOCK", "HAS_NUMBA", "LENGTHS", "LENGTH_IDS", "NEEDS_NUMBA", "quantized", "threads"]
