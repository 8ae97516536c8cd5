"""Read Hugging Face checkpoints one tensor at a time, zero-copy.

A model directory holds ``model.safetensors`` or ``model.safetensors.index.json`` plus its shards;
failing both, ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` plus its shards (PyTorch
pickles, read with weights_only and mmap by merge/io/bin_shards.py, behind the same interface, with a
note that safetensors is faster), in the order transformers looks for them.
We parse the safetensors headers ourselves (merge/io/st_header.py: as strictly as the safetensors
library, offsets contiguous and covering the file exactly) so every shard is validated before the
first byte of output is written: a missing shard, an index naming a file
that is not there, a truncated file or a tensor the index promises but the shard lacks all fail
here, with the file named. With both a single file and an index present, the single file is read,
as transformers does (a note says so).

Tensors are zero-copy views of a read-only shared memory map of each shard: no copy, no memory
bandwidth spent on reading. A prefetch thread maps the next tensors' pages with
MADV_POPULATE_READ (43 GB/s here on a warm page cache; on a cold one it is the disk read, overlapped
with the math), because page faults taken by torch's worker threads contend and crawl (0.85 GB/s);
``release`` unmaps a finished tensor, which keeps the resident set independent of model size.
A read-only map also means the inputs cannot be modified. Measured alternatives: preadv into reused
buffers 5.5 GB/s but its copies compete with the math for memory bandwidth and cores. That holds for
a warm cache; a tensor whose pages are not all cached is read with O_DIRECT into reused buffers
instead (merge/io/direct_read.py: no page-cache copy, and no first touch of fresh pages).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from cpift.errors import CheckpointError, MismatchError
from cpift.merge.io.model_files import model_file, read_model_file
from cpift.merge.io.safe_parse import load_json_bounded
from cpift.merge.io.st_header import HeaderEntry, header_entries, read_header, torch_dtype

from . import _mman, direct_read, st_header

if TYPE_CHECKING:
    import torch

    from cpift.merge.io.bin_shards import BinShards

__all__ = ["BIN_INDEX_NAME", "BIN_SINGLE_NAME", "INDEX_NAME", "LAYOUTS", "SINGLE_NAME",
           "Checkpoint", "TensorInfo"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BIN_SINGLE_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"


def __getattr__(name: str) -> Any:
    """DTYPES and DTYPE_NAMES (merge/io/st_header.py), built with the torch import when first asked for."""
    if name in ("DTYPES", "DTYPE_NAMES"):
        return getattr(st_header, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
# (single file, index) of each format, in the order transformers' from_pretrained looks for them
# (modeling_utils._get_resolved_checkpoint_files): safetensors first, then PyTorch pickles.
LAYOUTS = ((SINGLE_NAME, INDEX_NAME), (BIN_SINGLE_NAME, BIN_INDEX_NAME))


@dataclass(frozen=True)
class TensorInfo(HeaderEntry):
    """Where one tensor lives: its shard ``file`` and the absolute byte range [begin, end) in it."""

    file: Path

    @property
    def start(self) -> int:
        return self.begin

    def input_paths(self) -> list[Path]:
        """Every path this input reads: its directory and shard files (an output may be none of them)."""
        return [self.dir, *sorted({info.file for info in self.tensors.values()})]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _shard_tensors(file: Path, typed: bool) -> dict[str, TensorInfo]:
    header, data_start = read_header(file)
    entries = header_entries(file, header, file.stat().st_size - data_start, dtype_of=torch_dtype if typed else str)
    return {e.name: TensorInfo(e.name, e.dtype, e.shape, data_start + e.begin, data_start + e.end, file)
            for e in entries}


class Checkpoint:
    """A model directory (single file or sharded with an index; safetensors, else ``.bin``), read lazily.

    Args:
        path: the model directory, or one ``.safetensors`` or ``.bin`` file.
        ref: the model argument it was resolved from (a Hub id such as ``org/name@main``), for the
            model card; default: ``path``.
        typed: False reads and validates the safetensors headers without importing torch (the checks
            that refuse bad input before a merge starts, cli/precheck.py): each tensor's ``dtype`` is then
            its header name, ``.bin`` shards (unpickled by torch) are not read (``tensors`` is empty and
            ``complete`` False), and nothing is readable with ``get``.

    Raises:
        CheckpointError: the directory, index or a shard is missing, truncated or malformed.

    Example:
        >>> ckpt = Checkpoint("models/llama-a")
        >>> w = ckpt.get("model.embed_tokens.weight")
    """

    def __init__(self, path: str | os.PathLike, *, ref: str | None = None, typed: bool = True):
        self.path = Path(path)
        self.ref = ref if ref is not None else os.fspath(path)
        self.notes: list[str] = []  # one-line notes for the user (e.g. which files were read)
        self.index_name = INDEX_NAME  # the index file of this checkpoint's format
        if self.path.is_file() and self.path.suffix in (".safetensors", ".bin"):
            files = [self.path]
            self.dir = self.path.parent
            if self.path.suffix == ".bin":
                self.index_name = BIN_INDEX_NAME
        elif not self.path.exists():
            raise CheckpointError(f"{self.path}: model directory does not exist")
        elif not self.path.is_dir():
            raise CheckpointError(f"{self.path}: expected a model directory, a .safetensors or a .bin file")
        else:
            self.dir = self.path
            files = self._shard_files()
        self.tensors: dict[str, TensorInfo] = {}
        self._bin: BinShards | None = None
        self.complete = typed or self.index_name != BIN_INDEX_NAME
        if not self.complete:
            self._index = None
        elif self.index_name == BIN_INDEX_NAME:
            from cpift.merge.io.bin_shards import BinShards

            self.notes.append(f"note: reading .bin checkpoints of {self.path} (slower than safetensors, "
                              f"which needs no unpickling)")
            self._bin = BinShards(files)
            self.notes += self._bin.notes
            for file, entries in self._bin.entries.items():
                self.tensors.update({e.name: TensorInfo(e.name, e.dtype, e.shape, e.begin, e.end, file)
                                     for e in entries})
        else:
            for file in files:
                self.tensors.update(_shard_tensors(file, typed))
        if self._index is not None:
            self._check_index()
        self._maps: dict[Path, tuple[mmap.mmap, int]] = {}
        self._lock = threading.Lock()  # the prefetch thread maps files too
        self._read_mode = direct_read.mode()
        self._direct_fds: dict[Path, int] = {}  # O_DIRECT descriptors; -1: the file system refused
        self._buffered: dict[str, tuple[mmap.mmap, int]] = {}  # tensors read into pool buffers

    _index: dict[str, str] | None = None
    _read_mode = "off"  # for subclasses that build themselves without __init__ (views over other checkpoints)

    def _shard_files(self) -> list[Path]:
        for single_name, index_name in LAYOUTS:
            # Every file of the directory is vetted by merge/io/model_files.py: no link out, no FIFO.
            index, single = model_file(self.dir, index_name), model_file(self.dir, single_name)
            self.index_name = index_name
            if single is not None:
                # transformers' from_pretrained loads the single file before looking for an index
                # (modeling_utils._get_resolved_checkpoint_files); merge what it would load.
                if index is not None:
                    self.notes.append(f"note: {self.dir} holds both {single_name} and {index_name}; using "
                                      f"{single_name}, as transformers does")
                return [single]
            if index is not None:
                return self._index_files(index)
        raise CheckpointError(f"{self.dir}: no {SINGLE_NAME} or {INDEX_NAME} in this directory (nor "
                              f"{BIN_SINGLE_NAME} or {BIN_INDEX_NAME})")

    def _index_files(self, index: Path) -> list[Path]:
        data = load_json_bounded(read_model_file(self.dir, index.name), source=index, error=CheckpointError)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: malformed index (expected a JSON object with a "
                                  f"'weight_map' object of tensor name -> shard file name)")
        self._index = weight_map
        return [self._shard_path(index, fname) for fname in dict.fromkeys(weight_map.values())]

    def _shard_path(self, index: Path, fname: str) -> Path:
        """A weight_map value must be a plain file name inside the model directory (model_file's rule)."""
        try:
            file = model_file(self.dir, fname)
        except CheckpointError as e:
            raise CheckpointError(f"{index}: shard {fname!r}: {e}") from None
        if file is None:
            raise CheckpointError(f"{index}: names shard '{fname}', which is missing from {self.dir}")
        return file

    def _check_index(self) -> None:
        for name, fname in self._index.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != fname:
                raise CheckpointError(f"{self.dir / self.index_name}: tensor '{name}' is mapped to "
                                      f"'{fname}' but that shard does not hold it")

    def names(self) -> list[str]:
        """Tensor names in storage order (shard by shard, by offset): reading in this order is sequential."""
        return [i.name for i in sorted(self.tensors.values(), key=lambda i: (i.file.name, i.start))]

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def input_paths(self) -> list[Path]:
        """Every path this input reads: its directory and shard files (an output may be none of them)."""
        return [self.dir, *sorted({info.file for info in self.tensors.values()})]

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    def _map(self, file: Path) -> tuple[mmap.mmap, int]:
        with self._lock:
            return self._maps.get(file) or self._open_map(file)

    def _open_map(self, file: Path) -> tuple[mmap.mmap, int]:
        fd = os.open(file, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):  # tensors are read in storage order: a larger read-ahead window
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            # PROT_READ: the input cannot be written through the map (a stray write faults).
            mm = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        entry = self._maps[file] = (mm, _mman.address(mm))
        return entry

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a zero-copy, read-only view of the shard (never write into it)."""
        import torch

        info = self.tensors[name]
        if self._bin is not None:
            return self._bin.get(info.file, name)
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        with self._lock:
            held = self._buffered.get(name) if self._read_mode != "off" else None
        mm, start = held if held is not None else (self._map(info.file)[0], info.start)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "non-writable buffer": read-only on purpose
            flat = torch.frombuffer(mm, dtype=info.dtype, count=info.numel, offset=start)
        return flat.view(info.shape)

    def _advise(self, name: str, advice: int, outer: bool) -> bool:
        info = self.tensors[name]
        if info.nbytes == 0:
            return True
        _, base = self._map(info.file)
        return _mman.advise(base, info.start, info.end, advice, outer=outer)

    def populate(self, name: str) -> None:
        """Map a tensor's pages now, reading them from disk if needed (blocks; call it from a
        prefetch thread: ctypes releases the GIL)."""
        if self._bin is not None:
            return self._bin.populate(self.tensors[name].file, name)
        if self._read_direct(name):
            return
        if not self._advise(name, _mman.POPULATE_READ, True):  # kernels before 5.14
            self._advise(name, _mman.WILLNEED, True)

    def _read_direct(self, name: str) -> bool:
        """Read a tensor whose pages are not all cached with O_DIRECT into a pool buffer
        (merge/io/direct_read.py); False leaves it to the maps."""
        info = self.tensors[name]
        now = direct_read.mode() if self._read_mode != "off" else "off"  # off inside several_passes
        always = now == "always"
        if now == "off" or info.nbytes < (1 if always else direct_read.SMALL):
            return False
        _, base = self._map(info.file)
        if not always and direct_read.resident(base, info.start, info.end):
            return False
        with self._lock:
            fd = self._direct_fds.get(info.file)
            if fd is None:
                try:
                    fd = os.open(info.file, os.O_RDONLY | os.O_DIRECT)
                except OSError:
                    fd = -1
                self._direct_fds[info.file] = fd
        if fd < 0:
            return False
        try:
            held = direct_read.POOL.read(fd, info.start, info.end)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise CheckpointError(f"{info.file}: cannot read tensor '{name}': {e.strerror or e}") from None
            with self._lock:
                self._direct_fds[info.file] = -1  # this file system wants another alignment: the maps
            os.close(fd)
            return False
        with self._lock:
            self._buffered[name] = held
        return True

    def hint(self, name: str) -> None:
        """Ask the kernel to read a tensor's pages into the page cache in the background (madvise
        WILLNEED: returns at once, maps nothing into this process); not where populate reads with
        O_DIRECT, whose reads the page cache would only duplicate."""
        if self._bin is None and (self._read_mode == "off" or direct_read.mode() == "off"):
            self._advise(name, _mman.WILLNEED, True)

    def release(self, name: str) -> None:
        """Unmap a finished tensor's pages from this process (the page cache keeps them)."""
        if self._bin is not None:
            return self._bin.release(self.tensors[name].file, name)
        with self._lock:
            held = self._buffered.pop(name, None) if self._read_mode != "off" else None
        if held is not None:
            direct_read.POOL.give(held[0])
            return
        self._advise(name, _mman.DONTNEED, False)

    def close(self) -> None:
        _mman.close_maps(self._maps)
        if self._read_mode != "off":
            with self._lock:
                for fd in self._direct_fds.values():
                    if fd >= 0:
                        os.close(fd)
                self._direct_fds.clear()
                self._buffered.clear()  # their buffers are freed with the views that still hold them
        if self._bin is not None:
            self._bin.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, tensors={len(self.tensors)})"


def check_same_tensors(models: Sequence[Any]) -> None:
    """Every model holds the same tensor names with the same shapes as the first one.

    Raises:
        MismatchError: naming the first tensor that is missing from a model, or whose shape differs.
    """
    first = models[0]
    for other in models[1:]:
        missing = [n for n in first.tensors if n not in other.tensors]
        if missing:
            raise MismatchError(f"tensor '{missing[0]}' is in {first.path} but missing from {other.path}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = [n for n in other.tensors if n not in first.tensors]
        if extra:
            raise MismatchError(f"tensor '{extra[0]}' is in {other.path} but missing from {first.path}"
                                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        for name, info in first.tensors.items():
            o = other.tensors[name]
            if o.shape != info.shape:
                raise MismatchError(f"tensor '{name}': shape {list(info.shape)} in {first.path} but "
                                    f"{list(o.shape)} in {other.path}")
