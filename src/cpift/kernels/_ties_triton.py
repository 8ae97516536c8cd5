# Triton kernel of kernels/ties.py's delta_merge (imported lazily): one pass, (N + 1)·s bytes read and
# s written per entry, the DARE mask from tl.rand4x; the torch path's float32 operations in its order
# (explicit fmas, IEEE division by div_rn, bf16 rounded on the bits), so bit-identical to it.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernels_ties_tritonpy
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import bf16_bits_rne, launch_options
from .backend import interpreting
from .select import Cut

_ROWS_GPU = 256  # 1024 entries per program: 4 KiB of float32 per input in flight, 4 warps
_ROWS_INTERPRETER = 4096  # 16384 entries: the interpreter pays per op, not per entry


def _rows() -> int:
    """Philox counters (4 entries each) per program: one fixed config per target, no autotuning."""
    return _ROWS_INTERPRETER if interpreting() else _ROWS_GPU


@triton.jit
def _model_delta(x_ptr, b, idx, inside, g, q, lane, iprm_ptr, cut_v, dens,
                 K: tl.constexpr, HAS_CUT: tl.constexpr, HAS_DROP: tl.constexpr):
    # δ_K = x_K − b, trimmed by its Cut and dropped by its DARE mask (0 where removed).
    d = tl.load(x_ptr + idx, mask=inside, other=0.0).to(tl.float32) - b
    if HAS_CUT:
        score = tl.abs(d)
        last_tie = tl.load(iprm_ptr + 2 * K)
        keep = (score > cut_v) | ((score == cut_v) & (g <= last_tie))
        d = tl.where(keep, d, d * 0.0)  # the torch path's 0/1 factor: ±0, and NaN for NaN/±inf
    if HAS_DROP:
        seed = tl.load(iprm_ptr + 2 * K + 1)
        u0, u1, u2, u3 = tl.rand4x(seed, q.to(tl.uint32))
        u = tl.where(lane == 0, u0, tl.where(lane == 1, u1, tl.where(lane == 2, u2, u3)))
        d = tl.where(u < dens, d, d * 0.0)
    return d


