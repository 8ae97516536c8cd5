"""CPI-FT step 4 (docs/cpi-ft.md#fusion): fuse task models into a backbone, keeping every task's core.

Per tensor, with backbone θ_b, task models θ_1..θ_N in stage order and their core masks C_i:
  1. non-core entries (in no C_i) are merged by incremental SLERP: m ← θ_b; for k = 1..N,
     m ← SLERP(m, θ_k, t_k) with t_k = 1/(k+1) (an equal-weight spherical running mean) or a
     constant ω; norms and dot products over the non-core entries only. m stays float32 between
     steps (one rounding, on store).
  2. core entries are transplanted: θ[C_i] = θ_i[C_i], task by task in stage order, so where cores
     overlap the later task wins (``overlap="last"``), or with ``overlap="largest"`` (needs the
     base θ_0) the task with the larger |θ_i − θ_0| at that entry (the later one on equal scores).
Tensors no mask covers (outside --include, or integer buffers) get step 1 only.

Reads each input tensor once from the memory-mapped files (the float32 m of the tensor at hand is
the only copy); masks are read one tensor at a time. The output is an ordinary Hugging Face
checkpoint written by merge/engine.py.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from cpift.errors import ParameterError
from cpift.kernels.slerp import slerp_blend, slerp_coefficients, slerp_reduce
from cpift.kernels.threads import serial_reductions
from cpift.merge.cpi.masks import load_core_mask
from cpift.merge.cpi.names import check_task_names
from cpift.merge.cpi.recipes import fuse_recipe
from cpift.merge.engine import MergeResult, stream_merge
from cpift.merge.io.dryrun import MergePlan
from cpift.merge.io.models import open_models
from cpift.merge.options import MergeOptions, with_options
from cpift.numbers import parse_number

PathLike = str | os.PathLike


def parse_task(spec: str) -> tuple[str, str, str]:
    """'NAME=MODEL:MASK' → (name, model, mask); ParameterError naming the malformed spec."""
    name, eq, rest = spec.partition("=")
    model, colon, mask = rest.rpartition(":")
    if not eq or not colon or not name or not model or not mask:
        raise ParameterError(f"task: '{spec}' is not NAME=MODEL:MASK (e.g. math=probes/math:cores/math.safetensors)")
    return name, model, mask


def run_fuse(backbone: PathLike, tasks: Sequence[tuple[str, PathLike, PathLike]], out: PathLike, *,
             overlap: str = "last", base: PathLike | None = None, omega: float | None = None,
             options: MergeOptions) -> MergeResult | MergePlan:
    """Fuse task models into the backbone: SLERP of non-core entries, transplant of each task's core.

    Args:
        backbone: model to start from (the paper: the last stage of a staged SFT).
        tasks: (name, model, mask file) in stage order.
        out: output directory.
        overlap: "last" (later task wins where cores overlap) or "largest" (larger |θ_i − θ_0|; needs base).
        base: the pre-trained model θ_0 (only for overlap="largest").
        omega: constant SLERP factor in [0, 1]; default t_k = 1/(k+1).
        options: as every merge (merge/options.py: dtype, out_dtype, max_shard_size, overwrite, ...,
            backend, device, dry_run, resume); ``fuse`` takes them as keywords.

    Example:
        >>> fuse("stage3", [("math", "probe-math", "cores/math.safetensors")], "fused")
    """
    omega = _check_arguments(tasks, overlap, base, omega)
    masks = [load_core_mask(m, lazy=True) for _, _, m in tasks]
    ckpts = open_models([backbone, *[m for _, m, _ in tasks], *([base] if overlap == "largest" else [])])
    shapes = {n: ckpts[0].info(n).shape for n in ckpts[0].names()}
    for mask in masks:
        mask.check_matches(shapes, ckpts[0].path)
    combine = _combine(masks, overlap=overlap, omega=omega, backend=options.backend)
    recipe = fuse_recipe(backbone, tasks, out=out, overlap=overlap, base=base if overlap == "largest" else None,
                         omega=omega, settings=options.changed(("dtype", "out_dtype", "max_shard_size")))
    params = {"tasks": [t[0] for t in tasks], "masks": [t["mask"] for t in recipe["tasks"]],  # relative to out
              "overlap": overlap, "omega": omega if omega is not None else "1/(k+1)"}
    roles = ["backbone", *[f"task {n}" for n, _, _ in tasks], *(["base"] if overlap == "largest" else [])]
    opts = options.replace(recipe=recipe, inputs=(*(t[2] for t in tasks), *options.inputs))  # -o may not hold a mask
    return stream_merge("fuse", ckpts, out, combine, params=params, roles=roles, options=opts)


fuse = with_options(run_fuse, "fuse")  # fuse(backbone, tasks, out, *, overlap="last", ..., dtype=None, ...)


def _check_arguments(tasks, overlap: str, base, omega) -> float | None:
    """ParameterError for a bad task list, overlap rule or ω; returns ω parsed (None: t_k = 1/(k+1))."""
    if not tasks:
        raise ParameterError("task: give at least one --task NAME=MODEL:MASK")
    check_task_names([t[0] for t in tasks], "task")
    if overlap not in ("last", "largest"):
        raise ParameterError(f"overlap: expected 'last' or 'largest', got '{overlap}'")
    if overlap == "largest" and base is None:
        raise ParameterError("overlap: 'largest' compares |θ_i − θ_base|: give --base BASE")
    if overlap == "last" and base is not None:
        raise ParameterError("base: only --overlap largest reads the base model; drop --base or use --overlap largest")
    return None if omega is None else parse_number(omega, "omega", lo=0, hi=1, error=ParameterError)


def _combine(masks, *, overlap: str, omega: float | None, backend):
    """The per-tensor step of stream_merge: xs = backbone, the task models in stage order[, the base]."""
    n_tasks = len(masks)

    def combine(name, xs, out_t):
        task_xs = xs[1:1 + n_tasks]
        cores = [m.element_mask(name).reshape(-1).to(out_t.device) if name in m.shapes else None for m in masks]
        m = _slerp_outside_cores(xs[0], task_xs, _union(cores), omega, backend)
        if overlap == "last":
            for x, core in zip(task_xs, cores):
                if core is not None:
                    m[core] = x[core].to(m.dtype)
        else:
            _transplant_largest(m, task_xs, cores, xs[-1])
        out_t.copy_(m)

    return combine


def _union(cores: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [c for c in cores if c is not None]
    if not present:
        return None
    union = present[0].clone()
    for c in present[1:]:
        union |= c
    return union


def _slerp_outside_cores(backbone: torch.Tensor, task_xs, union, omega: float | None, backend) -> torch.Tensor:
    """m ← θ_b; m ← SLERP(m, θ_k, t_k) for each task, norms and dots over the entries in no core."""
    m = backbone.to(torch.float32 if backbone.dtype != torch.float64 else torch.float64, copy=True)
    for k, x in enumerate(task_xs, start=1):
        t = omega if omega is not None else 1.0 / (k + 1)
        with serial_reductions():  # norms independent of the thread count: byte-identical outputs
            aa, bb, ab = slerp_reduce(m, x, exclude=union, backend=backend)
        ca, cb = slerp_coefficients(aa, bb, ab, t)
        slerp_blend(m, x, ca, cb, out=m, backend=backend)
    return m


def _transplant_largest(m: torch.Tensor, task_xs, cores, base: torch.Tensor) -> None:
    """Each core entry from the task with the larger |θ_i − θ_0| there (the later one on equal scores)."""
    best = torch.full_like(m, -1.0)
    for x, core in zip(task_xs, cores):
        if core is None:
            continue
        score = (x.to(m.dtype) - base.to(m.dtype)).abs()
        win = core & (score >= best)
        m[win] = x[win].to(m.dtype)
        best[win] = score[win]
