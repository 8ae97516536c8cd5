# Breadcrumbs' band: the entries of ascending ranks lo .. hi − 1 by (score, flat index) of one tensor,
# s = fl32(|x − base|), as a Band of two exact selections (select.py's kth_largest) with the ties taken
# from the highest index, the ascending order's reverse; band_mask applies it, and kernels/ties.py's
# delta merge applies it inside its pass (no flipped or masked copy of a tensor).
# Precision: exact for the float32 scores; every backend gives the same Band.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernelsselectpy
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .select import check_k, kth_largest, score_oracle


@dataclass(frozen=True)
class Band:
    """Entries of ascending ranks lo .. hi − 1 by (score, flat index): those among the n − lo largest
    (s > low, or s == low at flat index ≥ low_first) and not among the n − hi largest (s > high, or
    s == high at flat index ≥ high_first); ties to the highest index, as the ascending order's reverse."""

    low: float
    low_first: int
    high: float
    high_first: int

    @classmethod
    def all(cls, n: int) -> Band:
        """Every (non-NaN) entry of a tensor of n: lo = 0, hi = n."""
        return cls(low=-math.inf, low_first=0, high=math.inf, high_first=n)


def magnitude_band(x: torch.Tensor, base: torch.Tensor | None, lo: int, hi: int, *,
                   backend: str | None = None) -> Band:
    """The Band of the entries of ascending ranks lo .. hi − 1 by (|x − base|, flat index) of a 1-D tensor
    (breadcrumbs' mask: the lo smallest and the n − hi largest dropped, lower index first among ties)."""
    n = check_k(x, base, lo, "magnitude_band")
    if not lo <= hi <= n:
        raise ValueError(f"magnitude_band: need lo ≤ hi ≤ {n}, got lo {lo}, hi {hi}")
    low, low_first = _top_high(x, base, n - lo, backend)
    high, high_first = _top_high(x, base, n - hi, backend)
    return Band(low=low, low_first=low_first, high=high, high_first=high_first)


def _top_high(x: torch.Tensor, base: torch.Tensor | None, k: int, backend: str | None) -> tuple[float, int]:
    """(v, f) selecting the k largest with ties to the highest index: s > v, or s == v at index ≥ f."""
    n = x.numel()
    if k == 0:
        return math.inf, n
    if k == n:
        return -math.inf, 0
    return kth_largest(x, base, k, backend, high_ties=True)


def band_mask(scores: torch.Tensor, band: Band, start: int) -> torch.Tensor:
    """Bool mask of the entries a Band selects, for a score chunk whose first flat index is start."""
    if scores.dtype != torch.float32:
        scores = scores.float()
    return _top_mask(scores, band.low, band.low_first - start) & ~_top_mask(scores, band.high, band.high_first - start)


def _top_mask(scores: torch.Tensor, value: float, first: int) -> torch.Tensor:
    mask = torch.gt(scores, value)
    first = max(0, first)
    if first < scores.numel():
        mask[first:].logical_or_(torch.eq(scores[first:], value))
    return mask


def band_mask_ref(x: torch.Tensor, base: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    """Oracle bool mask of magnitude_band: ascending ranks lo .. hi − 1 by a stable float64 sort."""
    order = torch.sort(score_oracle(x, base), stable=True).indices
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    mask[order[lo:hi]] = True
    return mask