@triton.jit(do_not_specialize=["q0"])
def _delta_merge_kernel(base_ptr, xs, out_ptr, iprm_ptr, cut_v, dens, num_w, w, lam, n, q0,
                        SHIFT: tl.constexpr, HAS_CUT: tl.constexpr, HAS_DROP: tl.constexpr,
                        ELECT: tl.constexpr, NORMALIZE: tl.constexpr, OUT_BF16: tl.constexpr,
                        ROWS: tl.constexpr):
    # xs: tuple of the N task pointers; cut_v, dens, num_w (w_i / p_i), w: tuples of N float32
    # scalars; iprm_ptr: int64 [N, 2] table of (last_tie, seed), ints kept out of the arguments
    # because Triton specializes integer arguments (== 1, divisible by 16) even inside tuples, which
    # would compile a new kernel for many (tensor, model) pairs.
    # The pieces' first entry has global index start = 4·q0 + SHIFT. SHIFT is a constexpr so that the
    # usual start % 4 == 0 keeps local offsets visibly aligned: 16-byte vector loads on the GPU.
    pid = tl.program_id(0)
    r = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]  # counter, relative to q0
    lane = tl.arange(0, 4)[None, :]
    q = q0 + r
    g = q * 4 + lane  # global flat index, [ROWS, 4]
    idx = r * 4 + lane - SHIFT
    inside = idx < n
    if SHIFT != 0:
        inside = inside & (idx >= 0)  # the first program's first SHIFT entries precede `start`
    b = tl.load(base_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    acc = tl.zeros([ROWS, 4], dtype=tl.float32)
    pos_num = tl.zeros([ROWS, 4], dtype=tl.float32)
    neg_num = tl.zeros([ROWS, 4], dtype=tl.float32)
    pos_den = tl.zeros([ROWS, 4], dtype=tl.float32)
    neg_den = tl.zeros([ROWS, 4], dtype=tl.float32)
    for k in tl.static_range(len(xs)):
        d = _model_delta(xs[k], b, idx, inside, g, q, lane, iprm_ptr, cut_v[k], dens[k],
                         k, HAS_CUT, HAS_DROP)
        acc = tl.fma(d, num_w[k], acc)
        if ELECT:
            pos_num = tl.fma(tl.maximum(d, 0.0), num_w[k], pos_num)
            neg_num = tl.fma(tl.maximum(-d, 0.0), num_w[k], neg_num)
            if NORMALIZE:
                pos_den = pos_den + tl.where(d > 0.0, w[k], 0.0)
                neg_den = neg_den + tl.where(d < 0.0, w[k], 0.0)
    merged = acc
    if ELECT:
        sign = tl.where(acc > 0.0, 1.0, tl.where(acc < 0.0, -1.0, 0.0))
        num = tl.where(acc > 0.0, pos_num, tl.where(acc < 0.0, neg_num, 0.0))
        merged = num * sign
        if NORMALIZE:
            den = tl.where(acc > 0.0, pos_den, tl.where(acc < 0.0, neg_den, 0.0))
            nonzero = den != 0.0
            # b where no weight agrees: divide by 1 there and zero the quotient, as torch does.
            merged = tl.math.div_rn(merged, tl.where(nonzero, den, 1.0)) * nonzero.to(tl.float32)
        # torch: sign(NaN) = 0 and a NaN or ±inf δ_i times 0 is NaN, so a NaN sum stays NaN (the
        # election's where/maximum above would drop it).
        merged = tl.where(acc != acc, acc, merged)
    res = tl.fma(merged, lam, b)
    if OUT_BF16:
        tl.store(out_ptr + idx, bf16_bits_rne(res), mask=inside)
    else:
        tl.store(out_ptr + idx, res.to(out_ptr.dtype.element_ty), mask=inside)


def _check_contiguous(tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"delta_merge (triton): {name} is a strided view; pass a contiguous "
                             "tensor (.contiguous()) or use backend='torch'")


def delta_merge_triton(
    base: torch.Tensor,
    xs: list[torch.Tensor],
    weights: list[float],
    num_weights: list[float],
    *,
    lam: float,
    cuts: list[Cut] | None,
    densities: list[float] | None,
    drop_seeds: list[int] | None,
    elect_sign: bool,
    normalize: bool,
    out: torch.Tensor,
    start: int = 0,
    rows: int | None = None,
) -> torch.Tensor:
    """Triton version of delta_merge on validated arguments (float32/bf16/fp16 inputs).

    num_weights are the weights with DARE's 1/p_i folded in; `start` is the global flat index of
    the first entry (pieces of a larger tensor keep the whole tensor's tie rule and DARE mask);
    `rows` overrides the counters per program (tests: results do not depend on it).
    """
    n = base.numel()
    _check_contiguous({"base": base, "out": out, **{f"xs[{i}]": x for i, x in enumerate(xs)}})
    if start < 0:
        raise ValueError(f"delta_merge (triton): start must be ≥ 0, got {start}")
    if n == 0:
        return out
    count = len(xs)
    # int64 two's complement of each seed: the kernel's uint64 cast restores seeds ≥ 2^63.
    last_ties = [c.last_tie for c in cuts] if cuts else [-1] * count
    seeds = [s - (1 << 64) if s >= 1 << 63 else s for s in drop_seeds] if densities else [0] * count
    iprm = torch.tensor(list(zip(last_ties, seeds)), dtype=torch.int64, device="cpu")
    if base.is_cuda:  # pinned + non_blocking: no host sync for the 16·N bytes
        iprm = iprm.pin_memory().to(base.device, non_blocking=True)
    cut_v = tuple(float(c.value) for c in cuts) if cuts else (0.0,) * count
    dens = tuple(float(p) for p in densities) if densities else (1.0,) * count
    rows = rows or _rows()
    programs = triton.cdiv(start % 4 + n, 4 * rows)
    bf16 = out.dtype == torch.bfloat16
    _delta_merge_kernel[(programs,)](
        base, tuple(xs), out.view(torch.int16) if bf16 else out, iprm, cut_v, dens,
        tuple(float(v) for v in num_weights), tuple(float(v) for v in weights), float(lam), n, start // 4,
        SHIFT=start % 4, HAS_CUT=cuts is not None, HAS_DROP=densities is not None, ELECT=bool(elect_sign),
        NORMALIZE=bool(normalize), OUT_BF16=bf16, ROWS=rows, **launch_options())
    return out
