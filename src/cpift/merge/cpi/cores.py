"""CPI-FT step 2: each task's core region, the exact global top-p% of |θ_task − θ_base| (docs/cpi-ft.md).

One global selection over every scored tensor of the model (not per tensor): k = floor(p·D/100)
of the D mask entries (single parameters, or blocks / rows with ``granularity``), ties broken by
tensor name order then lowest flat index, so exactly k entries are selected. The selection is
kernels/topk.py's radix select: three streaming passes over the checkpoints (histogram of the high
bits, histogram of the low bits inside the bin that holds the k-th largest, compare-and-pack),
every task sharing each read of the base. Memory: two 512 KiB histograms per task, the tensors in
flight, and the packed masks (D/8 bytes per task, written at the end).

Output: DIR/NAME.safetensors per task in the mask format of docs/cpi-ft.md#mask-files (merge/cpi/masks.py), written
into a hidden sibling directory that is renamed when every mask is complete.
"""

from __future__ import annotations

import fnmatch
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from cpift.errors import NonFiniteError, OutputError, ParameterError
from cpift.kernels.scores import count_unchanged
from cpift.kernels.topk import GlobalTopK
from cpift.merge.cpi.masks import block_size, mask_entries, parse_granularity, save_core_mask
from cpift.merge.cpi.names import check_task_names
from cpift.merge.io.device import DeviceCache, check_backend, parse_device
from cpift.merge.io.direct_read import several_passes
from cpift.merge.io.models import check_compatible, explain_nonfinite, model_paths, open_models
from cpift.merge.io.publish import check_output, publish_dir
from cpift.merge.io.stream import TensorStream, progress_bar
from cpift.numbers import parse_number

PathLike = str | os.PathLike
KINDS = ("attention", "mlp", "embeddings", "norms", "head", "other")
ZERO_WARN = 0.5  # warn when more than this share of a task's update is exactly zero


