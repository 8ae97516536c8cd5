"""Read PyTorch pickle checkpoints (``pytorch_model.bin``, or shards with an index) tensor by tensor.

Each shard is opened with ``torch.load(file, map_location="cpu", weights_only=True, mmap=True)``:
weights_only refuses any pickled object other than tensors and plain containers (no code runs), and
mmap maps the zip file torch.save writes (torch >= 1.6) instead of reading it, so a tensor's pages
are read only when used, shared with the page cache, like a safetensors shard's. The mapping is
private (MAP_PRIVATE): nothing written through it reaches the file, so inputs cannot be modified.
The legacy format (torch.save with ``_use_new_zipfile_serialization=False``, torch < 1.6) cannot be
mapped, and a zip saved big-endian is byte-swapped in place as it loads; such a shard is loaded into
memory, at most two at a time (a note says so; read in the order of a model sharded otherwise,
such a shard may be loaded more than once).

Every shard is loaded once when the checkpoint is opened, to validate it before any output is
written: a flat dict of names to dense CPU tensors of a dtype cpift reads, or a one-line
CheckpointError naming the file. Tensors that share storage (tied weights saved under two names)
come back as one tensor per name, as transformers' ``load_state_dict`` gives them.

Byte positions: a .bin shard has no header of byte ranges, so each tensor's [begin, end) is its place
in the pickle's order (cumulative byte counts): it orders the reads and sizes them, nothing more.
"""

from __future__ import annotations

import pickle
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from cpift.errors import CheckpointError
from cpift.merge.io.st_header import DTYPE_NAMES, HeaderEntry

from . import _mman

__all__ = ["BinShards"]

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format since 1.6 is a zip archive
COPIED_SHARDS = 2  # shards that cannot be mapped held in memory at once: the one in use and the next
UNPICKLER = "WeightsUnpickler error:"  # where torch's weights_only message says what it refused


def _reason(e: BaseException) -> str:
    """The first sentence of an error: of what the weights-only unpickler refused, else of its first
    line, without the paragraphs of advice torch puts around them."""
    text = str(e)
    if UNPICKLER in text:
        text = " ".join(text.split(UNPICKLER, 1)[1].split("Check the documentation")[0].split())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0].split(". ")[0].rstrip(".")[:200] if lines else type(e).__name__


def _little_endian_zip(file: Path) -> bool:
    """Whether torch may map this zip as is: a shard saved big-endian is byte-swapped in place when
    loaded, and releasing swapped pages of a private map would bring back the file's bytes, so such a
    shard is loaded into memory instead."""
    try:
        with zipfile.ZipFile(file) as zf:
            order = next((zf.read(n) for n in zf.namelist() if n.endswith("/byteorder")), b"little")
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{file}: truncated or corrupt: the zip archive torch.save writes cannot be "
                              f"read ({_reason(e)}); the file was cut short or damaged") from None
    return order.strip() != b"big"


