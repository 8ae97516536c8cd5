"""TIES with ``global_trim``: one magnitude threshold per model over the whole model (the TIES paper); the
whole-model pass of ties' declaration (its ``prepare``, merge/methods/delta.py).

For model i, keep exactly k_i = floor(density_i · D) entries of |x_i − b| over all D floating-point
entries, ties at the threshold to the lowest flat index with tensors in name order. The selection is
kernels/topk.py's GlobalTopK streamed over every tensor (merge/io/stream.py: on the device asked for,
with the backend asked for): two passes, each reading the base once and every model once, and a
third only when some but not all ties are kept. The result is one Cut per (tensor, model), which
the merge pass applies like a per-tensor trim.
"""

from __future__ import annotations

import math

import torch

from cpift.kernels.select import Cut
from cpift.kernels.topk import GlobalTopK
from cpift.merge.io.checkpoint import Checkpoint
from cpift.merge.io.device import DeviceCache
from cpift.merge.io.direct_read import several_passes
from cpift.merge.io.stream import TensorStream


def global_magnitude_cuts(base: Checkpoint, models: list[Checkpoint], densities: list[float], *,
                          device: torch.device | None = None, backend: str | None = None) -> dict[str, list[Cut]]:
    """For every floating-point tensor name, one Cut per model selecting that model's global top-k."""
    names = sorted(n for n in base.tensors if base.info(n).dtype.is_floating_point)
    total = sum(base.info(n).numel for n in names)
    top = GlobalTopK(len(models), device=device, backend=backend)
    everyone = [base, *models]
    cache = DeviceCache.for_device(device)  # device copies kept for the later passes, within a budget
    with several_passes(), TensorStream(everyone, names, device=device, cache=cache) as stream:
        for item in stream:
            top.count(item.inputs[0], item.inputs[1:])
    top.fix([math.floor(d * total) for d in densities])
    with several_passes(), TensorStream(everyone, names, device=device, cache=cache) as stream:
        for item in stream:
            top.refine(item.inputs[0], item.inputs[1:])
    top.finish_refine()
    cuts: dict[str, list[Cut]] = {}
    if any(top.fixed_cut(i, 0) is None for i in range(len(models))):  # some task's ties split
        with several_passes(), TensorStream(everyone, names, device=device, cache=cache) as stream:
            for item in stream:
                if all(top.fixed_cut(i, 0) is not None for i in range(len(models))):
                    break  # every tie is placed: the later tensors need no reading
                cuts[item.name] = top.cuts(item.inputs[0], item.inputs[1:])
    if cache is not None:
        cache.clear()
    for n in names:
        if n not in cuts:
            cuts[n] = [top.fixed_cut(i, base.info(n).numel) for i in range(len(models))]
    return cuts
