# Triton helpers shared by the kernels. abs_delta is the scores' |x − base|. bf16 stores round to nearest even on
# the bits: the interpreter truncates on fp32→bf16 casts, so doing it by hand gives the same bits on GPU and CPU.
# Every launch passes **LAUNCH (the rounding policy, stated once): enable_fp_fusion=False, so the GPU
# contracts no mul+add into an fma on its own; every product that the torch reference fuses (its
# add_(t, alpha=a)) is spelled tl.fma in the kernel, and every other product is rounded before it is
# added, as the interpreter and torch round it. Divisions that must be IEEE use tl.math.div_rn (`/` on
# float32 compiles to the approximate div.full.f32). tests/kernels/test_triton_rounding.py checks the PTX.
from __future__ import annotations

import triton
import triton.language as tl

from .backend import interpreting


def launch_options(**extra) -> dict:
    """Compiler options for every launch: fusion off on the GPU, plus `extra` (e.g. num_warps) there; the
    interpreter takes no options."""
    return {} if interpreting() else {"enable_fp_fusion": False, **extra}


@triton.jit
def bf16_bits_rne(x):
    """float32 → the int16 bit pattern of the nearest bfloat16 (ties to even; NaN stays NaN)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = tl.where(is_nan, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def abs_delta(x_ptr, b_ptr, offs, mask, HAS_BASE: tl.constexpr, F64: tl.constexpr):
    """|x − base| at offs in the compute dtype (float64 for float64 inputs, else float32); 0 where masked."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x = x.to(tl.float64) if F64 else x.to(tl.float32)
    if HAS_BASE:
        b = tl.load(b_ptr + offs, mask=mask, other=0.0)
        x = x - (b.to(tl.float64) if F64 else b.to(tl.float32))
    return tl.abs(x)