def load_shard(file: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """``torch.load`` one shard safely; return (name -> tensor, whether it is memory-mapped).

    Raises:
        CheckpointError: naming ``file``: missing, empty, truncated or corrupt, refused by weights_only,
            or not a flat dict of dense tensors of a supported dtype.
    """
    try:
        with open(file, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read this .bin checkpoint ({e.strerror or e})") from None
    if not magic:
        raise CheckpointError(f"{file}: empty file, not a PyTorch checkpoint")
    mapped = magic == ZIP_MAGIC and _little_endian_zip(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as e:
        reason = _reason(e)
        if "global" in reason.lower():
            raise CheckpointError(f"{file}: refused: the pickle holds an object that torch.load(weights_only=True) "
                                  f"does not allow ({reason}); cpift reads only tensors from .bin files "
                                  f"(convert a checkpoint you trust to safetensors)") from None
        raise CheckpointError(f"{file}: corrupt or not a PyTorch checkpoint ({reason})") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - torch's zip reader and unpickler raise many types
        raise CheckpointError(f"{file}: truncated, corrupt or not a PyTorch checkpoint "
                              f"({type(e).__name__}: {_reason(e)})") from None
    return _checked(file, state), mapped


def _checked(file: Path, state: object) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: not a state dict (the pickle holds a {type(state).__name__}; expected a "
                              f"dict of tensor name -> tensor)")
    out = {}
    for name, t in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{file}: not a state dict (key {name!r} is not a tensor name)")
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{file}: entry '{name}' is of type {type(t).__name__}, not a tensor "
                                  f"(expected a flat dict of tensor name -> tensor)")
        if t.layout != torch.strided or t.is_quantized:
            raise CheckpointError(f"{file}: tensor '{name}' is {'quantized' if t.is_quantized else t.layout}; "
                                  f"cpift reads dense tensors")
        if t.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{file}: tensor '{name}' has dtype {t.dtype}, which cpift does not read "
                                  f"({', '.join(str(d).removeprefix('torch.') for d in DTYPE_NAMES)})")
        out[name] = t.detach()  # an nn.Parameter becomes a plain tensor (no autograd)
    return out


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The address range [start, end) of the elements a (possibly strided) tensor reads."""
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


class BinShards:
    """The tensors of ``.bin`` shard files, validated at once, then served by (file, name).

    Args:
        files: the shards, each a torch.save'd dict of tensors.

    Raises:
        CheckpointError: naming the first shard that cannot be read safely (``load_shard``).
    """

    def __init__(self, files: list[Path]):
        self.entries: dict[Path, list[HeaderEntry]] = {}
        self.notes: list[str] = []
        self._mapped: dict[Path, dict[str, torch.Tensor]] = {}
        self._copied: OrderedDict[Path, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()  # the prefetch thread loads shards too
        for file in files:
            state = self._load(file)
            begin, entries = 0, []
            for name, t in state.items():
                nbytes = t.numel() * t.element_size()
                entries.append(HeaderEntry(name, t.dtype, tuple(t.shape), begin, begin + nbytes))
                begin += nbytes
            self.entries[file] = entries
        legacy = [f.name for f in files if f not in self._mapped]
        if legacy:
            self.notes.append(f"note: {', '.join(legacy)} in {files[0].parent} cannot be memory-mapped (torch.save's "
                              f"legacy format, or big-endian): each is loaded into memory when it is read")

    def _load(self, file: Path) -> dict[str, torch.Tensor]:
        with self._lock:
            state = self._mapped.get(file)
            if state is None:
                state = self._copied.pop(file, None)
            if state is None:
                state, mapped = load_shard(file)
                if mapped:
                    self._mapped[file] = state  # address space only: pages are released as tensors finish
            if file not in self._mapped:
                self._copied[file] = state
                while len(self._copied) > COPIED_SHARDS:
                    self._copied.popitem(last=False)
            return state

    def get(self, file: Path, name: str) -> torch.Tensor:
        """The tensor ``name`` of shard ``file``: a view of the file's private map (never write into it)."""
        return self._load(file)[name]

    def _advise(self, file: Path, name: str, advice: int, outer: bool) -> bool:
        state = self._mapped.get(file)
        if state is None or state[name].numel() == 0:
            return True  # in memory (legacy format, or not mapped yet): nothing to map or release
        start, end = _span(state[name])
        return _mman.advise(0, start, end, advice, outer=outer)

    def populate(self, file: Path, name: str) -> None:
        """Map the tensor's pages now (loading its shard first if needed); see Checkpoint.populate."""
        self._load(file)
        if not self._advise(file, name, _mman.POPULATE_READ, True):
            self._advise(file, name, _mman.WILLNEED, True)

    def release(self, file: Path, name: str) -> None:
        """Drop a finished tensor's pages from this process: the map is private and never written, so
        the pages are the file's and are read again (from the page cache) if a tied name needs them."""
        self._advise(file, name, _mman.DONTNEED, False)

    def close(self) -> None:
        with self._lock:
            self._mapped.clear()
            self._copied.clear()
