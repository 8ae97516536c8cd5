# Triton kernels of kernels/slerp.py (reduce partials, blend + transplant), imported lazily by it.
# Maths, precision and the two-pass design: see the header of kernels/slerp.py. Bytes per element:
# reduce reads 2 (+1 mask byte), blend reads 2 and writes 1 (+1 mask byte).
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import bf16_bits_rne, launch_options

_BLOCK = 1024  # elements per Triton program: 4 KiB of float32 per input, 2 loads in flight


@triton.jit
def _slerp_reduce_kernel(a_ptr, b_ptr, ex_ptr, part_ptr, n, HAS_EXCLUDE: tl.constexpr,
                         BLOCK: tl.constexpr):
    # One program: float32 partial sums of a², b², ab over BLOCK entries (no atomics: the host
    # folds the partials in float64, so the result does not depend on scheduling).
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_EXCLUDE:
        skip = tl.load(ex_ptr + offs, mask=mask, other=1) != 0
        a = tl.where(skip, 0.0, a)
        b = tl.where(skip, 0.0, b)
    tl.store(part_ptr + pid * 3, tl.sum(a * a, axis=0))
    tl.store(part_ptr + pid * 3 + 1, tl.sum(b * b, axis=0))
    tl.store(part_ptr + pid * 3 + 2, tl.sum(a * b, axis=0))

@triton.jit
def _slerp_blend_kernel(a_ptr, b_ptr, keep_ptr, out_ptr, n, ca, cb, HAS_KEEP: tl.constexpr,
                        OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    # out = fma(a, ca, b·cb) in float32 (the torch path's fb·cb, then add_(a, alpha=ca): one fused
    # multiply-add on vectorized CPUs, as in _slerp_cpu.py), one rounding on store; `keep` copies a.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.fma(a, ca, b * cb)
    if HAS_KEEP:
        r = tl.where(tl.load(keep_ptr + offs, mask=mask, other=0) != 0, a, r)
    if OUT_BF16:
        tl.store(out_ptr + offs, bf16_bits_rne(r), mask=mask)
    else:
        tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=mask)


def _mask_bytes(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.view(torch.uint8)


def slerp_reduce_triton(a: torch.Tensor, b: torch.Tensor, *, exclude: torch.Tensor | None = None
                        ) -> tuple[float, float, float]:
    """Triton version of slerp_reduce (float32 inputs, bf16 or fp16)."""
    n = a.numel()
    programs = triton.cdiv(n, _BLOCK)
    parts = torch.zeros(max(programs, 1) * 3, dtype=torch.float32, device=a.device)
    if programs:
        ex = _mask_bytes(exclude)
        _slerp_reduce_kernel[(programs,)](a, b, ex if ex is not None else a, parts, n,
                                          HAS_EXCLUDE=ex is not None, BLOCK=_BLOCK, **launch_options())
    aa, bb, ab = parts.view(-1, 3).double().sum(0).tolist()
    return aa, bb, ab


def slerp_blend_triton(a: torch.Tensor, b: torch.Tensor, ca: float, cb: float, *, out: torch.Tensor,
                       keep: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of slerp_blend."""
    n = a.numel()
    if n:
        k = _mask_bytes(keep)
        bf16 = out.dtype == torch.bfloat16
        _slerp_blend_kernel[(triton.cdiv(n, _BLOCK),)](
            a, b, k if k is not None else a, out.view(torch.int16) if bf16 else out, n, float(ca), float(cb),
            HAS_KEEP=k is not None, OUT_BF16=bf16, BLOCK=_BLOCK, **launch_options())
    return out
