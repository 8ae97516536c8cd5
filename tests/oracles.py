"""Every float64 reference the tests compare cpift with, each written once from its method's definition
(docs/methods.md, docs/cpi-ft.md; mergekit 0.1.5's code where cpift follows it), independently of
src/cpift/kernels. Inputs are tensors of any floating dtype; results are float64."""

from __future__ import annotations

import math

import torch


def linear64(xs, ws):
    return sum(w * x.double() for w, x in zip(ws, xs)) / sum(ws)


def slerp_coefficients64(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[float, float]:
    """(ca, cb) of SLERP(a, b, t) = ca·a + cb·b, over the flattened vectors (docs/cpi-ft.md#slerp): a
    norm ≤ 1e-8 leaves its vector as is; |d| > 0.9995 gives the lerp."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = a.norm().item(), b.norm().item()
    d = torch.dot(a / (na if na > 1e-8 else 1.0), b / (nb if nb > 1e-8 else 1.0)).item()
    d = max(-1.0, min(1.0, d))
    if abs(d) > 0.9995:
        return 1 - t, t
    om = math.acos(d)
    return math.sin((1 - t) * om) / math.sin(om), math.sin(t * om) / math.sin(om)


def slerp64(a, b, t):
    """SLERP of two tensors, each one vector; the result has a's shape."""
    ca, cb = slerp_coefficients64(a, b, t)
    return ca * a.double() + cb * b.double()


def task_arithmetic64(base, xs, ws, lam):
    b = base.double()
    return b + lam * sum(w * (x.double() - b) for w, x in zip(ws, xs))


def trim64(base, x, density):
    """Keep the k = floor(density·n) largest |δ|; the score is |δ| in float32 as cpift defines it,
    ties broken by the lowest flat index (a stable sort)."""
    d = (x.double() - base.double()).reshape(-1)
    score = (x.float() - base.float()).abs().reshape(-1)
    k = math.floor(density * d.numel())
    order = torch.sort(score, descending=True, stable=True).indices
    keep = torch.zeros_like(d, dtype=torch.bool)
    keep[order[:k]] = True
    return torch.where(keep, d, torch.zeros_like(d))


def elect64(base, deltas, ws, lam):
    """cpift's sign election (flattened): s = sign(Σ w_i δ_i), a zero sum elects nothing; the agreeing
    models' weighted mean of δ, b where none agrees."""
    b = base.double().reshape(-1)
    s = torch.sign(sum(w * d for w, d in zip(ws, deltas)))
    num = torch.zeros_like(b)
    den = torch.zeros_like(b)
    for w, d in zip(ws, deltas):
        agree = (torch.sign(d) == s) & (s != 0)
        num += torch.where(agree, w * d, 0.0)
        den += torch.where(agree, torch.full_like(d, w), 0.0)
    mixed = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
    return b + lam * mixed


def ties64(base, xs, ws, density, lam=1.0, *, mergekit=False, rescale=False, normalize=True):
    """TIES; the result has base's shape. ``density``: one for every model, or one per model.

    cpift's definition (default): trim64 per model, then elect64 (a zero weighted sum elects nothing).
    ``mergekit=True``: mergekit 0.1.5's ``ties``: the trim ranks the float64 delta rounded to float32
    (k = int(density·n), ties to the lowest index), ``rescale`` restores each trimmed delta's L1 norm
    (unscaled when either norm is below 1e-7), s = sign(Σ w_i δ_i) with +1 at a zero sum, models agree
    by sign(w_i δ_i), and ``normalize=False`` sums the agreeing deltas instead of averaging them.
    """
    dens = list(density) if isinstance(density, (list, tuple)) else [density] * len(xs)
    if not mergekit:
        deltas = [trim64(base, x, d) for x, d in zip(xs, dens)]
        return elect64(base, deltas, ws, lam).reshape(base.shape)
    b = base.reshape(-1).double()
    ds = []
    for x, density_i in zip(xs, dens):
        d = x.reshape(-1).double() - b
        keep = torch.zeros_like(d)
        keep[torch.sort(d.float().abs(), descending=True, stable=True).indices[:int(density_i * d.numel())]] = 1.0
        kept = d * keep
        if rescale and density_i < 1:
            before, after = float(d.abs().sum()), float(kept.abs().sum())
            if before >= 1e-7 and after >= 1e-7:
                kept = kept * (before / after)
        ds.append(kept)
    wd = torch.stack([w * d for w, d in zip(ws, ds)])
    mask = (torch.sign(wd) == torch.where(wd.sum(0) >= 0, 1.0, -1.0)).double()
    mixed = (wd * mask).sum(0)
    if normalize:
        div = (torch.tensor(ws, dtype=torch.float64)[:, None] * mask).sum(0)
        mixed = mixed / torch.where(div == 0, 1.0, div)
    return (b + lam * mixed).reshape(base.shape)


def sce64(base: torch.Tensor, xs: list[torch.Tensor], topk: float) -> torch.Tensor:
    """mergekit's sce_merge; the variance ranked as its float32 value (as mergekit's float32 torch.var
    gives it), ties to the lowest index (a stable sort). The result has base's shape."""
    shape = base.shape
    b = base.reshape(-1).double()
    tau = torch.stack([x.reshape(-1).double() - b for x in xs])
    if topk < 1:
        var = torch.var(tau.float().double(), dim=0, unbiased=False).float().double()
        k = int(torch.count_nonzero(var) * topk)
        keep = torch.zeros_like(b)
        keep[torch.sort(var, descending=True, stable=True).indices[:k]] = 1.0
        tau = tau * keep
    w = tau.square().mean(dim=1)
    w = w / w.sum() if abs(float(w.sum())) >= 1e-6 else torch.full_like(w, 1.0 / len(xs))
    erased = w[:, None] * (torch.sign(tau) == torch.where(tau.sum(0) >= 0, 1.0, -1.0))
    return (b + (tau * erased).sum(0) / erased.sum(0).clamp(min=1e-6)).reshape(shape)


def nearswap64(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's nearswap of the base a towards b."""
    a, b = a.double(), b.double()
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0.0, 1.0)
    return w * b + (1 - w) * a


def breadcrumbs_keep64(x, b, density, gamma):
    """mergekit's magnitude_outliers mask: stable ascending sort of the float32 |δ|, keep bot..bot+t."""
    n = x.numel()
    t, top = int(density * n), int(gamma * n)
    bot = max(0, n - t - top)
    order = torch.sort((x.double() - b.double()).float().abs(), stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[bot:bot + t]] = True
    return keep


def stock64(base, xs, filter_wise=False):
    """Model Stock (mergekit 0.1.5's model_stock): returns (out, t)."""
    b = base.double()
    rows = b.reshape(1, -1) if not filter_wise or b.dim() < 2 else b.reshape(-1, b.shape[-1])
    ds = [x.double().reshape(rows.shape) - rows for x in xs]
    n = len(ds)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = sum(((ds[i] * ds[j]).sum(-1) / (ds[i].norm(dim=-1) * ds[j].norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
              for i, j in pairs) / len(pairs)
    den = 1 + (n - 1) * cos
    t = torch.where(den.abs() < 1e-6, torch.zeros_like(cos), n * cos / den)
    out = t[:, None] * sum(x.double().reshape(rows.shape) for x in xs) / n + (1 - t[:, None]) * rows
    return out.reshape(base.shape), t


def fuse64(backbone, tasks, masks, overlap, base=None, omega=None):
    """CPI fusion (docs/cpi-ft.md#fusion) of state dicts: incremental SLERP with norms and dots over
    the entries in no core, then each core transplanted (``last``, or ``largest`` |θ_i − θ_0|)."""
    out = {}
    for n, b in backbone.items():
        if not b.is_floating_point():
            out[n] = b
            continue
        cores = [mk[n] if n in mk else None for mk in masks]
        union = torch.zeros(b.numel(), dtype=torch.bool)
        for c in cores:
            if c is not None:
                union |= c
        m = b.double().reshape(-1)
        for k, t in enumerate(tasks, 1):
            x = t[n].double().reshape(-1)
            ca, cb = slerp_coefficients64(m[~union], x[~union], omega if omega is not None else 1 / (k + 1))
            m = ca * m + cb * x
        best = torch.full_like(m, -1.0)
        for t, c in zip(tasks, cores):
            if c is None:
                continue
            x = t[n].double().reshape(-1)
            if overlap == "last":
                m = torch.where(c, x, m)
            else:
                s = (t[n].float() - base[n].float()).abs().double().reshape(-1)
                win = c & (s >= best)
                m, best = torch.where(win, x, m), torch.where(win, s, best)
        out[n] = m.reshape(b.shape)
    return out


# The hypersphere merges: mergekit 0.1.5's code (merge_methods/nuslerp.py, multislerp.py, karcher.py)
# per element, ported to float64 torch.
def nuslerp64(t, v0, v1, *, base=None, flatten=True, row_wise=False, eps=1e-8):
    v0, v1 = v0.double(), v1.double()
    b = None if base is None else base.double()
    if b is not None:
        v0, v1 = v0 - b, v1 - b
    shape, dim = v0.shape, 0 if row_wise else -1
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    if dim != -1 and not flatten:
        res = res.transpose(dim, -1)
    res = res.reshape(shape)
    return res if b is None else res + b


def multislerp64(xs, w, *, base=None, normalize=True, eps=1e-8):
    if len(xs) == 1:
        return xs[0].double()
    t = torch.stack([x.double().reshape(-1) for x in xs])
    b = None if base is None else base.double().reshape(-1)
    if b is not None:
        t = t - b
    w = torch.tensor(w, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = t.norm(dim=-1, keepdim=True)
    u = t / (norms + eps)
    mean = (u * w.view(-1, 1)).sum(0)
    if mean.norm() < eps:
        if len(xs) == 2:
            res = t[0] * w[0] + t[1] * w[1]
            return res if b is None else res + b
        raise ValueError("zero mean")
    mean = mean / mean.norm()
    tangents = u - (u * mean).sum(-1, keepdim=True) * mean
    tr = (tangents * w.view(-1, 1)).sum(0)
    tn = tr.norm() + eps
    res = (mean * torch.cos(tn) + tr * (torch.sin(tn) / tn)) * (norms.squeeze(-1) * w).sum()
    return res if b is None else res + b


def karcher64(xs, *, max_iter=10, tol=1e-5, dtype=torch.float64):
    """mergekit's karcher_merge_tensors in `dtype` (float32: its own arithmetic on float32 inputs)."""
    xs = [x.to(dtype).reshape(-1) for x in xs]
    if len(xs) == 1:
        return xs[0]
    norms = [x.norm() for x in xs]
    units = [torch.zeros_like(x) if n.item() == 0 else x / n for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return xs[0] * 0
    alpha = 1.0 / len(valid)
    us = [units[i] for i in valid]
    mean = sum(alpha * u for u in us)
    mean = us[0].clone() if mean.norm().item() < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in us:
            dot = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = tangent.norm()
        if tn.item() < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        if mean.norm().item() > tol:
            mean = mean / mean.norm()
    return sum(n / len(xs) for n in norms) * mean
