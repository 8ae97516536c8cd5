"""The streaming loop every merge runs: validate inputs, then read, combine and write tensor by tensor.

Cost model: one read of every input byte and one write of the output, nothing more. A prefetch
thread maps (and, on a cold cache, reads) the pages of tensor j+1 of every input and of its output
while tensor j is computed from zero-copy views straight into the memory-mapped output shard; the
kernel writes the dirty pages back. Page faults taken by torch's worker threads contend (0.85 GB/s
here), which is why the prefetch thread maps pages ahead. Resident memory is about two tensors per
input and two output tensors (finished ones are unmapped), independent of model size.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cpift.errors import NonFiniteError, OutputError, ParameterError
from cpift.kernels.finite import all_finite
from cpift.merge.card import card_files, model_inputs, roles_for
from cpift.merge.consistency import leaves
from cpift.merge.io.checkpoint import DTYPE_NAMES, Checkpoint
from cpift.merge.io.device import check_backend, parse_device
from cpift.merge.io.dryrun import MergePlan, plan_merge
from cpift.merge.io.model_files import read_side_files
from cpift.merge.io.models import check_compatible, explain_nonfinite, model_paths
from cpift.merge.io.out_config import config_with_dtype
from cpift.merge.io.publish import check_output
from cpift.merge.io.resume import fingerprint
from cpift.merge.io.sizes import parse_size
from cpift.merge.io.stream import TensorStream, progress_bar
from cpift.merge.io.writer import OutTensor, ShardWriter, plan_shards
from cpift.merge.options import CARD_FIELDS, RESUME_FIELDS, MergeOptions

# combine(name, inputs (flat 1-D views, one per model), out (flat 1-D)) fills `out`.
Combine = Callable[[str, list[torch.Tensor], torch.Tensor], None]

DTYPE_ARGS = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
              "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float64": torch.float64}


def parse_dtype(value: str | torch.dtype | None, field_name: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return DTYPE_ARGS[str(value).lower()]
    except KeyError:
        raise ParameterError(f"{field_name}: unknown dtype '{value}' (use one of float32, float16, "
                             f"bfloat16, float64)") from None


@dataclass
class MergeResult:
    """What a merge did: counts, bytes and time, plus notes (dtype casts, non-finite values allowed)."""

    method: str
    out: Path
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    backend: str | None = None  # the kernels that ran: "cpu" (fused), "torch" or "triton"
    pinned_bytes: int = 0  # host staging memory of a device merge (merge/io/device.py: ≤ 4 pieces)

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        return (f"{self.method}: {self.tensors} tensors, read {self.bytes_read / 1e9:.3f} GB, "
                f"wrote {self.bytes_written / 1e9:.3f} GB in {self.seconds:.2f} s "
                f"({self.gbps:.2f} GB/s of input{f', {self.backend} kernels' if self.backend else ''}) "
                f"{f'[{self.pinned_bytes / 2**20:.0f} MiB pinned] ' if self.pinned_bytes else ''}-> {self.out}")


def stream_merge(method: str, models: list[Checkpoint], out: str | os.PathLike, combine: Combine, *,
                 options: MergeOptions | None = None, params: dict | None = None, notes: list[str] | None = None,
                 roles: Sequence[str] | None = None) -> MergeResult | MergePlan:
    """Run ``combine`` over every floating-point tensor of ``models`` and write the result to ``out``.

    Non-floating tensors (integer buffers) are copied from the first model. Everything that can be
    checked is checked before the output directory is created (validate → plan → write or dry run →
    publish). ``options`` (merge/options.py) says how to read, compute and write; the output gets a
    model card (README.md) listing ``params`` (the method's parameters) and the inputs, and
    ``cpift_recipe.yml``: ``options.recipe`` if given (e.g. the YAML config that asked for this merge),
    else one generated from ``params`` (merge/card.py). ``options.backend`` is the kernels' (the method's
    combine uses it; checked here); ``options.device`` "cuda" computes on the GPU through pinned staging
    buffers (merge/io/device.py).

    ``roles``: what each model is to the method, for the card (default: base/model).
    ``options.config_updates``: keys set in the output's config.json (a layer stack's ``num_hidden_layers``).
    ``options.inputs``: files read besides the models (masks, the config or recipe file): ``out`` may not
    be, hold or lie inside any of them, nor any model, shard or ``copy_tokenizer_from``
    (merge/io/publish.py); ``overwrite`` replaces only an earlier cpift output or an empty directory.
    ``options.dry_run``: validate everything, write nothing, return the MergePlan (merge/io/dryrun.py).
    ``options.resume``: continue a merge into ``out`` that was interrupted, keeping the output shards it
    finished (merge/io/resume.py); refused if its options or inputs differ from this call's. ``params``
    must then name everything ``combine`` depends on: they are part of what is compared.
    """
    start = time.perf_counter()
    opts = options or MergeOptions()
    run = _validate(method, models, out, opts, notes=notes, params=params, roles=roles)
    names, plan, metadata, fp = _plan(method, models, run, opts, params=params)
    if opts.dry_run:
        return plan_merge(method=method, models=models, out=run.out, plan=plan, max_shard_size=run.shard_bytes,
                          metadata=metadata, compute_dtype=run.compute_dtype,
                          fingerprint=fp if opts.resume else None, notes=run.notes, fused_cpu=run.used == "cpu")
    writer = ShardWriter(run.out, plan, max_shard_size=run.shard_bytes, metadata=metadata, fingerprint=fp,
                         resume=opts.resume, overwrite=opts.overwrite)
    tensors, bytes_read, pinned = _write(method, models, combine, run, writer, names, plan,
                                         allow_nonfinite=opts.allow_nonfinite, progress=opts.progress)
    return MergeResult(method, run.out, tensors, bytes_read, writer.bytes_written,
                       time.perf_counter() - start, run.notes, backend=run.used, pinned_bytes=pinned)


@dataclass
class _Run:
    """What validation settles before anything is written: the output path, the device and kernels, the
    dtypes and shard size, the side files and the card to publish, the notes so far."""

    out: Path
    dev: torch.device | None
    used: str
    compute_dtype: torch.dtype | None
    store_dtype: torch.dtype | None
    shard_bytes: int
    side: dict
    card: dict
    notes: list[str]


def _validate(method: str, models: list[Checkpoint], out: str | os.PathLike, opts: MergeOptions, *, notes,
              params, roles) -> _Run:
    """Every check of stream_merge's arguments and inputs, and the card, before the output is created."""
    dev = parse_device(opts.device)
    used = check_backend(opts.backend, dev)
    compute_dtype = parse_dtype(opts.dtype, "dtype")
    copy_tokenizer_from, config_updates = opts.copy_tokenizer_from, opts.config_updates
    if compute_dtype == torch.float64:
        used = "torch"  # float64 math always runs the torch kernels (the oracle precision)
    store_dtype = parse_dtype(opts.out_dtype, "out_dtype") or compute_dtype
    shard_bytes = parse_size(opts.max_shard_size)
    out = check_output(out, overwrite=opts.overwrite, inputs=[*model_paths(models), copy_tokenizer_from, *opts.inputs])
    side_from = Path(copy_tokenizer_from) if copy_tokenizer_from is not None else models[0].dir
    if not side_from.is_dir():
        raise ParameterError(f"copy_tokenizer_from: {side_from} is not a directory")
    side = read_side_files(side_from)  # copied into the output: vetted and validated before anything is written
    notes = list(notes or []) + [n for m in models for n in m.notes] + check_compatible(models,
                                                                                         allow_crimes=opts.allow_crimes)
    card = card_files(method=method, params=params or {}, recipe=opts.recipe, out=out,
                      inputs=[i for m, role in zip(models, roles or roles_for(method, len(models)))
                              for i in model_inputs(m, role)],
                      settings=opts.replace(dtype=compute_dtype, out_dtype=parse_dtype(opts.out_dtype, "out_dtype"),
                                            max_shard_size=shard_bytes, backend=used).pick(CARD_FIELDS))

    if any(getattr(leaf, "dequantized", False) for m in models for leaf in leaves(m)):  # merge/io/fp8.py
        config_updates = {**(config_updates or {}), "quantization_config": None}
    card.update(config_with_dtype(side_from, side.get("config.json"), store_dtype, config_updates))  # replaces it
    return _Run(out, dev, used, compute_dtype, store_dtype, shard_bytes, side, card, notes)


