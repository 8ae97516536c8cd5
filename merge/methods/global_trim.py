"""TIES with ``global_trim``: one magnitude threshold per model over the whole model (the TIES paper).

For model i, keep exactly k_i = floor(density_i · D) entries of |x_i − b| over all D floating-point
entries. The k-th largest comes from the radix select of kernels/select.py streamed over every tensor
(two passes, each reading the base once and every model once); ties at the threshold go to the lowest
flat index with tensors in name order, found in a third pass only when some but not all ties are kept.
The result is one Cut per (tensor, model), which the merge pass applies like a per-tensor trim.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from cpift.kernels._scratch import chunks
from cpift.kernels.select import Cut, RadixSelect, magnitude_scores

from cpift.merge.io.checkpoint import Checkpoint


def _stream(base: Checkpoint, models: list[Checkpoint], names: list[str]) -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor]]]:
    """(name, base tensor, model tensors), flat zero-copy views, unmapped once the caller moves on."""
    for name in names:
        everyone = [base, *models]
        for c in everyone:
            c.populate(name)
        yield name, base.get(name).reshape(-1), [m.get(name).reshape(-1) for m in models]
        for c in everyone:
            c.release(name)


def global_magnitude_cuts(base: Checkpoint, models: list[Checkpoint],
                          densities: list[float]) -> dict[str, list[Cut]]:
    """For every floating-point tensor name, one Cut per model selecting that model's global top-k."""
    names = sorted(n for n in base.tensors if base.info(n).dtype.is_floating_point)
    total = sum(base.info(n).numel for n in names)
    ks = [math.floor(d * total) for d in densities]
    selects = [RadixSelect() for _ in models]
    for _, b, xs in _stream(base, models, names):
        for rs, x in zip(selects, xs):
            for s, e in chunks(x.numel()):
                rs.add_high(magnitude_scores(x, b, s, e))
    for rs, k in zip(selects, ks):
        rs.select_bin(k)
    for _, b, xs in _stream(base, models, names):
        for rs, x in zip(selects, xs):
            for s, e in chunks(x.numel()):
                rs.add_low(magnitude_scores(x, b, s, e))

    cuts: dict[str, list[Cut]] = {n: [] for n in names}
    partial: dict[int, tuple[float, int]] = {}  # model -> (value, ties still to place)
    for i, (rs, k) in enumerate(zip(selects, ks)):
        value, greater, equal = rs.threshold()
        if k == 0 or k == total or k - greater == equal:
            cut = Cut.none() if k == 0 else Cut.all() if k == total else None
            for n in names:
                cuts[n].append(cut or Cut(value, base.info(n).numel - 1))
        else:
            partial[i] = (value, k - greater)
            for n in names:
                cuts[n].append(Cut.none())  # placeholder, set in the third pass
    if partial:
        _place_ties(base, models, names, partial, cuts)
    return cuts


def _place_ties(base: Checkpoint, models: list[Checkpoint], names: list[str],
                partial: dict[int, tuple[float, int]], cuts: dict[str, list[Cut]]) -> None:
    """Third pass: the tensors before the last kept tie keep all their ties, the one holding it up to
    its index, the ones after none."""
    remaining = {i: r for i, (_, r) in partial.items()}
    for name, b, xs in _stream(base, models, names):
        for i, (value, _) in partial.items():
            r = remaining[i]
            if r == 0:
                cuts[name][i] = Cut(value, -1)
                continue
            count = 0
            x = xs[i]
            for s, e in chunks(x.numel()):
                eq = magnitude_scores(x, b, s, e) == value
                c = int(eq.sum())
                if count + c >= r:
                    idx = s + int(eq.nonzero()[r - count - 1])
                    cuts[name][i] = Cut(value, idx)
                    count = r
                    break
                count += c
            remaining[i] = r - count
            if remaining[i] > 0:
                cuts[name][i] = Cut(value, x.numel() - 1)
        if not any(remaining.values()):
            # every later tensor keeps no ties: fill and stop reading
            for later in names[names.index(name) + 1:]:
                for i, (value, _) in partial.items():
                    cuts[later][i] = Cut(value, -1)
            return
