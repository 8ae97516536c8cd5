"""Write a Hugging Face checkpoint: safetensors shards plus index, atomically.

The shard plan (which tensor goes in which file, at which offset) is fixed before the first byte is
written, because every tensor's dtype and shape is known from the inputs' headers. Each shard is
therefore created at its final size with its header, and kernels write tensors straight into it
through a memory map (no serialisation copy, no output buffer). Sharding follows transformers' rule:
fill a shard until the next tensor would push it past ``max_shard_size``; a tensor larger than that
gets a shard of its own.

Everything is assembled in a hidden sibling directory ``.NAME.cpift-partial`` and renamed to NAME only
when complete, so a merge that dies leaves nothing that looks like a finished model.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import resource
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from cpift.errors import OutputError
from cpift.merge.io.checkpoint import DTYPE_NAMES, INDEX_NAME, SINGLE_NAME
from cpift.merge.io.publish import Publication
from cpift.merge.io.resume import Journal, inspect_partial

from . import _mman, direct


def write_error_remedy(e: OSError, where: Path, sizes: list[int]) -> tuple[str, bool]:
    """What to do about a write error of shards of ``sizes`` bytes under ``where``, and whether a rerun with
    the same shards (--resume) can ever succeed: not for a shard larger than the file system allows, nor
    for an output larger than the whole file system."""
    if e.errno == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and max(sizes) > limit:
            return "a shard is larger than `ulimit -f` allows: raise it, or rerun with a smaller --max-shard-size", True
        return "a shard is larger than this file system allows: rerun with a smaller --max-shard-size", False
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            fs = os.statvfs(where)
        except OSError:
            return "", True
        need, total, free = sum(sizes), fs.f_blocks * fs.f_frsize, fs.f_bavail * fs.f_frsize
        if need > total:
            return (f"the output needs {need / 1e9:.3g} GB, more than its file system holds ({total / 1e9:.3g} GB): "
                    f"choose another -o"), False
        return f"the output needs {need / 1e9:.3g} GB, {free / 1e9:.3g} GB free", True
    return "", True


@dataclass
class Shard:
    file: str
    names: list[str] = field(default_factory=list)
    header: bytes = b""
    nbytes: int = 0  # data bytes (after the header)


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def plan_shards(tensors: list[OutTensor], max_shard_size: int,
                metadata: dict[str, str] | None = None) -> list[Shard]:
    """Assign tensors (in order) to shards and build each shard's safetensors header."""
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    shards = []
    for i, group in enumerate(groups):
        name = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        head, size = safetensors_header([(t.name, DTYPE_NAMES[t.dtype], t.shape, t.nbytes) for t in group],
                                        {"format": "pt", **(metadata or {})})
        shards.append(Shard(name, [t.name for t in group], head, size))
    return shards


