# Triton helpers shared by the kernels. bf16 stores round to nearest even on the bits: the
# interpreter truncates on fp32→bf16 casts, so doing it by hand gives the same bits on GPU and CPU.
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bf16_bits_rne(x):
    """float32 → the int16 bit pattern of the nearest bfloat16 (ties to even; NaN stays NaN)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = tl.where(is_nan, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.int16, bitcast=True)
