"""Float64 oracles for the merge methods, written from the method definitions independently of kernels/."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def linear64(xs, ws):
    return sum(w * x.double() for w, x in zip(ws, xs)) / sum(ws)


def slerp64(a, b, t):
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = a.norm().item(), b.norm().item()
    d = torch.dot(a / (na if na > 1e-8 else 1.0), b / (nb if nb > 1e-8 else 1.0)).item()
    if abs(d) > 0.9995:
        return (1 - t) * a + t * b
    om = math.acos(max(-1.0, min(1.0, d)))
    return math.sin((1 - t) * om) / math.sin(om) * a + math.sin(t * om) / math.sin(om) * b


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


def ties64(base, xs, ws, density, lam):
    return elect64(base, [trim64(base, x, density) for x in xs], ws, lam)


def assert_matches(result: torch.Tensor, ref: torch.Tensor, name: str = "", scale: torch.Tensor | None = None) -> None:
    """result (in its dtype) may be at most twice as far from the float64 reference as the correctly
    rounded value, plus float32 rounding of the intermediates: a few float32 eps times ``scale``
    (the magnitude of the inputs at each entry; float32 math cannot do better than that)."""
    dtype = result.dtype
    ref = ref.reshape(result.shape).double()
    res = result.double()
    rounding = (ref.to(dtype).double() - ref).abs()
    scale = ref.abs() if scale is None else scale.reshape(result.shape).double()
    tol = 2 * rounding + 4 * torch.finfo(torch.float32).eps * scale + 1e-12
    err = (res - ref).abs()
    bad = ~(err <= tol)
    if bad.any():
        idx = bad.reshape(-1).nonzero()[:5].reshape(-1).tolist()
        r, f, e = res.reshape(-1), ref.reshape(-1), err.reshape(-1)
        detail = ", ".join(f"[{i}] got {r[i].item():.9g} want {f[i].item():.9g} err {e[i].item():.3g}"
                           for i in idx)
        raise AssertionError(f"{name}: {int(bad.sum())} of {res.numel()} entries off: {detail}")


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, through the safetensors library (not cpift's reader)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    state = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state
