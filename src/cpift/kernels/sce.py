# SCE (select, calculate, erase; mergekit 0.1.5's `sce`) of N task tensors over a base: variance scores
# and an exact top-k selection on them, per-model square sums for the weights, then the sign-elected
# weighted disjoint mean (sign +1 at a zero sum, the 1e-6 floor), each one pass over the inputs.
# Precision: mergekit's float32 operations in its order, no fma; float64 partials; scores and combine
# bit-identical across torch, fused CPU and Triton. sce_ref is the float64 oracle.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernelsscepy
from __future__ import annotations

from collections.abc import Sequence

import torch

from ._scratch import check_flat, chunks, compute_dtype, scratch
from .backend import resolve
from .finite import note_written
from .select import Cut, cut_keep, magnitude_cut

DEN_EPS = 1e-6  # mergekit's floor under the agreeing weights' sum
WEIGHT_EPS = 1e-6  # below this |Σ W| mergekit weighs the models equally


def _check(base: torch.Tensor, xs: Sequence[torch.Tensor], scores: torch.Tensor | None = None) -> int:
    n = base.numel()
    check_flat("base", base)
    if len(xs) == 0:
        raise ValueError("sce: need at least one task tensor")
    for i, x in enumerate(xs):
        check_flat(f"xs[{i}]", x, n)
    if scores is not None:
        check_flat("scores", scores, n)
        if scores.dtype != torch.float32:
            raise ValueError(f"sce: scores must be float32, got {scores.dtype}")
    return n


def _fused(be: str, dt: torch.dtype, *tensors: torch.Tensor | None) -> str:
    """'cpu' or 'triton' when that fused kernel takes these tensors, else 'torch'."""
    if dt != torch.float32:
        return "torch"
    if be == "cpu":
        from ._cpu import supports

        return "cpu" if supports(*tensors) else "torch"
    return be


def sce_variance(base: torch.Tensor, xs: Sequence[torch.Tensor], *, out: torch.Tensor,
                 backend: str | None = None) -> torch.Tensor:
    """Write the population variance over the models of τ_i = x_i − b per entry into out (float32)."""
    n = _check(base, xs, out)
    dt = compute_dtype(base, *xs)
    be = _fused(resolve(backend, base, *xs, out), dt, base, *xs, out)
    if be == "cpu":
        from ._sce_cpu import variance_cpu

        variance_cpu(base, list(xs), out=out)
        return out
    if be == "triton":
        from ._sce_triton import variance_triton

        return variance_triton(base, list(xs), out=out)
    count = len(xs)
    for s, e in chunks(n):
        m = e - s
        fb = scratch("sce.base", m, dt, base.device).copy_(base[s:e])
        d = scratch("sce.d", m, dt, base.device)
        mean = scratch("sce.mean", m, torch.float64, base.device).zero_()
        var = scratch("sce.var", m, torch.float64, base.device).zero_()
        d64 = scratch("sce.d64", m, torch.float64, base.device)
        for x in xs:
            d.copy_(x[s:e]).sub_(fb)  # τ_i rounded in the compute dtype, as mergekit forms it
            mean.add_(d64.copy_(d))
        mean.div_(count)
        for x in xs:
            d.copy_(x[s:e]).sub_(fb)
            d64.copy_(d).sub_(mean)
            var.addcmul_(d64, d64)
        out[s:e].copy_(var.div_(count))
    return out


def select_cut(scores: torch.Tensor, select_topk: float, *, backend: str | None = None) -> Cut:
    """The Cut keeping mergekit's k = int(count_nonzero(scores) · select_topk) largest scores."""
    if select_topk >= 1:
        return Cut.all()
    if select_topk <= 0:
        return Cut.none()
    nonzero = int(torch.count_nonzero(scores))
    # mergekit multiplies the int64 count by the float in torch (a float32 result), then truncates.
    k = int(torch.tensor(nonzero, dtype=torch.int64, device="cpu") * select_topk)
    return magnitude_cut(scores, None, k, backend=backend)


def sce_square_sums(base: torch.Tensor, xs: Sequence[torch.Tensor], *, scores: torch.Tensor | None = None,
                    cut: Cut | None = None, backend: str | None = None) -> list[float]:
    """Σ_j τ_ij² per model over the entries the Cut keeps on scores (all entries without a Cut)."""
    n = _check(base, xs, scores)
    if (scores is None) != (cut is None):
        raise ValueError("sce_square_sums: give scores and cut together")
    dt = compute_dtype(base, *xs)
    be = _fused(resolve(backend, base, *xs), dt, base, *xs, scores)
    if be == "cpu":
        from ._sce_cpu import square_sums_cpu

        return square_sums_cpu(base, list(xs), scores, cut)
    if be == "triton":
        from ._sce_triton import square_sums_triton

        return square_sums_triton(base, list(xs), scores, cut)
    sums = [0.0] * len(xs)
    for s, e in chunks(n):
        m = e - s
        fb = scratch("sce.base", m, dt, base.device).copy_(base[s:e])
        d = scratch("sce.d", m, dt, base.device)
        d64 = scratch("sce.d64", m, torch.float64, base.device)
        keep = None if cut is None else cut_keep(scores[s:e], cut, s,
                                                 out=scratch("sce.keep", m, torch.float32, base.device))
        for i, x in enumerate(xs):
            d.copy_(x[s:e]).sub_(fb)
            if keep is not None:
                d.mul_(keep)
            d64.copy_(d)
            sums[i] += float(torch.dot(d64, d64))
    return sums


