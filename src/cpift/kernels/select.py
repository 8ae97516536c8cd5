# Exact selection of the k largest scores s = fl32(|x − base|) of one tensor, as a Cut (value v, last
# tie index j: selected when s > v, or s == v at flat index ≤ j; ties to the lowest index), by radix
# select: two 2^16-bin histogram passes and, when the ties split, a third for the r-th tie; the torch
# and cpu backends first try a sampled bracket (cpu: one fused pass keeping the scores inside it in a
# reused buffer). No sort. kth_largest also gives the first tie kept from the highest index (band.py).
# Precision: exact for the float32 scores; every backend gives the same Cut.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernelsselectpy
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from ._scratch import CHUNK, check_flat, chunks, compute_dtype, scratch
from .backend import resolve
from .scores import BINS, add_high_counts, add_low_counts, score_histogram


@dataclass(frozen=True)
class Cut:
    """Selects entries with score > value, plus those with score == value and flat index ≤ last_tie."""

    value: float
    last_tie: int

    @classmethod
    def all(cls) -> Cut:
        """Select every (non-NaN) entry: every score is > −inf (k = n)."""
        return cls(value=-math.inf, last_tie=-1)

    @classmethod
    def none(cls) -> Cut:
        """Select nothing: no score is > +inf, and no index is ≤ −1 (k = 0)."""
        return cls(value=math.inf, last_tie=-1)


def _bits_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _rank_in(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bin, count in higher bins) of the rank-th largest (1-based) entry of a histogram.

    Runs in numpy over a reversed view into a reused buffer: no flip copy and no fresh tensor
    per call (both cost page faults once per tensor).
    """
    counts = hist.numpy() if hist.device.type == "cpu" else hist.cpu().numpy()
    from_top = scratch("select.rank", BINS, torch.int64).numpy()
    np.cumsum(counts[::-1], out=from_top)  # from_top[i] = count in bins ≥ BINS-1-i
    i = int(np.searchsorted(from_top, rank))
    return BINS - 1 - i, (int(from_top[i - 1]) if i > 0 else 0)


class RadixSelect:
    """Exact k-th largest of a stream of non-negative float32 score chunks, in two passes.

    Call add_high on every chunk, then select_bin(k), then add_low on every chunk (the same
    scores again, in any order), then threshold(). k may be 0 (nothing) or the total count.
    Kernels that score and count in one pass (kernels/scores.py) add to `high` / `low` directly,
    the latter only for scores in bin `bin`, and add their score count to `total`.
    """

    def __init__(self, device: torch.device | str | None = None, *, reuse: bool = False) -> None:
        self.total = 0
        if reuse and torch.device(device or "cpu").type == "cpu":
            # This thread's histograms, zeroed: only for a select that ends before the next one with
            # reuse starts in the same thread (magnitude_cut); GlobalTopK holds several and allocates.
            self.high = scratch("select.high", BINS, torch.int64)
            self.low = scratch("select.low", BINS, torch.int64)
            self.high.numpy().fill(0)  # numpy: torch's zero_ pays a thread barrier per call
            self.low.numpy().fill(0)
        else:
            self.high = torch.zeros(BINS, dtype=torch.int64, device=device)
            self.low = torch.zeros(BINS, dtype=torch.int64, device=device)
        self.bin = -1  # -1 matches no bin: a pass 2 for k = 0 counts nothing
        self._k: int | None = None
        self._above = 0

    def add_high(self, scores: torch.Tensor) -> None:
        """Pass 1: count the chunk's scores by their top 16 bits."""
        add_high_counts(self.high, _float32(scores))
        self.total += scores.numel()

    def select_bin(self, k: int) -> int:
        """After pass 1: fix k; return how many scores lie in bins above the k-th largest's bin."""
        if not 0 <= k <= self.total:
            raise ValueError(f"RadixSelect: k must be in [0, {self.total}], got {k}")
        self._k = k
        if k == 0:
            self.bin, self._above = -1, 0
            return 0
        self.bin, self._above = _rank_in(self.high.cpu(), k)
        return self._above

    def add_low(self, scores: torch.Tensor) -> None:
        """Pass 2: count the low 16 bits of the chunk's scores that fall in the selected bin."""
        if self._k is None:
            raise RuntimeError("RadixSelect: call select_bin(k) before add_low")
        if self._k:
            add_low_counts(self.low, _float32(scores), self.bin)

    def threshold(self) -> tuple[float, int, int]:
        """After pass 2: (k-th largest value v, #scores > v, #scores == v); (inf, 0, 0) for k = 0."""
        if self._k is None:
            raise RuntimeError("RadixSelect: call select_bin(k) and add_low before threshold")
        if self._k == 0:
            return math.inf, 0, 0
        low = self.low.cpu()
        bin_low, above_low = _rank_in(low, self._k - self._above)
        value = _bits_to_float((self.bin << 16) | bin_low)
        return value, self._above + above_low, int(low[bin_low])


