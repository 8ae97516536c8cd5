# Backend choice for every kernel: "torch" (the reference, any device) or "triton" (CUDA; on the CPU
# only under TRITON_INTERPRET=1, for tests). Order: the call's `backend` argument, then the
# CPIFT_BACKEND environment variable, then "auto" = triton for CUDA tensors when triton imports,
# torch otherwise. Also the shared Triton helper that stores float32 results as bfloat16 with
# round-to-nearest-even: the interpreter truncates on fp32→bf16 casts, so rounding is done on the
# bits, identically on GPU and CPU.
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # triton is optional on CPU-only machines
    HAS_TRITON = False

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
    return choice


if HAS_TRITON:

    @triton.jit
    def bf16_bits_rne(x):
        """float32 → the int16 bit pattern of the nearest bfloat16 (ties to even; NaN stays NaN)."""
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        rounded = tl.where(is_nan, (bits >> 16) | 0x40, rounded)
        return rounded.to(tl.uint16).to(tl.int16, bitcast=True)
