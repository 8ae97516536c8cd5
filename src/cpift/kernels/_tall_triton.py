# Triton kernel of kernels/tall.py (TALL consensus merge), imported lazily by it. Maths and precision:
# its header. Each program reloads the task tensors per phase (the merged delta, then the sign election's
# agreeing terms, then the TALL count), so (N + 1)·s bytes are read once plus N·s per further phase, s
# written; the same float32 operations as the torch path in its order, the division by tl.math.div_rn,
# no mul+add contraction. The trims' last tie indices come in a tiny int64 table (Triton would
# specialise integer arguments).
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import bf16_bits_rne, launch_options
from .select import Cut

_BLOCK = 1024  # entries per program


@triton.jit
def _delta(x_ptr, b, offs, mask, cut_v, tie_ptr, K: tl.constexpr, HAS_CUT: tl.constexpr):
    # (δ, trimmed δ) of task K at offs.
    d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - b
    t = d
    if HAS_CUT:
        score = tl.abs(d)
        keep = (score > cut_v) | ((score == cut_v) & (offs <= tl.load(tie_ptr + K)))
        t = d * keep.to(tl.float32)
    return d, t


@triton.jit
def _tall_kernel(b_ptr, xs, w, lam, cut_v, tie_ptr, out_ptr, n, k, divisor, HAS_CUT: tl.constexpr,
                 ELECT: tl.constexpr, NORMALIZE: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.zeros(b.shape, dtype=tl.float32)
    for i in tl.static_range(len(xs)):
        d, t = _delta(xs[i], b, offs, mask, cut_v[i], tie_ptr, i, HAS_CUT)
        m = m + t * w[i]
    den = tl.full(b.shape, divisor, tl.float32)
    if ELECT:
        s = tl.where(m >= 0.0, 1.0, -1.0)
        m = tl.zeros(b.shape, dtype=tl.float32)
        den = tl.zeros(b.shape, dtype=tl.float32)
        for i in tl.static_range(len(xs)):
            d, t = _delta(xs[i], b, offs, mask, cut_v[i], tie_ptr, i, HAS_CUT)
            v = t * w[i]
            sv = tl.where(v > 0.0, 1.0, tl.where(v < 0.0, -1.0, 0.0))
            a = (sv == s).to(tl.float32)
            m = m + v * a
            den = den + w[i] * a
        den = tl.where(den == 0.0, 1.0, den)
    if NORMALIZE:
        m = tl.math.div_rn(m, den)
    count = tl.zeros(b.shape, dtype=tl.int32)
    for i in tl.static_range(len(xs)):
        d, t = _delta(xs[i], b, offs, mask, cut_v[i], tie_ptr, i, HAS_CUT)
        count += (tl.abs(d) > lam[i] * tl.abs(m - d)).to(tl.int32)
    r = b + m * (count >= k).to(tl.float32)
    if OUT_BF16:
        tl.store(out_ptr + offs, bf16_bits_rne(r), mask=mask)
    else:
        tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=mask)


def tall_triton(base: torch.Tensor, xs: list[torch.Tensor], weights: list[float], lambdas: list[float], k: int,
                cuts: list[Cut] | None, elect: bool, normalize: bool, divisor: float, *,
                out: torch.Tensor) -> torch.Tensor:
    """Triton tall_merge (float32 math; inputs and output float32, bf16 or fp16)."""
    n = base.numel()
    if n:
        ties = torch.tensor([c.last_tie for c in cuts] if cuts else [-1] * len(xs), dtype=torch.int64,
                            device=base.device)
        bf16 = out.dtype == torch.bfloat16
        _tall_kernel[(triton.cdiv(n, _BLOCK),)](
            base, tuple(xs), tuple(weights), tuple(lambdas),
            tuple(float(c.value) for c in cuts) if cuts else (0.0,) * len(xs), ties.to(base.device),
            out.view(torch.int16) if bf16 else out, n, k, float(divisor), HAS_CUT=cuts is not None,
            ELECT=elect, NORMALIZE=normalize, OUT_BF16=bf16, BLOCK=_BLOCK, **launch_options())
    return out
