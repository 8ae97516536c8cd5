# Arcee Fusion of a base a and one other model b (mergekit 0.1.5's `arcee_fusion`), per tensor:
#   importance = |b − a| · KL_row,  KL_row = Σ_j p_j log(p_j / q_j) over each row of the last dimension,
#                p = softmax(b) + 1e-8, q = softmax(a) + 1e-8 (a 1-D tensor is one row)
#   θ = Q(0.5) + 1.5·(Q(0.75) − Q(0.25)),  Q(f) = the floor(f·(n − 1))-th smallest importance (0-based)
#   out = a + (b − a)·[importance ≥ θ]
# The entries whose change matters most (an outlier of importance, Tukey's fence) take b, the rest stay a.
# mergekit estimates the quantiles from a random sample of 10^6 entries on larger tensors; cpift takes
# them exactly (deterministic, the same as mergekit's up to 10^6 entries).
#
# Precision: storage → float32 (float64 for float64 inputs), torch operations in mergekit's order, one
# rounding on store; arcee_fusion_ref is the float64 oracle. Not elementwise (a softmax per row and three
# order statistics per tensor), so one torch path for every backend: it holds ~6 float32 copies of the
# tensor, reads 2 and writes 1 per element.
from __future__ import annotations

from typing import Sequence

import torch

from ._scratch import check_flat, compute_dtype

EPS = 1e-8  # mergekit's floor added to the softmax probabilities
QUANTILES = (0.25, 0.5, 0.75)


def _rows(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return x.view(-1, shape[-1]) if len(shape) > 0 and shape[-1] > 0 else x.view(1, -1)


def _importance(a: torch.Tensor, b: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    p = torch.softmax(_rows(b, shape), dim=-1) + EPS
    q = torch.softmax(_rows(a, shape), dim=-1) + EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return ((b - a).abs().view_as(p) * kl).view(-1)


def _threshold(importance: torch.Tensor) -> torch.Tensor:
    """Q(0.5) + 1.5·(Q(0.75) − Q(0.25)) as mergekit rounds it (float32 positions and arithmetic)."""
    n = importance.numel()
    ranks = (torch.tensor(QUANTILES, device="cpu") * (n - 1)).long()
    q1, median, q3 = (torch.kthvalue(importance, int(r) + 1).values for r in ranks)
    return median + 1.5 * (q3 - q1)


def arcee_fusion(a: torch.Tensor, b: torch.Tensor, shape: Sequence[int], *, out: torch.Tensor) -> torch.Tensor:
    """Write a + (b − a)·[importance ≥ θ] into out (flat tensors of a tensor of ``shape``)."""
    check_flat("a", a)
    check_flat("b", b, a.numel())
    check_flat("out", out, a.numel())
    if a.numel() == 0:
        return out
    dt = compute_dtype(a, b)
    fa, fb = a.to(dt), b.to(dt)
    importance = _importance(fa, fb, shape)
    keep = importance >= _threshold(importance)
    out.copy_(fa + (fb - fa) * keep)
    return out


def arcee_fusion_ref(a: torch.Tensor, b: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """float64 oracle of arcee_fusion (returns float64)."""
    a64, b64 = a.double(), b.double()
    importance = _importance(a64, b64, shape)
    n = importance.numel()
    order = torch.sort(importance).values
    q1, median, q3 = (order[int(f * (n - 1))] for f in QUANTILES)
    return a64 + (b64 - a64) * (importance >= median + 1.5 * (q3 - q1))
