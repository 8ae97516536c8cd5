# Triton kernels of kernels/ram.py (RAM counts and blend), imported lazily by it. Maths and precision: its
# header. The counts: each program writes its per-model (shared, alone) counts, folded on the host (int32
# partials of at most BLOCK entries, exact). The blend reads the base once and each task tensor twice
# (the count c, then the terms): (2N + 1)·s bytes read, s written; the same float32 operations as the
# torch path in its order, the division by tl.math.div_rn, no mul+add contraction.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import bf16_bits_rne, launch_options

_BLOCK = 1024  # entries per program


@triton.jit
def _moves(b, xs, offs, mask, eps):
    c = tl.zeros(b.shape, dtype=tl.int32)
    for k in tl.static_range(len(xs)):
        d = tl.load(xs[k] + offs, mask=mask, other=0.0).to(tl.float32) - b
        c += (tl.abs(d) > eps).to(tl.int32)
    return c


@triton.jit
def _counts_kernel(b_ptr, xs, counts_ptr, n, eps, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c = _moves(b, xs, offs, mask, eps)
    for k in tl.static_range(len(xs)):
        d = tl.load(xs[k] + offs, mask=mask, other=0.0).to(tl.float32) - b
        nz = (tl.abs(d) > eps) & mask
        tl.store(counts_ptr + (pid * len(xs) + k) * 2, tl.sum((nz & (c > 1)).to(tl.int32), axis=0))
        tl.store(counts_ptr + (pid * len(xs) + k) * 2 + 1, tl.sum((nz & (c == 1)).to(tl.int32), axis=0))


@triton.jit
def _blend_kernel(b_ptr, xs, lam, out_ptr, n, eps, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c = _moves(b, xs, offs, mask, eps)
    one = (c == 1).to(tl.float32)
    many = (c > 1).to(tl.float32)
    cc = tl.maximum(c, 1).to(tl.float32)
    acc = tl.zeros(b.shape, dtype=tl.float32)
    for k in tl.static_range(len(xs)):
        d = tl.load(xs[k] + offs, mask=mask, other=0.0).to(tl.float32) - b
        dz = d * (tl.abs(d) > eps).to(tl.float32)
        acc = acc + ((dz * one) * lam[k] + tl.math.div_rn(dz * many, cc))
    r = b + acc
    if OUT_BF16:
        tl.store(out_ptr + offs, bf16_bits_rne(r), mask=mask)
    else:
        tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=mask)


def ram_counts_triton(base: torch.Tensor, xs: list[torch.Tensor], eps: float) -> tuple[list[int], list[int]]:
    """Triton ram_counts (float32, bf16 or fp16 inputs): (shared, alone) per model."""
    n = base.numel()
    programs = triton.cdiv(n, _BLOCK)
    counts = torch.zeros((max(programs, 1), len(xs), 2), dtype=torch.int32, device=base.device)
    if n:
        _counts_kernel[(programs,)](base, tuple(xs), counts, n, float(eps), BLOCK=_BLOCK, **launch_options())
    total = counts.to(torch.int64).sum(dim=0).cpu()
    return [int(v) for v in total[:, 0]], [int(v) for v in total[:, 1]]


def ram_blend_triton(base: torch.Tensor, xs: list[torch.Tensor], eps: float, lam: list[float], *,
                     out: torch.Tensor) -> torch.Tensor:
    """Triton ram_blend (float32 math; inputs and output float32, bf16 or fp16)."""
    n = base.numel()
    if n:
        bf16 = out.dtype == torch.bfloat16
        _blend_kernel[(triton.cdiv(n, _BLOCK),)](
            base, tuple(xs), tuple(float(v) for v in lam), out.view(torch.int16) if bf16 else out, n, float(eps),
            OUT_BF16=bf16, BLOCK=_BLOCK, **launch_options())
    return out
