# Triton kernel of kernels/nearswap.py, imported lazily by it. Maths and precision: see its header.
# Bytes per element: reads 2·s, writes s (s the storage size). The same float32 operations as the
# torch path in its order: 1/d by tl.math.div_rn (Triton's `/` is approximate on NVIDIA), no mul+add
# contraction (enable_fp_fusion=False on the GPU), bf16 stores rounded to nearest even on the bits.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import bf16_bits_rne, launch_options

_BLOCK = 1024  # entries per program: 4 KiB of float32 per input in flight


@triton.jit
def _nearswap_kernel(a_ptr, b_ptr, out_ptr, n, t, eps, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.abs(a - b)
    d = tl.where(d < eps, eps, d)
    w = tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), d) * t
    w = tl.where(w < 0.0, 0.0, w)
    w = tl.where(w > 1.0, 1.0, w)
    r = w * b + (1.0 - w) * a
    if OUT_BF16:
        tl.store(out_ptr + offs, bf16_bits_rne(r), mask=mask)
    else:
        tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=mask)


def nearswap_triton(a: torch.Tensor, b: torch.Tensor, t: float, *, out: torch.Tensor) -> torch.Tensor:
    """Triton version of nearswap (float32 math; inputs and output float32, bf16 or fp16)."""
    n = a.numel()
    if n:
        bf16 = out.dtype == torch.bfloat16
        _nearswap_kernel[(triton.cdiv(n, _BLOCK),)](
            a, b, out.view(torch.int16) if bf16 else out, n, float(t), 1e-6,
            OUT_BF16=bf16, BLOCK=_BLOCK, **launch_options())
    return out
