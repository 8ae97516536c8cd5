"""What a merge would do, without doing it: ``stream_merge(..., dry_run=True)`` returns a MergePlan.

By then every input has been validated exactly as for a real run (headers parsed, every shard file
opened, names, shapes and dtypes compared, parameters range-checked) and nothing has been written.
The byte counts come from the same shard plan the writer would lay out (``plan_shards``), so they
equal what the real run reports and puts on disk.

Expected peak memory, for the CPU path: the process as it is now (interpreter, torch, the parsed
headers), plus the pages the merge holds at once. The prefetch thread maps tensor j+1 of every input
and of the output while tensor j is computed, and a tensor's pages are dropped once it is written,
so that is the largest sum over two consecutive tensors; plus, when ``dtype`` casts the inputs, one
copy of the current tensor of each input in that dtype; plus the kernels' temporaries. Those are
chunk buffers of a few MiB, reused, and, for the magnitude trim of TIES, selection temporaries and
allocator slack of about 2.5 bytes per element of the tensor at hand (measured: 40 MB more than task
arithmetic on a 16.4M-element tensor, 150 MB on a 65.5M one); the estimate allows 3 bytes per element
for every method, so it is an upper bound (tests/merge/test_dry_run.py compares it with the peak RSS
of real runs). The fused CPU kernels add numba's runtime, LLVM and the compiled kernels once per
process (measured: 115 MB resident for the ties, linear and slerp kernels; 128 MB are allowed) unless
numba is already loaded, which the process size then includes.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from cpift.errors import OutputError
from cpift.merge.io.checkpoint import Checkpoint
from cpift.merge.io.publish import partial_dir
from cpift.merge.io.resume import inspect_partial
from cpift.merge.io.writer import OutTensor, plan_shards

KERNEL_BUFFERS = 48 << 20  # kernels/_scratch.py's 1 MiB chunk buffers, a few per input, and slack
KERNEL_BYTES_PER_ELEMENT = 3  # the trim's selection temporaries (see above)


def human_bytes(n: int) -> str:
    """Decimal units, as the summary lines and --max-shard-size use: 1.234 GB, 56.7 MB, 890 B."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.{3 if unit in ('TB', 'GB') else 1}f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class ShardPlan:
    file: str
    tensors: int
    nbytes: int  # the whole file, header included


@dataclass
class MergePlan:
    """A merge's plan: what it would read and write, its output shards and its expected peak memory."""

    method: str
    out: Path
    inputs: list[Path]
    tensors: int  # tensors this run would compute or copy
    copied: int  # of which non-floating, copied from the first model
    bytes_read: int
    bytes_written: int  # shard files this run would write (a resume skips the shards it keeps)
    shards: list[ShardPlan]
    peak_memory: int
    process_memory: int
    free_disk: int | None
    kept: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        gb = human_bytes
        lines = [f"dry run of {self.method}, nothing written: {len(self.inputs)} inputs, {self.tensors} tensors "
                 f"({self.tensors - self.copied} merged, {self.copied} copied)",
                 f"  read:  {gb(self.bytes_read)}",
                 f"  write: {gb(self.bytes_written)} in {len(self.shards) - len(self.kept)} shard"
                 f"{'' if len(self.shards) - len(self.kept) == 1 else 's'} to {self.out}"
                 + (f" ({len(self.kept)} kept from the interrupted merge)" if self.kept else "")]
        width = max(len(s.file) for s in self.shards) if self.shards else 0
        for s in self.shards:
            state = "  (kept)" if s.file in self.kept else ""
            lines.append(f"    {s.file:<{width}}  {s.tensors:5d} tensor{'s' if s.tensors != 1 else ' '}  "
                         f"{gb(s.nbytes):>9}{state}")
        lines.append(f"  expected peak memory: at most {gb(self.peak_memory)} ({gb(self.process_memory)} now, plus "
                     f"two tensors of every input and of the output in flight, and the kernels' temporaries)")
        if self.free_disk is not None:
            lines.append(f"  disk: {gb(self.free_disk)} free where the output goes")
        return "\n".join(lines)


def data_memory(models: Sequence[Checkpoint], plan: Sequence[OutTensor], compute_dtype: torch.dtype | None) -> int:
    """Bytes the streaming loop holds at once beyond the process itself (see the module docstring)."""
    if not plan:
        return KERNEL_BUFFERS
    mapped, work = [], 0
    for spec in plan:
        infos = [m.info(spec.name) for m in models]
        mapped.append(sum(i.nbytes for i in infos) + spec.nbytes)
        if spec.dtype.is_floating_point:
            cast = sum(i.numel * compute_dtype.itemsize for i in infos
                       if compute_dtype is not None and i.dtype != compute_dtype)
            work = max(work, cast + infos[0].numel * KERNEL_BYTES_PER_ELEMENT)
    window = max((mapped[j] + mapped[j + 1] for j in range(len(mapped) - 1)), default=mapped[0])
    return window + work + KERNEL_BUFFERS


def _resident() -> int:
    import psutil

    return psutil.Process().memory_info().rss


_FUSED_CPU_RUNTIME = 128 * 2**20  # numba + LLVM + the compiled fused kernels (see the header)


def plan_merge(*, method: str, models: Sequence[Checkpoint], out: Path, plan: list[OutTensor],
               max_shard_size: int, metadata: Mapping[str, str], compute_dtype: torch.dtype | None,
               fingerprint: Mapping | None, notes: list[str], fused_cpu: bool = False) -> MergePlan:
    """The MergePlan of a validated merge; with ``fingerprint`` (a resume), after checking what the
    interrupted merge left (read-only).

    Raises:
        OutputError: the output's directory is not writable, or the resume would be refused.
    """
    notes = list(notes)
    shards = plan_shards(plan, max_shard_size, dict(metadata))
    parent = out.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: cannot write the output: {parent} is not writable")
    kept: dict[int, str] = {}
    if fingerprint is not None:
        kept, resume_notes = inspect_partial(partial_dir(out), out,
                                             [(s.file, len(s.header) + s.nbytes) for s in shards], fingerprint)
        notes += resume_notes
    todo = {n for i, s in enumerate(shards) if i not in kept for n in s.names}
    work = [spec for spec in plan if spec.name in todo]
    bytes_written = sum(len(s.header) + s.nbytes for i, s in enumerate(shards) if i not in kept)
    free = shutil.disk_usage(parent).free
    if bytes_written > free:
        notes.append(f"note: the output needs {bytes_written / 1e9:.3f} GB but {parent} has "
                     f"{free / 1e9:.3f} GB free: the merge would stop with a write error before any math")
    process = _resident()
    if fused_cpu and "numba" not in sys.modules:
        process += _FUSED_CPU_RUNTIME
    return MergePlan(
        method=method, out=out, inputs=[m.path for m in models], tensors=len(work),
        copied=sum(not spec.dtype.is_floating_point for spec in work),
        bytes_read=sum(m.info(spec.name).nbytes for spec in work for m in models),
        bytes_written=bytes_written,
        shards=[ShardPlan(s.file, len(s.names), len(s.header) + s.nbytes) for s in shards],
        peak_memory=process + data_memory(models, work, compute_dtype), process_memory=process,
        free_disk=free, kept=[shards[i].file for i in sorted(kept)], notes=notes)