def _plan(method: str, models: list[Checkpoint], run: _Run, opts: MergeOptions, *,
          params) -> tuple[list[str], list[OutTensor], dict, Any]:
    """The output tensors (dtype, shape), the shards' metadata and the fingerprint a resume compares."""
    first = models[0]
    names = first.names()
    plan = []
    for name in names:
        info = first.info(name)
        floating = info.dtype.is_floating_point
        plan.append(OutTensor(name, (run.store_dtype or info.dtype) if floating else info.dtype, info.shape))
    metadata = {"cpift_method": method}
    fp = fingerprint(method=method, params=params, recipe=opts.recipe, models=models,
                     names=[s.name for s in plan if s.dtype.is_floating_point],
                     options=opts.replace(dtype=run.compute_dtype, out_dtype=run.store_dtype,
                                          max_shard_size=run.shard_bytes,  # the backend asked for, not the one used
                                          device=None if run.dev is None else str(run.dev)).pick(RESUME_FIELDS),
                     headers=[(s.file, s.header) for s in plan_shards(plan, run.shard_bytes, metadata)])
    return names, plan, metadata, fp


def _write(method: str, models: list[Checkpoint], combine: Combine, run: _Run, writer: ShardWriter,
           names: list[str], plan: list[OutTensor], *, allow_nonfinite: bool, progress: bool) -> tuple[int, int, int]:
    """Stream, combine and write every pending tensor, then publish (writer.finish): (tensors, bytes read,
    pinned bytes)."""
    dev, compute_dtype, notes, side, card = run.dev, run.compute_dtype, run.notes, run.side, run.card
    names, plan = writer.pending(names, plan)  # a resume computes only the shards it does not keep
    notes += writer.notes
    total_in = sum(m.info(n).nbytes for n in names for m in models)
    floating = {s.name for s in plan if s.dtype.is_floating_point}
    stream = TensorStream(models, names, writer=writer, device=dev, bar=progress_bar(method, total_in, progress),
                          staged=floating.__contains__, dtype=compute_dtype)  # cast on the device, piece by piece
    bytes_read = 0
    try:
        for item in stream:
            name = item.name
            result = writer.tensor(name)
            if name not in floating:
                result.copy_(item.views[0])
            elif not stream.staging:
                combine(name, _cast(item.inputs, compute_dtype), result)
                if not all_finite(result):
                    _nonfinite(name, item.views, models, result, allow_nonfinite, notes)
            else:
                on_device = torch.empty(result.numel(), dtype=result.dtype, device=dev)
                combine(name, _cast(item.inputs, compute_dtype), on_device)
                stream.stage_next(item)  # upload the next tensor while this one's kernels run
                finite = bool(torch.isfinite(on_device).all())
                stream.store(on_device, result)
                del on_device
                if not finite:
                    _nonfinite(name, item.views, models, result, allow_nonfinite, notes)
            del result
            bytes_read += item.nbytes
            stream.done(item)
            writer.written(name)
        stream.close()
        writer.finish(side, card)
    except BaseException as e:
        stream.close()
        # A write error or an interrupt leaves the finished shards for --resume.
        writer.abort(keep_partial=isinstance(e, (OutputError, KeyboardInterrupt)))
        raise
    finally:
        stream.bar.close()
        for m in models:
            m.close()
    return len(names), bytes_read, stream.pinned_bytes


def _cast(views: list[torch.Tensor], dtype: torch.dtype | None) -> list[torch.Tensor]:
    return [v.to(dtype) if dtype not in (None, v.dtype) else v for v in views]


def _nonfinite(name: str, views: list[torch.Tensor], models: list[Checkpoint], result: torch.Tensor,
               allow: bool, notes: list[str]) -> None:
    """The merged tensor holds NaN/Inf: name the input that does, or report an overflow.

    Checking the output instead of every input saves a pass over the inputs. It is exact because every
    kernel applies masks and weights by multiplication, so a NaN or Inf in any input reaches the output
    (0·Inf and 0·NaN are NaN); tests/merge/test_bad_input.py checks this for every method.
    """
    msg = (explain_nonfinite(models, [name], views)
           or f"tensor '{name}': the merged values overflow {DTYPE_NAMES[result.dtype]} (the inputs are finite)")
    if not allow:
        raise NonFiniteError(msg + " (pass --allow-nonfinite to merge anyway)")
    notes.append("note: " + msg + "; merged anyway (--allow-nonfinite)")
