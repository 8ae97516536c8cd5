# Exact global top-k over a stream of tensors for several tasks sharing one base (CPI-FT's core regions,
# docs/cpi-ft.md#core-region): count and refine (radix select over the whole stream), then pack (or
# per-tensor cuts); ties by tensor in stream order, then lowest flat index. Memory: two 512 KiB
# histograms per task, whatever the number of tensors.
# Precision: exact for the float32 scores of kernels/scores.py; every backend gives the same bits.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernelstopkpy
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .masks import overlap, pack_cut
from .scores import score_deltas, score_histogram
from .select import Cut, RadixSelect, tie_index


@dataclass(frozen=True)
class Threshold:
    """Where task i's selection lies: value v, #(s > v), #(s == v) over the stream, and k."""

    k: int
    value: float
    above: int
    equal: int


class GlobalTopK:
    """Drive the three passes; call each pass's method once per tensor, in the same order each pass.

    Example:
        top = GlobalTopK(tasks=2)
        for base, xs, block in stream(): top.count(base, xs, block)
        top.fix([k0, k1])
        for base, xs, block in stream(): top.refine(base, xs, block)
        for base, xs, block in stream(): masks = top.pack(base, xs, block)  # [(packed, count)] per task
    """

    def __init__(self, tasks: int, *, device: torch.device | str | None = None, backend: str | None = None):
        if tasks < 1:
            raise ValueError(f"GlobalTopK: need at least one task, got {tasks}")
        self.backend = backend
        self.selects = [RadixSelect(device) for _ in range(tasks)]
        self.thresholds: list[Threshold] | None = None
        self._ties_left: list[int] = []

    def _inputs(self, base: torch.Tensor | None, x: torch.Tensor, block: int):
        """(x, base) to score entry-wise: the inputs themselves, or their block scores."""
        if block == 1:
            return x, base
        return score_deltas(x, base, block=block, backend=self.backend), None

    def _check(self, xs: Sequence[torch.Tensor]) -> None:
        if len(xs) != len(self.selects):
            raise ValueError(f"GlobalTopK: expected {len(self.selects)} task tensors, got {len(xs)}")

    def count(self, base: torch.Tensor | None, xs: Sequence[torch.Tensor], block: int = 1) -> None:
        """Pass 1 for one tensor."""
        self._check(xs)
        for rs, x in zip(self.selects, xs):
            score_histogram(x, base, block=block, hist=rs.high, backend=self.backend)
            rs.total += -(-x.numel() // block)

    @property
    def totals(self) -> list[int]:
        """Scores counted per task in pass 1 (the D of k = floor(p·D/100))."""
        return [rs.total for rs in self.selects]

    def fix(self, ks: Sequence[int]) -> None:
        """After pass 1: the number of entries each task selects."""
        if len(ks) != len(self.selects):
            raise ValueError(f"GlobalTopK: expected {len(self.selects)} values of k, got {len(ks)}")
        for rs, k in zip(self.selects, ks):
            rs.select_bin(int(k))
        self._ks = [int(k) for k in ks]

    def refine(self, base: torch.Tensor | None, xs: Sequence[torch.Tensor], block: int = 1) -> None:
        """Pass 2 for one tensor."""
        self._check(xs)
        for rs, x in zip(self.selects, xs):
            if rs.bin >= 0:
                score_histogram(x, base, block=block, hist=rs.low, high_bin=rs.bin, backend=self.backend)

    def finish_refine(self) -> list[Threshold]:
        """After pass 2: the thresholds (also kept in .thresholds)."""
        out = []
        for rs, k in zip(self.selects, self._ks):
            value, above, equal = rs.threshold()
            out.append(Threshold(k=k, value=value, above=above, equal=equal))
        self.thresholds = out
        self._ties_left = [t.k - t.above for t in out]
        return out

    def pack(self, base: torch.Tensor | None, xs: Sequence[torch.Tensor], block: int = 1
             ) -> list[tuple[torch.Tensor, int]]:
        """Pass 3 for one tensor: (packed mask, selected count) per task."""
        self._check(xs)
        if self.thresholds is None:
            self.finish_refine()
        out = []
        for i, (x, t) in enumerate(zip(xs, self.thresholds)):
            sx, sb = self._inputs(base, x, block)
            n = sx.numel()
            value = t.value if t.k else math.inf
            # Ties need counting only when some, not all, of them are selected (rare with real deltas).
            split = t.k and t.k - t.above < t.equal
            packed, ties = pack_cut(sx, sb, cut=Cut(value, n), count_ties=bool(split), backend=self.backend)
            if split and ties > self._ties_left[i]:
                # The tie budget runs out inside this tensor: keep only its first ties.
                last = tie_index(sx, sb, value, self._ties_left[i], backend=self.backend)
                packed, _ = pack_cut(sx, sb, cut=Cut(value, last), out=packed, backend=self.backend)
                ties = self._ties_left[i]
            self._ties_left[i] -= ties
            out.append((packed, overlap(packed, packed, backend=self.backend)[0]))
        return out

    def fixed_cut(self, task: int, n: int) -> Cut | None:
        """After pass 2: task's Cut of the next tensor (n entries) when it needs no look at its scores,
        else None (its ties are split and some are still to place: see ``cuts``)."""
        t = self.thresholds[task]
        if t.k == 0:
            return Cut.none()
        if t.k == self.selects[task].total:
            return Cut.all()
        if t.k - t.above == t.equal:
            return Cut(t.value, n - 1)
        return Cut(t.value, -1) if self._ties_left[task] == 0 else None

    def cuts(self, base: torch.Tensor | None, xs: Sequence[torch.Tensor]) -> list[Cut]:
        """Pass 3 for one tensor of single-entry scores: one Cut per task (the first ties in stream
        order go to the tensors first in it, lowest flat index first)."""
        self._check(xs)
        if self.thresholds is None:
            self.finish_refine()
        out = []
        for i, x in enumerate(xs):
            n = x.numel()
            cut = self.fixed_cut(i, n)
            if cut is None:
                value, left = self.thresholds[i].value, self._ties_left[i]
                _, ties = pack_cut(x, base, cut=Cut(value, n), count_ties=True, backend=self.backend)
                if ties >= left:
                    cut = Cut(value, tie_index(x, base, value, left, backend=self.backend))
                    ties = left
                else:
                    cut = Cut(value, n - 1)
                self._ties_left[i] -= ties
            out.append(cut)
        return out
