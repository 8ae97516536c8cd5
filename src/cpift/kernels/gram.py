# Gram matrix G_ij = ⟨x_i − b, x_j − b⟩ of N flattened tensors (b = 0 without a base), in one read:
# per chunk the N deltas through kernels/slerp.slerp_reduce on each pair, folded on the host in float64.
# Model Stock and the hypersphere methods need nothing more of the data.
# Precision: float32 per element (float64 inputs: float64), float64 fold. gram_ref is the float64 oracle.
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernelsgrampy
from __future__ import annotations

from collections.abc import Sequence

import torch

from ._scratch import CHUNK, check_flat, chunks, compute_dtype, scratch
from .backend import resolve
from .slerp import slerp_reduce

_CUDA_CHUNK = 1 << 24  # elements per chunk on a GPU: fewer host round trips of the pair reductions


def buffer(slot: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A working buffer: the cached scratch on the CPU, the caching allocator's memory elsewhere."""
    if device.type == "cpu":
        return scratch(slot, n, dtype, device)
    return torch.empty(n, dtype=dtype, device=device)


def gram(xs: Sequence[torch.Tensor], *, base: torch.Tensor | None = None,
         backend: str | None = None) -> torch.Tensor:
    """The N×N float64 (CPU) matrix of ⟨x_i − b, x_j − b⟩ over same-length 1-D tensors (b = 0 if None)."""
    if len(xs) == 0:
        raise ValueError("gram: need at least one tensor")
    n = xs[0].numel()
    for i, x in enumerate(xs):
        check_flat(f"xs[{i}]", x, n)
    if base is not None:
        check_flat("base", base, n)
    k = len(xs)
    dt = compute_dtype(base, *xs)
    be = resolve(backend, *xs, base)
    dev = xs[0].device
    g = [[0.0] * k for _ in range(k)]
    for s, e in chunks(n, _CUDA_CHUNK if dev.type == "cuda" else CHUNK):
        fb = None if base is None else buffer("gram.base", e - s, dt, dev).copy_(base[s:e])
        ds = []
        for i, x in enumerate(xs):
            d = buffer(f"gram.d{i}", e - s, dt, dev).copy_(x[s:e])
            ds.append(d if fb is None else d.sub_(fb))
        if k == 1:
            g[0][0] += slerp_reduce(ds[0], ds[0], backend=be)[0]
        for i in range(k):
            for j in range(i + 1, k):
                aa, bb, ab = slerp_reduce(ds[i], ds[j], backend=be)
                g[i][j] += ab
                if i == 0:  # each squared norm taken once: ‖δ_0‖², ‖δ_1‖² from pair (0, 1), ‖δ_j‖² from (0, j)
                    g[j][j] += bb
                    if j == 1:
                        g[0][0] += aa
    for i in range(k):
        for j in range(i):
            g[i][j] = g[j][i]
    return torch.tensor(g, dtype=torch.float64, device="cpu")  # N×N host numbers


def gram_ref(xs: Sequence[torch.Tensor], *, base: torch.Tensor | None = None) -> torch.Tensor:
    """float64 oracle of gram."""
    m = torch.stack([x.double().reshape(-1) for x in xs])
    if base is not None:
        m = m - base.double().reshape(-1)
    return m @ m.T