def sce_weights(square_sums: Sequence[float], n: int) -> list[float]:
    """mergekit's sce_weight: W_i = Σ τ_i² / n, w_i = W_i / Σ W (1/N when |Σ W| < 1e-6)."""
    means = [s / n if n else float("nan") for s in square_sums]
    total = sum(means)
    if not abs(total) >= WEIGHT_EPS:  # also NaN (an empty tensor: torch's mean of nothing)
        return [1.0 / len(means)] * len(means)
    return [m / total for m in means]


def sce_combine(base: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float], *,
                scores: torch.Tensor | None = None, cut: Cut | None = None, out: torch.Tensor,
                backend: str | None = None) -> torch.Tensor:
    """Write b + Σ_{agree} w_i τ_i / max(Σ_{agree} w_i, 1e-6) into out (the erase step; see the header)."""
    n = _check(base, xs, scores)
    check_flat("out", out, n)
    if len(weights) != len(xs):
        raise ValueError(f"sce_combine: {len(xs)} tensors but {len(weights)} weights")
    if (scores is None) != (cut is None):
        raise ValueError("sce_combine: give scores and cut together")
    dt = compute_dtype(base, *xs)
    be = _fused(resolve(backend, base, *xs, out), dt, base, *xs, scores, out)
    if be == "cpu":
        from ._sce_cpu import combine_cpu

        note_written(out, combine_cpu(base, list(xs), [float(w) for w in weights], scores, cut, out=out))
        return out
    if be == "triton":
        from ._sce_triton import combine_triton

        return combine_triton(base, list(xs), [float(w) for w in weights], scores, cut, out=out)
    for s, e in chunks(n):
        m = e - s
        fb = scratch("sce.base", m, dt, base.device).copy_(base[s:e])
        keep = None if cut is None else cut_keep(scores[s:e], cut, s,
                                                 out=scratch("sce.keep", m, torch.float32, base.device))
        total = scratch("sce.sum", m, dt, base.device).zero_()
        deltas = []
        for i, x in enumerate(xs):
            d = scratch(f"sce.d{i}", m, dt, base.device).copy_(x[s:e]).sub_(fb)
            if keep is not None:
                d.mul_(keep)
            total.add_(d)
            deltas.append(d)
        sign = torch.ge(total, 0.0, out=scratch("sce.ge", m, torch.bool, base.device))
        s_f = torch.where(sign, 1.0, -1.0) if dt == torch.float64 else total.copy_(sign).mul_(2.0).sub_(1.0)
        num = scratch("sce.num", m, dt, base.device).zero_()
        den = scratch("sce.den", m, dt, base.device).zero_()
        agree = scratch("sce.agree", m, dt, base.device)
        tmp = scratch("sce.tmp", m, dt, base.device)
        for d, w in zip(deltas, weights):
            torch.mul(d, s_f, out=agree).gt_(0.0)  # 1 where sign(τ_i) = s
            num.add_(torch.mul(d, w, out=tmp).mul_(agree))
            den.add_(agree.mul_(w))
        fb.add_(num.div_(den.clamp_(min=DEN_EPS)))
        out[s:e].copy_(fb)
    return out


def sce_merge(base: torch.Tensor, xs: Sequence[torch.Tensor], select_topk: float, *, out: torch.Tensor,
              backend: str | None = None) -> torch.Tensor:
    """The whole SCE merge of one tensor into out: select (select_topk < 1), calculate, erase."""
    if not 0.0 <= select_topk <= 1.0:
        raise ValueError(f"sce: select_topk must be in [0, 1], got {select_topk}")
    n = _check(base, xs)
    scores = cut = None
    if select_topk < 1:
        scores = sce_variance(base, xs, out=torch.empty(n, dtype=torch.float32, device=base.device),
                              backend=backend)
        cut = select_cut(scores, select_topk, backend=backend)
    weights = sce_weights(sce_square_sums(base, xs, scores=scores, cut=cut, backend=backend), n)
    return sce_combine(base, xs, weights, scores=scores, cut=cut, out=out, backend=backend)


def sce_ref(base: torch.Tensor, xs: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor:
    """float64 oracle of sce_merge (the selection on the float32-rounded variances, ties to the lowest
    index by a stable sort); returns float64."""
    n = _check(base, xs)
    tau = torch.stack([x.double() - base.double() for x in xs])
    if select_topk < 1:
        var = tau.float().double().var(0, unbiased=False).float().double() if n else tau.sum(0)
        k = int(torch.tensor(int(torch.count_nonzero(var)), dtype=torch.int64, device="cpu") * select_topk)
        keep = torch.zeros(n, dtype=torch.float64, device=base.device)
        keep[torch.sort(var, descending=True, stable=True).indices[:k]] = 1.0
        tau = tau * keep
    means = (tau * tau).mean(1)
    w = means / means.sum() if abs(float(means.sum())) >= WEIGHT_EPS else torch.full_like(means, 1 / len(xs))
    s = torch.where(tau.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(tau) == s).double()
    den = (w[:, None] * agree).sum(0).clamp(min=DEN_EPS)
    return base.double() + (w[:, None] * agree * tau).sum(0) / den