def safetensors_header(tensors: Iterable[tuple[str, str, Sequence[int], int]], metadata: dict[str, str], *,
                       sort_keys: bool = False) -> tuple[bytes, int]:
    """The first bytes of a safetensors file: the 8-byte little-endian length, then the JSON header
    (``__metadata__`` and each (name, dtype name, shape, nbytes), data laid out in the order given),
    padded with spaces so the tensor data is 8-aligned. ``sort_keys``: keys in sorted order (a
    canonical header). Returns (those bytes, the size of the data that follows)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, sort_keys=sort_keys, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offset


class ShardWriter:
    """Lays out the planned shards and hands out each output tensor as a writable view of them.

    Each shard is created at its final size with its header written and its blocks reserved
    (posix_fallocate: a full disk or a file-size limit fails here, cleanly, before any math), then
    memory-mapped. Kernels write results straight into the page cache: no output buffer, no copy
    through write(2), no writer thread competing with the math for memory bandwidth. ``populate``
    maps a tensor's pages ahead of time (from the prefetch thread: page faults taken by torch's
    worker threads contend); ``release`` unmaps them once written (the page cache keeps the data).
    ``finish`` writes the index and side files and publishes the directory; ``abort`` removes the
    partial directory. Both go through merge/io/publish.py: the partial directory is locked from
    construction to the end (a second run on the same output is refused), and ``overwrite`` lets
    ``finish`` replace an earlier cpift output, only once the new one is complete.

    With a ``fingerprint`` the partial directory holds a manifest of finished shards (merge/io/resume.py):
    call ``written`` after each tensor. With ``resume`` the shards an interrupted merge finished are
    verified and kept (``kept``; ``pending`` filters them out of the work) and the others rewritten.
    """

    def __init__(self, out: str | os.PathLike, tensors: list[OutTensor], *, max_shard_size: int,
                 metadata: dict[str, str] | None = None, fingerprint: dict | None = None,
                 resume: bool = False, overwrite: bool = False):
        self.out = Path(out)
        self.pub = Publication(self.out, overwrite=overwrite)
        self.tmp = self.pub.tmp
        self.shards = plan_shards(tensors, max_shard_size, metadata)
        self._where: dict[str, tuple[int, int, OutTensor]] = {}  # name -> (shard, file offset, spec)
        specs = {t.name: t for t in tensors}
        for i, shard in enumerate(self.shards):
            offset = len(shard.header)
            for name in shard.names:
                self._where[name] = (i, offset, specs[name])
                offset += specs[name].nbytes
        self._maps: dict[int, tuple[mmap.mmap, int]] = {}
        self._lock = threading.Lock()  # the prefetch thread maps files too
        self._left = [len(s.names) for s in self.shards]  # tensors still to write, per shard
        self.journal: Journal | None = None
        self.direct: direct.DirectShards | None = None  # set once the shards exist
        self.resumable = True  # False once a write error shows that --resume with this plan cannot succeed
        self.notes: list[str] = []
        kept: dict[int, str] = {}
        self.pub.begin(keep=True)  # locked: a second run on this output is refused here
        if resume and self.pub.created:
            self.notes = [f"note: --resume: no unfinished merge at {self.tmp}; starting from the beginning"]
        elif resume:  # may refuse (OutputError) before anything is touched
            try:
                kept, self.notes = inspect_partial(self.tmp, self.out, [(s.file, len(s.header) + s.nbytes)
                                                                        for s in self.shards], fingerprint or {})
            except BaseException:
                self.pub.abort(keep_partial=True)
                raise
        self.kept = set(kept)
        try:
            if not kept:
                self.pub.clear()  # left by a merge that died; never a finished output
            if fingerprint is not None:
                self.journal = Journal(self.tmp, fingerprint, {self.shards[i].file: d for i, d in kept.items()})
            for i, shard in enumerate(self.shards):
                if i in self.kept:
                    continue
                with open(self.tmp / shard.file, "wb") as f:  # "wb" truncates a shard being rewritten
                    f.write(shard.header)
                    f.flush()
                    if shard.nbytes:
                        os.posix_fallocate(f.fileno(), 0, len(shard.header) + shard.nbytes)
        except OSError as e:
            message = self._write_error(e)
            self.abort(keep_partial=True)  # only if --resume can use it (self.resumable)
            raise OutputError(message) from None
        self.direct = self._direct_shards()

    def _direct_shards(self) -> direct.DirectShards | None:
        """The O_DIRECT writer of the shards this run writes (merge/io/direct.py), where the file system
        takes it and CPIFT_DIRECT_IO does not say 0; None keeps the shared maps."""
        todo = [i for i in range(len(self.shards)) if i not in self.kept]
        if not todo or not direct.wanted() or not direct.supported(self.tmp / self.shards[todo[0]].file):
            return None
        last = len(self.shards) - 1
        return direct.DirectShards([self.tmp / s.file for s in self.shards], [s.header for s in self.shards],
                                   [self.journal is not None and i < last and i not in self.kept
                                    for i in range(len(self.shards))],
                                   lambda file, digest: self.journal.record(file, digest))

    @property
    def bytes_written(self) -> int:
        """Bytes of the shards this run writes (a resume does not rewrite the shards it keeps)."""
        return sum(len(s.header) + s.nbytes for i, s in enumerate(self.shards) if i not in self.kept)

    def _write_error(self, e: OSError) -> str:
        """One line: what failed and, only where a rerun with the same shard plan can succeed, --resume."""
        why = f"{self.out}: cannot write the output: {e.strerror or e}"
        hint, resumable = write_error_remedy(e, self.tmp.parent, [len(s.header) + s.nbytes for s in self.shards])
        self.resumable = resumable
        if resumable and self.journal is not None and self.tmp.exists():
            hint += (f"{'; ' if hint else ''}the finished part is kept in {self.tmp}: rerun with --resume to "
                     f"continue, or delete it")
        return why + (f" ({hint})" if hint else "")

    def pending(self, names: list[str], specs: list[OutTensor]) -> tuple[list[str], list[OutTensor]]:
        """The tensors still to compute: those outside the shards a resume kept."""
        todo = [j for j, n in enumerate(names) if self._where[n][0] not in self.kept]
        return [names[j] for j in todo], [specs[j] for j in todo]

    def written(self, name: str) -> None:
        """Tensor ``name`` holds its final bytes; the shard it completes is hashed into the manifest."""
        i = self._where[name][0]
        self._left[i] -= 1
        if self.direct is not None:
            self._checked(lambda: self.direct.done(i, last=self._left[i] == 0))
        elif self._left[i] == 0 and self.journal is not None and i < len(self.shards) - 1:
            self.journal.shard_done(self.shards[i].file)

    def _checked(self, op):
        """``op()``, with an OSError of the direct writer's thread raised as the one-line OutputError."""
        try:
            return op()
        except OSError as e:
            raise OutputError(self._write_error(e)) from None

    def _map(self, i: int) -> tuple[mmap.mmap, int]:
        with self._lock:
            return self._maps.get(i) or self._open_map(i)

    def _open_map(self, i: int) -> tuple[mmap.mmap, int]:
        fd = os.open(self.tmp / self.shards[i].file, os.O_RDWR)
        try:
            mm = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        entry = self._maps[i] = (mm, _mman.address(mm))
        return entry

    def tensor(self, name: str) -> torch.Tensor:
        """The output tensor ``name`` as a flat, writable view of its bytes in the shard."""
        i, offset, spec = self._where[name]
        if spec.nbytes == 0:
            return torch.empty(0, dtype=spec.dtype)
        if self.direct is not None:
            view = self._checked(lambda: self.direct.view(i, offset, spec.nbytes))
            return torch.frombuffer(view, dtype=spec.dtype, count=spec.nbytes // spec.dtype.itemsize)
        mm, _ = self._map(i)
        return torch.frombuffer(mm, dtype=spec.dtype, count=spec.nbytes // spec.dtype.itemsize, offset=offset)

    def _advise(self, name: str, advice: int, outer: bool) -> bool:
        i, offset, spec = self._where[name]
        if spec.nbytes == 0:
            return True
        _, base = self._map(i)
        return _mman.advise(base, offset, offset + spec.nbytes, advice, outer=outer)

    def populate(self, name: str) -> None:
        """Map (allocate) the tensor's output pages now, so the math does not page-fault."""
        if self.direct is None:
            self._advise(name, _mman.POPULATE_WRITE, True)

    def release(self, name: str) -> None:
        """Unmap a written tensor's pages from this process; the data stays in the page cache."""
        if self.direct is None:
            self._advise(name, _mman.DONTNEED, False)

    def _close_maps(self) -> None:
        _mman.close_maps(self._maps)

    def finish(self, side_files: dict[str, bytes] | None, extra_files: dict[str, str] | None = None) -> Path:
        """Write index and side files (``side_files``: name → bytes, as merge/io/model_files.py read and
        validated them; ``extra_files`` written after, so they win), then rename the partial directory
        into place."""
        self._close_maps()
        try:
            if self.direct is not None:
                self.direct.close()  # every queued write and hash
            if self.journal is not None:
                self.journal.close()  # the hashes still queued
            if len(self.shards) > 1:
                total = sum(s.nbytes for s in self.shards)
                weight_map = {n: s.file for s in self.shards for n in s.names}
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            for fname, data in (side_files or {}).items():
                (self.tmp / fname).write_bytes(data)
            for fname, text in (extra_files or {}).items():
                (self.tmp / fname).write_text(text)
        except OSError as e:
            raise OutputError(self._write_error(e)) from None
        # Old output aside, new one in, old one removed (merge/io/publish.py); raises OutputError. A
        # finished output holds model files only: the manifest goes right before the rename, so a
        # crash from there to the rename costs a recompute on resume, nothing worse.
        self.pub.commit(before_rename=self.journal.remove if self.journal is not None else None)
        return self.out

    def abort(self, *, keep_partial: bool = False) -> None:
        """Remove the partial directory (nothing finished-looking is left); with ``keep_partial`` and
        a manifest, leave it for ``--resume`` (after a write error or an interrupt)."""
        self._close_maps()
        if self.direct is not None:
            self.direct.abort()  # the writes already queued finish; their shards' hashes are recorded
        if self.journal is not None:
            try:
                self.journal.close()  # record the shards already complete
            except OSError:
                pass
        self.pub.abort(keep_partial=keep_partial and self.journal is not None and self.resumable)