def _float32(scores: torch.Tensor) -> torch.Tensor:
    if scores.dtype != torch.float32:
        raise ValueError(f"RadixSelect: scores must be float32, got {scores.dtype}")
    return scores.reshape(-1)


def magnitude_scores(
    x: torch.Tensor, base: torch.Tensor | None, start: int, end: int
) -> torch.Tensor:
    """float32 scores |x − base| of entries start..end-1, in a reused scratch buffer."""
    n = end - start
    dt = compute_dtype(x, base)
    work = scratch("select.work", n, dt, x.device)
    work.copy_(x[start:end])
    if base is not None:
        work.sub_(base[start:end])
    work.abs_()
    if dt == torch.float32:
        return work
    out = scratch("select.scores", n, torch.float32, x.device)
    return out.copy_(work)


def cut_mask(
    scores: torch.Tensor, cut: Cut, start: int, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool mask of the entries a Cut selects, for a score chunk whose first flat index is start."""
    if scores.dtype != torch.float32:
        scores = scores.float()  # the cut's value is a float32 score: compare like with like
    m = min(scores.numel(), cut.last_tie - start + 1)
    if m == scores.numel() and m > 0:  # every tie in the chunk is selected: one compare
        return torch.ge(scores, cut.value, out=out) if out is not None else torch.ge(scores, cut.value)
    mask = torch.gt(scores, cut.value, out=out) if out is not None else torch.gt(scores, cut.value)
    if m > 0:
        tie = scratch("select.tie", m, torch.bool, scores.device)
        torch.eq(scores[:m], cut.value, out=tie)
        mask[:m].logical_or_(tie)
    return mask


def cut_keep(scores: torch.Tensor, cut: Cut, start: int, *, out: torch.Tensor) -> torch.Tensor:
    """cut_mask as float32 factors (1.0 selected, 0.0 not), for multiplying deltas in place.

    Built from float ops only (no bool tensors, whose compares and masked fills cost several
    times more per element on CPU): IEEE subtraction is exact about order, x − y > 0 iff x > y,
    so sign(max(s − v, 0)) is [s > v], and 1 − sign(max(v − s, 0)) is [s ≥ v] in the tie window.
    `out` (float32, same length) may be the scores buffer itself.
    """
    if scores.dtype != torch.float32:
        scores = out.copy_(scores)  # compare float32 scores, as the cut's value is one
    m = max(0, min(scores.numel(), cut.last_tie - start + 1))
    torch.sub(scores[m:], cut.value, out=out[m:]).clamp_(min=0.0).sign_()
    if m:
        torch.sub(cut.value, scores[:m], out=out[:m]).clamp_(min=0.0).sign_().neg_().add_(1.0)
    return out


# Fast path for large tensors: a strided sample of _SAMPLE scores brackets the k-th largest in
# (lo, hi]; one pass counts the scores above hi and gathers the few inside the bracket, and the
# k-th largest is then found among those alone. It is exact whenever the bracket holds it, which
# the pass itself verifies; otherwise (an adversarial or degenerate sample) radix select runs.
# One score pass and no 65536-bin histograms instead of two passes with bincount: ~2x faster.
_SAMPLE = 1 << 16
_MARGIN = 0.01  # ±1% of ranks around the sampled quantile: ~5 sample standard deviations
# The cpu backend's one-pass selection reserves 1 byte of candidate buffer per entry (mostly untouched):
BRACKET_BUDGET = 1 << 30  # for tensors of at most this many entries; larger ones run radix select


# Counting with float ops: comparisons that produce bool tensors, and sums of them, run 3-5x
# slower than float arithmetic on this CPU. sign(s − v) is exact (±1 or 0); a float32 sum of at most
# CHUNK ones is exact too (CHUNK < 2^24).
def _count_greater(scores: torch.Tensor, value: float) -> int:
    t = scratch("select.count", scores.numel(), torch.float32, scores.device)
    return int(torch.sub(scores, value, out=t).sign_().clamp_(min=0.0).sum())


def _count_equal(scores: torch.Tensor, value: float) -> int:
    t = scratch("select.count", scores.numel(), torch.float32, scores.device)
    return scores.numel() - int(torch.sub(scores, value, out=t).abs_().sign_().sum())


def _bracket(x: torch.Tensor, base: torch.Tensor | None, k: int, n: int,
             sample: torch.Tensor | None = None) -> tuple[float, float] | None:  # sample: sorted, strided
    if n < 8 * _SAMPLE:
        return None
    if sample is None:
        xs = x[::n // _SAMPLE][:_SAMPLE].to(compute_dtype(x, base))
        sample = (xs if base is None else xs - base[::n // _SAMPLE][:_SAMPLE]).abs().float().sort().values
    below = 1.0 - k / n  # share of scores under the k-th largest
    lo_q, hi_q = below - _MARGIN, below + _MARGIN
    if lo_q <= 0.0 and hi_q >= 1.0:
        return None  # the bracket would hold the whole tensor
    # k near n or near 0: the bracket runs open to the end, and holds at most 2·_MARGIN of the scores
    m = sample.numel() - 1
    return (float(sample[math.floor(lo_q * m)]) if lo_q > 0.0 else -math.inf,
            float(sample[math.ceil(hi_q * m)]) if hi_q < 1.0 else math.inf)


def _bracket_select(x: torch.Tensor, base: torch.Tensor | None, k: int, n: int,
                    lo: float, hi: float) -> tuple[float, int, int] | None:
    """(value, #greater, #equal) of the k-th largest if it lies in (lo, hi], else None."""
    above = 0
    inside = []
    for s, e in chunks(n):
        scores = magnitude_scores(x, base, s, e)
        above += _count_greater(scores, hi) if hi < math.inf else 0  # inf − inf would be NaN
        le = scratch("select.le", e - s, torch.bool, x.device)
        gt = scratch("select.gt", e - s, torch.bool, x.device)
        torch.le(scores, hi, out=le).logical_and_(torch.gt(scores, lo, out=gt))
        inside.append(scores[le])
    cand = torch.cat(inside)
    need = k - above
    if not 0 < need <= cand.numel():
        return None
    value = float(torch.kthvalue(cand, cand.numel() - need + 1).values)
    return value, above + int((cand > value).sum()), int((cand == value).sum())


def check_k(x: torch.Tensor, base: torch.Tensor | None, k: int, what: str) -> int:
    n = x.numel()
    check_flat("x", x)
    if base is not None:
        check_flat("base", base, n)
    if not 0 <= k <= n:
        raise ValueError(f"{what}: k must be in [0, {n}], got {k}")
    return n


def magnitude_cut(x: torch.Tensor, base: torch.Tensor | None, k: int, *, backend: str | None = None) -> Cut:
    """The Cut selecting exactly the k largest |x − base| of a 1-D tensor (lowest index wins ties).

    The Triton and cpu backends run radix select with their fused scoring kernels (two passes, plus
    a tie pass when the k-th largest's ties are split); torch brackets the k-th largest by a sample.
    """
    n = check_k(x, base, k, "magnitude_cut")
    if k == 0:
        return Cut.none()
    if k == n:
        return Cut.all()
    value, last = kth_largest(x, base, k, backend, high_ties=False)
    return Cut(value=value, last_tie=last)


def kth_largest(x: torch.Tensor, base: torch.Tensor | None, k: int, backend: str | None, *,
                high_ties: bool) -> tuple[float, int]:
    """(k-th largest score v, tie index) for 0 < k < n. Ties to the lowest index: the last tie selected
    (n − 1 when every tie is); to the highest (high_ties): the first tie selected (0 when every tie is)."""
    n = x.numel()
    be = resolve(backend, x, base)
    if be == "cpu" and not _fused(x, base):
        be = "torch"  # float64 inputs: the oracle precision stays on the torch path
    if be == "cpu":
        bracketed = _bracket_cpu(x, base, k, n, high_ties)
        if bracketed is not None:
            return bracketed
    if be in ("triton", "cpu"):
        rs = RadixSelect(x.device, reuse=True)
        score_histogram(x, base, hist=rs.high, backend=be)
        rs.total = n
        rs.select_bin(k)
        score_histogram(x, base, hist=rs.low, high_bin=rs.bin, backend=be)
        found = rs.threshold()
    else:
        bracket = _bracket(x, base, k, n)
        found = _bracket_select(x, base, k, n, *bracket) if bracket is not None else None
    if found is None:
        rs = RadixSelect(reuse=True)
        for s, e in chunks(n):
            rs.add_high(magnitude_scores(x, base, s, e))
        rs.select_bin(k)
        for s, e in chunks(n):
            rs.add_low(magnitude_scores(x, base, s, e))
        found = rs.threshold()
    value, greater, equal = found
    ties = k - greater
    if ties == equal:
        return value, 0 if high_ties else n - 1
    return value, tie_index(x, base, value, equal - ties + 1 if high_ties else ties, backend=be)


def _bracket_cpu(x: torch.Tensor, base: torch.Tensor | None, k: int, n: int,
                 high_ties: bool) -> tuple[float, int] | None:
    """_kth_largest in one fused pass over (x, base) if a sample brackets the k-th largest (else None)."""
    from ._select_cpu import bracket_select_cpu, sample_scores_cpu

    if not 8 * _SAMPLE <= n <= BRACKET_BUDGET:
        return None
    bracket = _bracket(x, base, k, n, torch.from_numpy(sample_scores_cpu(x, base, n // _SAMPLE, _SAMPLE)))
    found = bracket_select_cpu(x, base, k, *bracket, high_ties=high_ties) if bracket is not None else None
    return None if found is None else (found[0], found[3])


def _fused(x: torch.Tensor, base: torch.Tensor | None) -> bool:
    from ._cpu import supports

    return supports(x, base)


def tie_index(x: torch.Tensor, base: torch.Tensor | None, value: float, r: int, *,
              backend: str | None = None) -> int:
    """Flat index of the r-th (1-based, lowest index first) score |x − base| equal to value; −1 for r = 0."""
    if r <= 0:
        return -1
    be = resolve(backend, x, base)
    if be == "cpu" and _fused(x, base):
        from ._select_cpu import tie_index_cpu

        index, seen = tie_index_cpu(x, base, value, r)
    elif be == "triton":
        from ._masks_triton import tie_counts_triton

        index, seen = _tie_in_slices(x, base, value, r, *tie_counts_triton(x, base, value))
    else:
        index, seen = _tie_in_slices(x, base, value, r, None, min(x.numel(), CHUNK))
    if index >= 0:
        return index
    raise ValueError(f"tie_index: only {seen} scores equal {value}, asked for the {r}-th (input modified?)")


def _tie_in_slices(x: torch.Tensor, base: torch.Tensor | None, value: float, r: int,
                   counts: torch.Tensor | None, span: int) -> tuple[int, int]:
    """(flat index of the r-th tie, −1 if fewer; ties seen) from per-slice tie counts.

    counts[j]: the ties among entries j·span..(j+1)·span−1, on the inputs' device (a kernel's
    per-program counts), or None to count chunk by chunk here. With counts, one prefix sum and one
    searchsorted on the device find the slice (one host sync), and only that slice is scored again.
    """
    n = x.numel()
    if counts is None:
        seen = 0
        for s, e in chunks(n, span):
            scores = magnitude_scores(x, base, s, e)
            count = _count_equal(scores, value)
            if seen + count >= r:
                return s + int((scores == value).nonzero()[r - seen - 1]), seen + count
            seen += count
        return -1, seen
    prefix = torch.cumsum(counts, 0)  # int64 on the device
    j = torch.searchsorted(prefix, torch.full((1,), r, dtype=prefix.dtype, device=prefix.device))
    last = torch.clamp(j, max=counts.numel() - 1)
    j, total, before = torch.cat([j, prefix[-1:], prefix[last] - counts[last]]).tolist()
    if j >= counts.numel():
        return -1, total
    s, e = j * span, min(n, (j + 1) * span)
    scores = magnitude_scores(x, base, s, e)
    return s + int((scores == value).nonzero()[r - before - 1]), total


def score_oracle(x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """The float32 scores |x − base| held exactly in float64 (the oracles sort these)."""
    diff = x.double() if base is None else x.double() - base.double()
    return diff.abs().float().double()  # the float32 score, held exactly in float64


def magnitude_cut_ref(x: torch.Tensor, base: torch.Tensor | None, k: int) -> Cut:
    """Oracle of magnitude_cut by a stable float64 sort (descending score, ascending index)."""
    n = x.numel()
    if k == 0:
        return Cut.none()
    if k == n:
        return Cut.all()
    scores = score_oracle(x, base)
    order = torch.sort(scores, descending=True, stable=True).indices
    value = float(scores[order[k - 1]])
    all_ties_kept = int((scores[order[k:]] == value).sum()) == 0
    return Cut(value=value, last_tie=n - 1 if all_ties_kept else int(order[k - 1]))


def magnitude_mask_ref(x: torch.Tensor, base: torch.Tensor | None, k: int) -> torch.Tensor:
    """Oracle bool mask of the k largest |x − base| (stable sort: lowest index wins ties)."""
    scores = score_oracle(x, base)
    order = torch.sort(scores, descending=True, stable=True).indices
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    mask[order[:k]] = True
    return mask

