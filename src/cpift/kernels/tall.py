# Consensus merging with TALL masks (Wang et al. 2024, arXiv:2405.07813; mergekitty 0.3.1's
# `consensus_ta` and `consensus_ties`) of a base b and N task tensors x_i, flattened:
#   δ_i = x_i − b; t_i = δ_i·keep_i (TIES: keep_i = the Cut of its top-density |δ_i|; TA: t_i = δ_i)
#   v_i = t_i·w_i;  TA: m = Σ v_i, D = Σ w_i (|D| < 1e-8 → 1)
#   TIES: s = +1 where Σ v_i ≥ 0 else −1, a_i = [sign(v_i) = s]; m = Σ v_i·a_i, D = Σ w_i·a_i (0 → 1)
#   normalize: m = m / D
#   TALL: n = Σ_i [|δ_i| > λ_i·|m − δ_i|] (the untrimmed deltas); out = b + m·[n ≥ k]
# The consensus keeps an entry of the merged delta only where at least k tasks find it close to
# their own delta (λ_i: how close).
#
# Precision: storage → float32 (float64 for float64 inputs), each step one IEEE operation in
# mergekitty's order (products, the sums in model order, the division), never fused; masks as 0/1
# factors (a NaN or ±inf delta reaches the output); one rounding on store. tall_ref is the float64 oracle.
# Cost per element: reads N + 1 (Triton: 2N + 1 with the sign election, 3N + 1 with it and TALL), writes 1:
#   "torch": chunks of 2^18;  "cpu": _tall_cpu.py (numba, one pass);  "triton": _tall_triton.py.
from __future__ import annotations

import torch

from ._scratch import check_flat, chunks, compute_dtype
from .backend import resolve
from .finite import note_written
from .select import Cut, cut_mask

NORMALIZE_EPS = 1e-8  # a task-arithmetic weight sum below this (in magnitude) divides as 1


def _check(base: torch.Tensor, xs: list[torch.Tensor], weights: list[float], lambdas: list[float],
           cuts: list[Cut] | None) -> None:
    check_flat("base", base)
    if not xs:
        raise ValueError("tall: needs at least one task tensor")
    for i, x in enumerate(xs):
        check_flat(f"xs[{i}]", x, base.numel())
    for what, v in (("weights", weights), ("lambdas", lambdas), ("cuts", cuts)):
        if v is not None and len(v) != len(xs):
            raise ValueError(f"tall: {len(v)} {what} for {len(xs)} task tensors")


def _divisor(weights: list[float]) -> float:
    d = float(torch.tensor(weights, dtype=torch.float32, device="cpu").sum())
    return 1.0 if abs(d) < NORMALIZE_EPS else d


def tall_merge(base: torch.Tensor, xs: list[torch.Tensor], weights: list[float], lambdas: list[float], k: int, *,
               cuts: list[Cut] | None = None, elect_sign: bool = False, normalize: bool = False,
               out: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Write the TALL consensus merge (header) into out (1-D tensors); ``cuts``: the TIES trim per model."""
    _check(base, xs, weights, lambdas, cuts)
    check_flat("out", out, base.numel())
    dt = compute_dtype(base, *xs)
    be = resolve(backend, base, *xs, out)
    args = (base, xs, [float(w) for w in weights], [float(v) for v in lambdas], int(k), cuts, bool(elect_sign),
            bool(normalize), _divisor(weights))
    if be == "cpu" and dt == torch.float32:
        from ._cpu import supports

        if supports(base, *xs, out):
            from ._tall_cpu import tall_cpu

            note_written(out, tall_cpu(*args, out=out))
            return out
    if be == "triton" and dt == torch.float32:
        from ._tall_triton import tall_triton

        return tall_triton(*args, out=out)
    for s, e in chunks(base.numel()):
        out[s:e].copy_(_tall_chunk(*args, s, e, dt))
    return out


def _tall_chunk(base, xs, weights, lambdas, k, cuts, elect, normalize, divisor, s, e, dt):
    b = base[s:e].to(dt)
    d = torch.stack([x[s:e].to(dt) for x in xs]) - b
    t = d.clone()
    if cuts is not None:
        for i, c in enumerate(cuts):
            t[i] *= cut_mask(d[i].abs(), c, s).to(dt)
    w = torch.tensor(weights, dtype=dt, device=base.device)[:, None]
    v = t * w
    if elect:
        total = torch.zeros(e - s, dtype=dt, device=base.device)
        for i in range(len(xs)):
            total += v[i]
        agree = (v.sign() == ((total >= 0).to(dt) * 2 - 1)).to(dt)
        m, den = torch.zeros(e - s, dtype=dt, device=base.device), torch.zeros(e - s, dtype=dt, device=base.device)
        for i in range(len(xs)):
            m += v[i] * agree[i]
            den += w[i] * agree[i]
        den[den == 0] = 1
    else:
        m = torch.zeros(e - s, dtype=dt, device=base.device)
        for i in range(len(xs)):
            m += v[i]
        den = torch.full((e - s,), divisor, dtype=dt, device=base.device)
    if normalize:
        m = m / den
    n = torch.zeros(e - s, dtype=torch.int64, device=base.device)
    for i in range(len(xs)):
        n += d[i].abs() > lambdas[i] * (m - d[i]).abs()
    return b + m * (n >= k).to(dt)


def tall_ref(base: torch.Tensor, xs: list[torch.Tensor], weights: list[float], lambdas: list[float], k: int, *,
             keep: list[torch.Tensor] | None = None, elect_sign: bool = False, normalize: bool = False) -> torch.Tensor:
    """float64 oracle of tall_merge (``keep``: the TIES trim as bool masks); returns float64."""
    b = base.double()
    d = torch.stack([x.double() - b for x in xs])
    t = d * torch.stack(keep).double() if keep is not None else d
    w = torch.tensor(weights, dtype=torch.float64, device=b.device)[:, None]
    v = t * w
    if elect_sign:
        agree = (v.sign() == torch.where(v.sum(dim=0) >= 0, 1.0, -1.0).double()).double()
        m, den = (v * agree).sum(dim=0), (w * agree).sum(dim=0)
        den = torch.where(den == 0, 1.0, den)
    else:
        m, den = v.sum(dim=0), float(w.sum())
        den = 1.0 if abs(den) < NORMALIZE_EPS else den
    if normalize:
        m = m / den
    lam = torch.tensor(lambdas, dtype=torch.float64, device=b.device)[:, None]
    n = (d.abs() > lam * (m - d).abs()).sum(dim=0)
    return b + m * (n >= k).double()