def tensor_kind(name: str) -> str:
    """attention / mlp / embeddings / norms / head / other, from Hugging Face naming conventions."""
    n = name.lower()
    if "norm" in n or n.endswith(("ln_f.weight", "ln_f.bias")):
        return "norms"
    if "embed" in n or "wte" in n or "wpe" in n:
        return "embeddings"
    if "lm_head" in n or n.startswith("output.") or n.endswith("score.weight"):
        return "head"
    if any(s in n for s in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj")):
        return "attention"
    if any(s in n for s in ("mlp", "feed_forward", "ffn", "gate_proj", "up_proj", "down_proj")):
        return "mlp"
    return "other"


@dataclass
class TaskCore:
    """One task's selection: k entries with score ≥ threshold, and where they lie."""

    name: str
    path: Path
    k: int
    threshold: float
    counts: dict[str, int]  # per tensor
    by_kind: dict[str, int] = field(default_factory=dict)
    zero_share: float = 0.0  # share of the scored elements whose update θ_task − θ_base is exactly zero
    model: str = ""  # the task model, as given


@dataclass
class CoresResult:
    out: Path
    p: float
    granularity: str
    entries: int  # D
    entries_by_kind: dict[str, int]
    tasks: list[TaskCore]
    bytes_read: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    elements: int = 0  # scored elements (D at element granularity)

    def table(self) -> str:
        """Share of each task's core by kind of tensor, and the share of that kind that is core."""
        head = f"{'kind':<11} {'entries':>13} " + " ".join(f"{t.name[:18]:>18}" for t in self.tasks)
        rows = [head, "-" * len(head)]
        for kind in KINDS:
            total = self.entries_by_kind.get(kind, 0)
            if not total:
                continue
            cells = []
            for t in self.tasks:
                c = t.by_kind.get(kind, 0)
                cells.append(f"{100 * c / max(t.k, 1):6.2f}% ({100 * c / total:5.2f}%)".rjust(18))
            rows.append(f"{kind:<11} {total:>13,} " + " ".join(cells))
        rows.append(f"{'zero Δ':<11} {self.elements:>13,} " +
                    " ".join(f"{100 * t.zero_share:6.2f}%".rjust(18) for t in self.tasks))
        rows.append("cell: share of the task's core in this kind (share of this kind that is core); "
                    "zero Δ: share of elements the task left exactly unchanged")
        return "\n".join(rows)

    def warnings(self) -> list[str]:
        """One line per task whose update is mostly exact zeros: rounded to its stored dtype, not trained so."""
        return [f"warning: {t.model} (task {t.name}): {100 * t.zero_share:.1f}% of its update is exactly zero in "
                f"the stored dtype, so its core marks rounding more than the update; save probes in float32 "
                f"(cpift-train sft --save-dtype float32)" for t in self.tasks if t.zero_share > ZERO_WARN]

    def summary(self) -> str:
        ks = ", ".join(f"{t.name}: k={t.k:,} threshold={t.threshold:.6g}" for t in self.tasks)
        return (f"cores: p={self.p}% of {self.entries:,} entries ({self.granularity}); {ks}; "
                f"read {self.bytes_read / 1e9:.3f} GB in {self.seconds:.2f} s "
                f"({self.bytes_read / max(self.seconds, 1e-9) / 1e9:.2f} GB/s) -> {self.out}")


# Scores of +inf and NaN have float32 bit patterns ≥ 0x7F800000: pass 1's histograms already show
# whether any input entry is non-finite, so no separate finiteness pass over the inputs is needed.
_NONFINITE_BINS = 0x7F80


def _scored(names: list[str], include: Sequence[str] | None, exclude: Sequence[str] | None) -> list[str]:
    chosen = [n for n in names if not include or any(fnmatch.fnmatchcase(n, g) for g in include)]
    chosen = [n for n in chosen if not exclude or not any(fnmatch.fnmatchcase(n, g) for g in exclude)]
    return sorted(chosen)  # name order: the tie rule's order


def compute_cores(base: PathLike, tasks: Sequence[tuple[str, PathLike]], out: PathLike, *, p: float = 1.0,
                  granularity: str = "element", include: Sequence[str] | None = None,
                  exclude: Sequence[str] | None = None, overwrite: bool = False, allow_crimes: bool = False,
                  progress: bool = True, backend: str | None = None, device: str | torch.device | None = None,
                  inputs: Sequence[PathLike] = ()) -> CoresResult:
    """Write each task's core mask (exact global top-p% of |θ_task − θ_base|) to ``out/NAME.safetensors``.

    Args:
        base: the pre-trained model directory (or Hub id).
        tasks: (name, model) pairs, each a fine-tune of base.
        out: output directory for the masks.
        p: percentage of entries in the core, in (0, 100].
        granularity: "element", "row" or "block:N" (a mask entry per parameter, row or N-block).
        include, exclude: glob patterns over tensor names (default: every floating-point tensor).
        overwrite: replace an earlier cpift output (or an empty directory) at ``out``, once the new
            masks are complete; any other existing path is refused (merge/io/publish.py).
        allow_crimes: score models of different architectures, or whose integer tensors differ
            (merge/consistency.py), with a note instead of an error.
        backend, device: the kernels' backend and where they run ("cuda": the tensors are staged on
            the GPU, the scoring, radix-select and packing kernels run there; merge/io/stream.py).
        inputs: files read besides the models (a recipe): ``out`` may not be, hold or lie inside them.

    Returns:
        CoresResult with k, the threshold and the core's distribution per task.

    Raises:
        ParameterError, CheckpointError, MismatchError, NonFiniteError, OutputError.

    Example:
        >>> compute_cores("base", [("math", "math-probe"), ("code", "code-probe")], "cores", p=1)
    """
    start = time.perf_counter()
    p, granularity = _check_request(p, tasks, granularity)
    dev = parse_device(device)
    backend = check_backend(backend, dev)
    models = open_models([base, *[path for _, path in tasks]])
    out = check_output(out, overwrite=overwrite, inputs=[*model_paths(models), *inputs])
    check_compatible(models, allow_crimes=allow_crimes)
    plan = _plan(models[0], granularity, include, exclude)
    ks = [math.floor(p * plan.total / 100)] * len(tasks)
    sel = _select(models, plan, ks, dev=dev, backend=backend, progress=progress)
    results = _save(out, overwrite, models, tasks, plan, sel, p=p, granularity=granularity,
                    include=include, exclude=exclude)
    return CoresResult(out, p, granularity, plan.total, _by_kind(plan.entries), results, 3 * sel.pass_bytes,
                       time.perf_counter() - start, notes=[n for m in models for n in m.notes],
                       elements=plan.elements)


def _check_request(p: float, tasks: Sequence, granularity: str) -> tuple[float, str]:
    """p as a number in (0, 100], at least one task, distinct task names; (p, granularity) parsed."""
    p = parse_number(p, "p", lo=0, lo_open=True, hi=100, error=ParameterError)  # a percentage of the entries
    if not tasks:
        raise ParameterError("model: give at least one task as --model NAME=PATH")
    check_task_names([n for n, _ in tasks])
    return p, parse_granularity(granularity)


def _by_kind(counts: dict[str, int]) -> dict[str, int]:
    """Per-tensor counts summed by tensor kind (attention, mlp, ...)."""
    kinds: dict[str, int] = {}
    for n, c in counts.items():
        kinds[tensor_kind(n)] = kinds.get(tensor_kind(n), 0) + c
    return kinds


@dataclass
class _Plan:
    """The scored tensors (name order: the tie rule's order) and their mask geometry."""

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    blocks: dict[str, int]  # score block per tensor (1: single entries)
    entries: dict[str, int]  # mask entries per tensor
    total: int  # D
    elements: int  # scored parameters


@dataclass
class _Selection:
    """What the three passes found, per task: packed bits and counts per tensor, the threshold, zeros."""

    packed: list[dict[str, torch.Tensor]]
    counts: list[dict[str, int]]
    thresholds: list
    zeros: list[int]  # scored elements whose update is exactly zero
    pass_bytes: int  # bytes one pass reads


def _plan(first, granularity: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> _Plan:
    names = _scored([n for n in first.names() if first.info(n).dtype.is_floating_point], include, exclude)
    if not names:
        raise ParameterError("include/exclude: no floating-point tensor is left to score")
    shapes = {n: first.info(n).shape for n in names}
    entries = {n: mask_entries(granularity, shapes[n]) for n in names}
    return _Plan(names, shapes, {n: block_size(granularity, shapes[n]) for n in names}, entries,
                 sum(entries.values()), sum(math.prod(shapes[n]) for n in names))


def _select(models, plan: _Plan, ks: list[int], *, dev, backend, progress: bool) -> _Selection:
    """count → refine → pack: the three streaming passes of the global top-k; closes the models."""
    n_tasks = len(ks)
    top = GlobalTopK(n_tasks, device=dev, backend=backend)
    pass_bytes = sum(m.info(n).nbytes for m in models for n in plan.names)
    bar = progress_bar("cores", 3 * pass_bytes, progress)
    sel = _Selection([{} for _ in ks], [{} for _ in ks], [], [0] * n_tasks, pass_bytes)

    cache = DeviceCache.for_device(dev)  # device copies kept across the three passes, within a budget

    def run_pass(step) -> None:
        with several_passes(), TensorStream(models, plan.names, device=dev, bar=bar, cache=cache) as stream:
            for item in stream:
                step(item.name, item.inputs)

    def count(name, views):
        top.count(views[0], views[1:], plan.blocks[name])
        for i, v in enumerate(views[1:]):
            sel.zeros[i] += count_unchanged(v.reshape(-1), views[0].reshape(-1), backend=backend)

    def pack(name, views):
        for i, (bits, c) in enumerate(top.pack(views[0], views[1:], plan.blocks[name])):
            sel.packed[i][name] = bits.cpu()
            sel.counts[i][name] = c

    try:
        run_pass(count)
        if any(int(rs.high[_NONFINITE_BINS:].sum()) for rs in top.selects):
            msg = explain_nonfinite(models, plan.names)
            raise NonFiniteError(f"{msg}; scores need finite weights" if msg
                                 else "|task − base| overflows float32 for some entry (the inputs are finite)")
        top.fix(ks)
        run_pass(lambda name, views: top.refine(views[0], views[1:], plan.blocks[name]))
        sel.thresholds = top.finish_refine()
        run_pass(pack)
    finally:
        bar.close()
        if cache is not None:
            cache.clear()
        for m in models:
            m.close()
    return sel


def _save(out: Path, overwrite: bool, models, tasks, plan: _Plan, sel: _Selection, *, p: float,
          granularity: str, include, exclude) -> list[TaskCore]:
    """Every task's mask file, the card and the recipe, published into ``out`` when all are written."""
    from cpift.merge.card import CardInput, input_hash

    # The recipe's form of each model (absolute path, or Hub id pinned to its commit): a replay of
    # the recipe records the same identity, so its mask files are byte-identical.
    identity = [{"model": CardInput(os.fspath(m.ref), m.path).recipe_ref, "sha256": input_hash(m.path)}
                for m in models]
    results = []
    try:
        with publish_dir(out, overwrite=overwrite) as tmp:  # locked; renamed into place when complete
            for i, (task_name, task_path) in enumerate(tasks):
                t = sel.thresholds[i]
                threshold = t.value if t.k else math.inf
                save_core_mask(tmp / f"{task_name}.safetensors", sel.packed[i], plan.shapes,
                               granularity=granularity, p=p, k=t.k, threshold=threshold, counts=sel.counts[i],
                               base=identity[0], task=identity[i + 1])
                results.append(TaskCore(task_name, out / f"{task_name}.safetensors", t.k, threshold,
                                        sel.counts[i], _by_kind(sel.counts[i]), sel.zeros[i] / plan.elements,
                                        os.fspath(task_path)))
            for fname, text in _card(models, tasks, p, granularity, include, exclude, results, out).items():
                (tmp / fname).write_text(text)
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"{out}: cannot write the masks ({e.strerror or e})") from None
    return results


def _card(models, tasks, p, granularity, include, exclude, results: list[TaskCore], out: Path) -> dict[str, str]:
    """README.md and cpift_recipe.yml of a masks directory (merge/card.py, merge/cpi/recipes.py)."""
    from cpift.merge.card import CardInput, card_files
    from cpift.merge.cpi.recipes import cores_recipe

    inputs = [CardInput(os.fspath(m.ref), m.path, role) for m, role in
              zip(models, ["base", *[f"task {n}" for n, _ in tasks]])]
    params = {"p": p, "granularity": granularity, "include": list(include or []) or "all floating-point tensors",
              "exclude": list(exclude or []) or "none",
              **{f"{t.name}: k, threshold": f"{t.k:,}, {t.threshold:.9g}" for t in results}}
    recipe = cores_recipe(models[0].ref, [(n, m.ref) for (n, _), m in zip(tasks, models[1:])], p=p,
                          granularity=granularity, include=include, exclude=exclude, out=out)
    return card_files(method="cores", params=params, inputs=inputs, recipe=recipe, out=out, relation=None,
                      definition="each task's core mask, the exact global top-p% of |θ_task − θ_base| "
                                 "over the whole model, as bit-packed masks (cpift's docs/cpi-ft.md#core-region)")
