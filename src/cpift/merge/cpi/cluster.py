"""CPI-FT step 3 (docs/cpi-ft.md#grouping): group tasks whose core regions overlap.

Jaccard S(C_i, C_j) = |C_i ∩ C_j| / |C_i ∪ C_j| by popcount over the packed masks, tensor by tensor
(one tensor of every mask in memory at a time, never unpacked); tasks are linked when S ≥ τ and
the groups are the connected components. Groups become training stages, ordered at random with a
seed (the paper) or as given (the order of the masks' first members). Two empty cores have no
union; their Jaccard is taken as 0 (no evidence of overlap).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from cpift.errors import MismatchError, ParameterError
from cpift.kernels.masks import overlap
from cpift.merge.cpi.masks import CoreMask, load_core_mask
from cpift.merge.cpi.names import check_task_names
from cpift.merge.io.device import check_backend, parse_device
from cpift.merge.io.png import write_png
from cpift.merge.io.publish import write_atomic
from cpift.merge.io.stream import TensorStream
from cpift.numbers import parse_number

PathLike = str | os.PathLike


@dataclass
class ClusterResult:
    tasks: list[str]
    jaccard: list[list[float]]
    groups: list[list[str]]
    order: list[int]  # group indices, first stage first
    tau: float

    def to_json(self) -> dict:
        return {"tasks": self.tasks, "jaccard": self.jaccard, "groups": self.groups, "order": self.order}

    def stages(self) -> list[list[str]]:
        return [self.groups[g] for g in self.order]

    def table(self) -> str:
        w = max(8, *(len(t) for t in self.tasks))
        rows = [" " * w + " " + " ".join(f"{t[:8]:>8}" for t in self.tasks)]
        rows += [f"{t:<{w}} " + " ".join(f"{v:8.4f}" for v in row) for t, row in zip(self.tasks, self.jaccard)]
        rows.append(f"groups (Jaccard ≥ {self.tau}): "
                    + "; ".join(f"{i}: {', '.join(g)}" for i, g in enumerate(self.groups)))
        rows.append("stage order: " + " → ".join(f"{g} ({', '.join(self.groups[g])})" for g in self.order))
        return "\n".join(rows)


def _check_same_layout(masks: list[CoreMask]) -> None:
    first = masks[0]
    for m in masks[1:]:
        if m.granularity != first.granularity:
            raise MismatchError(f"{m.path}: granularity {m.granularity} but {first.path} has {first.granularity}; "
                                f"compare masks made with the same --granularity")
        for name in sorted(set(first.shapes) | set(m.shapes)):
            if name not in m.shapes or name not in first.shapes:
                other = m if name not in m.shapes else first
                raise MismatchError(f"{other.path}: has no mask for tensor '{name}'; masks of one model and "
                                    f"the same --include/--exclude are needed")
            if m.shapes[name] != first.shapes[name]:
                raise MismatchError(f"{m.path}: tensor '{name}' has shape {list(m.shapes[name])} but "
                                    f"{first.path} has {list(first.shapes[name])}; the masks are for different models")


def jaccard_matrix(masks: Sequence[CoreMask], *, backend: str | None = None,
                   device: torch.device | None = None) -> list[list[float]]:
    """Pairwise Jaccard of packed masks, streamed one tensor at a time (on ``device`` if given)."""
    n = len(masks)
    inter = [[0] * n for _ in range(n)]
    union = [[0] * n for _ in range(n)]
    with TensorStream([m.packed for m in masks], masks[0].names, device=device, prefetch=False) as stream:
        for item in stream:
            _add_overlaps(item.inputs, inter, union, backend)
    out = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            out[i][j] = out[j][i] = inter[i][j] / union[i][j] if union[i][j] else 0.0
    return out


def _add_overlaps(packed: list[torch.Tensor], inter: list[list[int]], union: list[list[int]],
                  backend: str | None) -> None:
    for i in range(len(packed)):
        for j in range(i, len(packed)):
            a, u = overlap(packed[i], packed[j], backend=backend)
            inter[i][j] += a
            union[i][j] += u


def groups_of(jaccard: list[list[float]], tau: float) -> list[list[int]]:
    """Connected components of the graph with an edge wherever Jaccard ≥ τ; members in input order."""
    n = len(jaccard)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if jaccard[i][j] >= tau:
                parent[find(j)] = find(i)
    comps: dict[int, list[int]] = {}
    for i in range(n):
        comps.setdefault(find(i), []).append(i)
    return sorted(comps.values(), key=lambda g: g[0])


def cluster_masks(masks: Sequence[PathLike], *, tau: float = 0.1, order: str = "random", seed: int = 0,
                  names: Sequence[str] | None = None, backend: str | None = None,
                  device: str | torch.device | None = None) -> ClusterResult:
    """Jaccard matrix, groups and stage order of two or more core masks.

    Args:
        masks: mask files written by ``cores`` (task name = file name without .safetensors).
        tau: link threshold in [0, 1].
        order: "random" (seeded shuffle of the groups, the paper's choice) or "given".
        names: task names (default: the file stems).
        backend, device: the popcount kernels' backend and where they run ("cuda": the packed masks
            are staged on the GPU tensor by tensor).

    Example:
        >>> cluster_masks(["cores/math.safetensors", "cores/code.safetensors"], tau=0.1, seed=3).stages()
    """
    if len(masks) < 2:
        raise ParameterError(f"masks: cluster needs at least two masks, got {len(masks)}")
    tau = parse_number(tau, "tau (a Jaccard threshold)", lo=0, hi=1, error=ParameterError)
    seed = parse_number(seed, "seed", integer=True, lo=0, error=ParameterError)
    if order not in ("random", "given"):
        raise ParameterError(f"order: expected 'random' or 'given', got '{order}'")
    task_names = list(names) if names is not None else [Path(m).name.removesuffix(".safetensors") for m in masks]
    check_task_names(task_names, "masks")
    dev = parse_device(device)
    backend = check_backend(backend, dev)
    loaded = [load_core_mask(m, lazy=True) for m in masks]
    _check_same_layout(loaded)
    jac = jaccard_matrix(loaded, backend=backend, device=dev)
    comps = groups_of(jac, tau)
    stage = list(range(len(comps)))
    if order == "random":
        random.Random(seed).shuffle(stage)
    return ClusterResult(task_names, jac, [[task_names[i] for i in g] for g in comps], stage, tau)


def write_json(result: ClusterResult, path: PathLike, *, inputs: Sequence[PathLike] = ()) -> None:
    """Write the result's JSON atomically; never over (or as a directory holding) one of ``inputs``."""
    write_atomic(path, json.dumps(result.to_json(), indent=2) + "\n", inputs=inputs)


def plot_heatmap(result: ClusterResult, path: PathLike, *, inputs: Sequence[PathLike] = ()) -> None:
    """Jaccard heatmap with each group outlined (needs matplotlib: pip install cpift[plot]), written
    atomically; never over one of ``inputs``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError:
        raise ParameterError("plot: matplotlib is not installed (pip install 'cpift[plot]')") from None
    # Reorder tasks group by group so each group is one square on the diagonal.
    perm = [result.tasks.index(t) for g in result.groups for t in g]
    data = [[result.jaccard[i][j] for j in perm] for i in perm]
    labels = [result.tasks[i] for i in perm]
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.7 * n))
    im = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{data[i][j]:.2f}", ha="center", va="center",
                    color="white" if data[i][j] < 0.6 else "black", fontsize=8)
    at = 0
    for g in result.groups:
        ax.add_patch(Rectangle((at - 0.5, at - 0.5), len(g), len(g), fill=False, edgecolor="red", linewidth=2))
        at += len(g)
    ax.set_title(f"Core overlap (Jaccard); groups at τ = {result.tau}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    write_png(fig, path, dpi=120, inputs=inputs)
