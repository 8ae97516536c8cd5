# Backend choice for every kernel: "torch" (the reference, any device) or "triton" (CUDA; on the CPU
# only under TRITON_INTERPRET=1, for tests). Order: the call's `backend` argument, then the
# CPIFT_BACKEND environment variable, then "auto" = triton for CUDA tensors when triton imports,
# torch otherwise. Triton itself is imported only by the kernel modules, when they run.
from __future__ import annotations

import importlib.util
import os

import torch

# find_spec, not import: importing triton costs ~0.2 s that a CPU-only run should not pay.
HAS_TRITON = importlib.util.find_spec("triton") is not None

BACKENDS = ("auto", "torch", "triton")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve(backend: str | None, *tensors: torch.Tensor) -> str:
    """The backend to run: 'torch' or 'triton'."""
    choice = (backend or os.environ.get("CPIFT_BACKEND") or "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"backend: unknown backend '{choice}' (use one of {', '.join(BACKENDS)})")
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if choice == "auto":
        return "triton" if HAS_TRITON and on_cuda else "torch"
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
