"""float64 oracles of nuslerp, multislerp and karcher: mergekit 0.1.5's code (merge_methods/nuslerp.py,
multislerp.py, karcher.py) per element, ported to float64 torch; shared by the kernel and method tests."""

from __future__ import annotations

import torch


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
