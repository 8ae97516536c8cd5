# Model Stock (Jang et al. 2024; mergekit 0.1.5's `model_stock`): t = N·c / (1 + (N − 1)·c) from the
# mean pairwise cosine c of the deltas, out = b + t·mean δ_i; the Gram matrix pass (kernels/gram.py),
# then the delta kernel with λ = t; the per-row form (filter_wise) in torch ops per block of rows.
# Precision: float32 per element (float64 inputs: float64), one rounding on store. model_stock_ref is
# the float64 oracle.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernelsmodel_stockpy
from __future__ import annotations

from collections.abc import Sequence

import torch

from ._scratch import CHUNK, check_flat, compute_dtype
from .gram import buffer, gram
from .threads import serial_reductions
from .ties import delta_merge

EPS = 1e-6  # mergekit's clamp of the norm product
GUARD = 1e-6  # |1 + (N−1)·c| below this: t = 0 (mergekit's guard)


def _check(base: torch.Tensor, xs: Sequence[torch.Tensor]) -> int:
    if len(xs) < 2:
        raise ValueError(f"model_stock: need at least 2 task tensors besides the base, got {len(xs)}")
    n = base.numel()
    check_flat("base", base)
    for i, x in enumerate(xs):
        check_flat(f"xs[{i}]", x, n)
    return n


def delta_gram(base: torch.Tensor, xs: Sequence[torch.Tensor], *, backend: str | None = None) -> torch.Tensor:
    """The N×N float64 (CPU) matrix of ⟨x_i − b, x_j − b⟩ over same-length 1-D tensors (kernels/gram.py)."""
    _check(base, xs)
    return gram(xs, base=base, backend=backend)


def stock_ratio(gram: torch.Tensor) -> torch.Tensor:
    """t of every Gram matrix in ``gram`` (shape (..., N, N)): the mean pairwise cosine c, then
    N·c / (1 + (N−1)·c), 0 where the denominator is within GUARD of 0. Returns shape (...)."""
    k = gram.shape[-1]
    g = gram.double()
    norms = g.diagonal(dim1=-2, dim2=-1).clamp(min=0.0).sqrt()
    i, j = torch.triu_indices(k, k, 1, device=g.device)
    cos = (g[..., i, j] / (norms[..., i] * norms[..., j]).clamp(min=EPS)).clamp(-1.0, 1.0).mean(-1)
    den = 1.0 + (k - 1) * cos
    singular = den.abs() < GUARD
    return torch.where(singular, 0.0, k * cos / torch.where(singular, 1.0, den))


def model_stock(base: torch.Tensor, xs: Sequence[torch.Tensor], *, out: torch.Tensor,
                backend: str | None = None) -> float:
    """Write the Model Stock merge of the whole tensors into out; return its t."""
    n = _check(base, xs)
    check_flat("out", out, n)
    with serial_reductions():  # the same t whatever the thread count (torch's dot splits among threads)
        gram = delta_gram(base, xs, backend=backend)
    t = float(stock_ratio(gram))
    delta_merge(base, xs, [1.0 / len(xs)] * len(xs), lam=t, elect_sign=False, out=out, backend=backend)
    return t


def model_stock_rows(base: torch.Tensor, xs: Sequence[torch.Tensor], cols: int, *, out: torch.Tensor) -> None:
    """Model Stock per row of ``cols`` entries (mergekit's filter_wise) in torch ops on the tensors'
    device: one pass, a block of about CHUNK entries at a time."""
    n = _check(base, xs)
    check_flat("out", out, n)
    if n == 0:
        return
    if cols <= 0 or n % cols:
        raise ValueError(f"model_stock_rows: {n} entries are not rows of {cols}")
    k = len(xs)
    dt = compute_dtype(base, *xs)
    per = max(1, CHUNK // cols)
    for r0 in range(0, n // cols, per):
        s, e = r0 * cols, min(n, (r0 + per) * cols)
        rows = (e - s) // cols
        fb = buffer("stock.base", e - s, dt, base.device).copy_(base[s:e]).view(rows, cols)
        ds = [buffer(f"stock.d{i}", e - s, dt, base.device).copy_(x[s:e]).view(rows, cols).sub_(fb)
              for i, x in enumerate(xs)]
        gram = torch.empty(rows, k, k, dtype=torch.float64, device=base.device)
        for i in range(k):
            for j in range(i, k):
                gram[:, i, j] = gram[:, j, i] = torch.linalg.vecdot(ds[i], ds[j])
        t = stock_ratio(gram)
        acc = ds[0]
        for d in ds[1:]:
            acc.add_(d)
        fb.addcmul_(acc, (t / k).to(dt).unsqueeze(-1))  # b + t·Σδ/N
        out[s:e].copy_(fb.view(-1))


def model_stock_ref(base: torch.Tensor, xs: Sequence[torch.Tensor], *, cols: int | None = None) -> torch.Tensor:
    """float64 oracle (whole tensor, or per row of ``cols`` entries); returns a flat float64 tensor."""
    b = base.double().reshape(-1, base.numel() if cols is None else cols)
    ds = [x.double().reshape(b.shape) - b for x in xs]
    k = len(ds)
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            norm = (ds[i].norm(dim=-1) * ds[j].norm(dim=-1)).clamp(min=EPS)
            cos.append(((ds[i] * ds[j]).sum(-1) / norm).clamp(-1.0, 1.0))
    c = torch.stack(cos).mean(0)
    den = 1.0 + (k - 1) * c
    t = torch.where(den.abs() < GUARD, 0.0, k * c / den).unsqueeze(-1)
    return (b + t * sum(ds) / k).reshape(-1)
