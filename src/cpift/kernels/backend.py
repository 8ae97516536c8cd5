# Backend choice for every kernel: "torch" (the reference, any device), "cpu" (the fused CPU kernels,
# compiled by numba: `_*_cpu.py` beside each operation) or "triton" (CUDA; on the CPU only under
# TRITON_INTERPRET=1, for tests). Order: the call's `backend` argument, then the CPIFT_BACKEND
# environment variable, then "auto" = triton for CUDA tensors when triton imports, the fused CPU
# kernels for CPU tensors when numba imports, torch otherwise. A kernel that has no fused CPU
# version yet runs its torch version for "cpu". Triton and numba are imported only by the kernel
# modules, when they run.
from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the CLI imports BACKENDS, and must start without torch
    import torch

# find_spec, not import: importing triton costs ~0.2 s that a CPU-only run should not pay.
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_NUMBA = importlib.util.find_spec("numba") is not None

BACKENDS = ("auto", "torch", "cpu", "triton")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve(backend: str | None, *tensors: torch.Tensor) -> str:
    """The backend to run: 'torch', 'cpu' or 'triton'."""
    choice = (backend or os.environ.get("CPIFT_BACKEND") or "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"backend: unknown backend '{choice}' (use one of {', '.join(BACKENDS)})")
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if choice == "auto":
        if on_cuda:
            return "triton" if HAS_TRITON else "torch"
        return "cpu" if HAS_NUMBA else "torch"
    if choice == "cpu":
        if not HAS_NUMBA:
            raise ValueError("backend: the fused CPU kernels need numba (pip install numba, or use --backend torch)")
        if on_cuda:
            raise ValueError("backend: the fused CPU kernels run on CPU tensors; use --backend triton (or auto) "
                             "with --device cuda")
        return choice
    if choice == "triton":
        if not HAS_TRITON:
            raise ValueError("backend: triton is not installed (pip install triton, or use --backend torch)")
        if not on_cuda and not interpreting():
            raise ValueError("backend: Triton kernels run on CUDA tensors; set TRITON_INTERPRET=1 to run "
                             "them on the CPU (slow, for testing), or use --backend torch")
    elif on_cuda:
        # The torch kernels work in CPU scratch buffers (kernels/_scratch.py).
        raise ValueError("backend: the torch kernels run on the CPU; use --backend triton (or auto) "
                         "with --device cuda")
    return choice
