"""Shared cases of the fused CPU kernel tests (tests/kernels/test_*_cpu.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from cpift.kernels._backend import HAS_NUMBA

needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")

BLOCK = 1 << 16  # kernels/_cpu.py's BLOCK (not imported here: that would import numba at collection)
CPU_LENGTHS = [0, 1, 7, BLOCK - 1, BLOCK + 1, 3 * BLOCK + 5, 1823 * 781]
CPU_LENGTH_IDS = ["n0", "n1", "n7", "block-1", "block+1", "3block+5", "1823x781"]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with n torch threads (the fused kernels follow torch's count); restore it afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
