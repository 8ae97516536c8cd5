# RAM and RAM+ (tensor-local) of a base b and N task tensors x_i (mergekit 0.1.5's `ram`, `ramplus_tl`;
# arXiv:2601.13572), flattened:
#   δ_i = x_i − b, nz_i = [|δ_i| > eps], c = Σ_i nz_i (the models that move the entry)
#   out = b + Σ_i (δ_i·nz_i·[c = 1]·λ_i + δ_i·nz_i·[c > 1] / max(c, 1))
# An entry moved by one model takes its delta (scaled by λ_i); one moved by several takes their mean.
# ram: λ_i = 1. ramplus_tl: λ_i = 1 + r·clamp(S_i / max(U_i, eps), 0, α), S_i and U_i the entries model i
# moves together with others and alone (ram_counts, a first pass; ramplus_scales on the host).
#
# Precision: storage → float32 (float64 for float64 inputs), each step one IEEE operation in mergekit's
# order, masks as 0/1 factors (a NaN or ±inf delta reaches the output), one rounding on store.
# ram_ref is the float64 oracle.
# Cost per element: ram_counts reads N + 1 and writes nothing (integer counts: every backend gives the
# same); ram_blend reads N + 1 (Triton: 2N + 1, the deltas read twice) and writes 1:
#   "torch": chunks of 2^18;  "cpu": _ram_cpu.py (numba, one pass);  "triton": _ram_triton.py.
from __future__ import annotations

import torch

from ._scratch import check_flat, chunks, compute_dtype
from .backend import resolve
from .finite import note_written

RAM_EPS = 1e-5  # mergekit's epsilon: |δ| above it counts as a move


def _check(base: torch.Tensor, xs: list[torch.Tensor], eps: float) -> None:
    check_flat("base", base)
    if not xs:
        raise ValueError("ram: needs at least one task tensor")
    for i, x in enumerate(xs):
        check_flat(f"xs[{i}]", x, base.numel())
    if not eps >= 0.0:
        raise ValueError(f"ram: eps must be ≥ 0, got {eps}")


def _fused(be: str, dt: torch.dtype, *tensors: torch.Tensor) -> str | None:
    """'cpu' or 'triton' when that fused kernel takes these tensors, else None (the torch path)."""
    if dt != torch.float32:
        return None
    if be == "cpu":
        from ._cpu import supports

        return "cpu" if supports(*tensors) else None
    return "triton" if be == "triton" else None


def _moves(base: torch.Tensor, xs: list[torch.Tensor], eps: float, s: int, e: int, dt: torch.dtype):
    d = torch.stack([x[s:e].to(dt) for x in xs]) - base[s:e].to(dt)
    nz = d.abs() > eps
    return d, nz, nz.sum(dim=0)


def ram_counts(base: torch.Tensor, xs: list[torch.Tensor], eps: float = RAM_EPS, *,
               backend: str | None = None) -> tuple[list[int], list[int]]:
    """(S_i, U_i): the entries model i moves (|δ_i| > eps) together with another model, and alone."""
    _check(base, xs, eps)
    dt = compute_dtype(base, *xs)
    fused = _fused(resolve(backend, base, *xs), dt, base, *xs)
    if fused == "cpu":
        from ._ram_cpu import ram_counts_cpu

        return ram_counts_cpu(base, xs, eps)
    if fused == "triton":
        from ._ram_triton import ram_counts_triton

        return ram_counts_triton(base, xs, eps)
    shared, alone = [0] * len(xs), [0] * len(xs)
    for s, e in chunks(base.numel()):
        _, nz, c = _moves(base, xs, eps, s, e, dt)
        for i in range(len(xs)):
            shared[i] += int((nz[i] & (c > 1)).sum())
            alone[i] += int((nz[i] & (c == 1)).sum())
    return shared, alone


def ramplus_scales(shared: list[int], alone: list[int], r: float, alpha: float, eps: float = RAM_EPS) -> list[float]:
    """λ_i = 1 + r·clamp(S_i / max(U_i, eps), 0, α), in float32 as mergekit computes it."""
    s = torch.tensor(shared, dtype=torch.int64, device="cpu")
    u = torch.tensor(alone, dtype=torch.int64, device="cpu")
    rho = s / u.clamp(min=eps)
    return [float(v) for v in 1 + r * rho.clamp(min=0, max=alpha)]


def ram_blend(base: torch.Tensor, xs: list[torch.Tensor], eps: float = RAM_EPS, scales: list[float] | None = None,
              *, out: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Write b + Σ_i (δ_i·nz_i·[c = 1]·λ_i + δ_i·nz_i·[c > 1] / max(c, 1)) into out (λ_i = scales[i], default 1)."""
    _check(base, xs, eps)
    check_flat("out", out, base.numel())
    lam = [1.0] * len(xs) if scales is None else [float(v) for v in scales]
    if len(lam) != len(xs):
        raise ValueError(f"ram: {len(lam)} scales for {len(xs)} task tensors")
    dt = compute_dtype(base, *xs)
    fused = _fused(resolve(backend, base, *xs, out), dt, base, *xs, out)
    if fused == "cpu":
        from ._ram_cpu import ram_blend_cpu

        note_written(out, ram_blend_cpu(base, xs, eps, lam, out=out))
        return out
    if fused == "triton":
        from ._ram_triton import ram_blend_triton

        return ram_blend_triton(base, xs, eps, lam, out=out)
    for s, e in chunks(base.numel()):
        d, nz, c = _moves(base, xs, eps, s, e, dt)
        dz = d * nz
        one = (c == 1).to(dt)
        many = (c > 1).to(dt)
        cc = c.clamp(min=1).to(dt)
        acc = torch.zeros(e - s, dtype=dt, device=base.device)
        for i in range(len(xs)):
            acc += dz[i] * one * lam[i] + dz[i] * many / cc
        out[s:e].copy_(base[s:e].to(dt) + acc)
    return out


def ram_ref(base: torch.Tensor, xs: list[torch.Tensor], eps: float = RAM_EPS, *, r: float | None = None,
            alpha: float | None = None) -> torch.Tensor:
    """float64 oracle of ram (ramplus_tl with r and alpha; λ_i in float64 too); returns float64."""
    b = base.double()
    d = torch.stack([x.double() - b for x in xs])
    nz = d.abs() > eps
    c = nz.sum(dim=0)
    one, many = nz & (c == 1), nz & (c > 1)
    lam = torch.ones(len(xs), dtype=torch.float64, device=b.device)
    if r is not None:
        rho = many.sum(dim=1).double() / one.sum(dim=1).double().clamp(min=eps)
        lam = 1 + r * rho.clamp(min=0, max=alpha)
    dz = d * nz
    return b + (dz * one * lam[:, None] + dz * many / c.clamp(min=1)).sum(dim=0)
