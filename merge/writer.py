"""Write a Hugging Face checkpoint: safetensors shards plus index, from a background thread, atomically.

The shard plan (which tensor goes in which file, at which offset) is fixed before the first byte is
written, because every tensor's dtype and shape is known from the inputs' headers. Each shard's
header is therefore written first and tensor bytes are streamed after it straight from the caller's
buffer (no serialisation copy). Sharding follows transformers' rule: fill a shard until the next
tensor would push it past ``max_shard_size``; a tensor larger than that gets a shard of its own.

Everything is assembled in a hidden sibling directory ``.NAME.cpift-partial`` and renamed to NAME only
when complete, so a merge that dies leaves nothing that looks like a finished model.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import DTYPE_NAMES, INDEX_NAME, SINGLE_NAME
from .errors import OutputError, ParameterError

# Files copied from the first model (or --copy-tokenizer-from) so the output loads as a model.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes from ``5GB`` (10^9), ``500MiB`` (2^20), ``123`` ...; transformers' convention."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = _SIZE.match(str(value))
        unit = (m.group(2) or "").upper() if m else None
        if unit is not None and unit and not unit.endswith("B"):
            unit += "B"
        if not m or unit not in _UNITS:
            raise ParameterError(f"max_shard_size: cannot read '{value}' as a size "
                                 f"(use bytes or a suffix like 500MB, 2GB, 1GiB)")
        size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ParameterError(f"max_shard_size: must be positive, got {value!r}")
    return size


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
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for t in group:
            header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header so tensor data is 8-aligned
        shards.append(Shard(name, [t.name for t in group], len(raw).to_bytes(8, "little") + raw, offset))
    return shards


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.cpift-partial"


def check_output(out: str | os.PathLike, *, overwrite: bool) -> Path:
    """Fail early (before any work) if the output exists and overwrite is off."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: output already exists (pass --overwrite / overwrite=True to replace it)")
    if not out.parent.exists():
        raise OutputError(f"{out.parent}: parent directory of the output does not exist")
    return out


class ShardWriter:
    """Streams tensors, in plan order, into shards from a background thread.

    ``write(name, tensor, done)`` queues the tensor's bytes; ``done()`` is called from the writer thread
    once they are on their way to disk, so the caller can reuse the buffer. ``finish`` writes the index
    and side files and renames the directory into place; ``abort`` removes the partial directory.
    """

    def __init__(self, out: str | os.PathLike, tensors: list[OutTensor], *, max_shard_size: int,
                 metadata: dict[str, str] | None = None, depth: int = 2):
        self.out = Path(out)
        self.tmp = partial_dir(self.out)
        self.shards = plan_shards(tensors, max_shard_size, metadata)
        self._order = [(i, n) for i, s in enumerate(self.shards) for n in s.names]
        self._pos = 0
        self.bytes_written = 0
        if self.tmp.exists():
            shutil.rmtree(self.tmp)  # left by a merge that died; never a finished output
        self.tmp.mkdir()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cpift-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        f = None
        shard_idx = -1
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    break
                idx, data, done = item
                if self._error is None:
                    try:
                        if idx != shard_idx:
                            if f is not None:
                                f.close()
                            shard_idx = idx
                            f = open(self.tmp / self.shards[idx].file, "wb")
                            f.write(self.shards[idx].header)
                            self.bytes_written += len(self.shards[idx].header)
                        if data is not None and data.numel():
                            f.write(memoryview(data.numpy()))
                            self.bytes_written += data.numel()
                    except BaseException as e:  # reported to the caller on the next write/finish
                        self._error = e
                if done is not None:
                    done()
        finally:
            if f is not None:
                try:
                    f.close()
                except OSError as e:
                    self._error = self._error or e

    def _raise(self) -> None:
        if self._error is not None:
            e = self._error
            raise OutputError(f"{self.out}: cannot write the output: {e.strerror or e}"
                              if isinstance(e, OSError) else f"{self.out}: writer failed: {e}") from None

    def write(self, name: str, tensor: torch.Tensor, done: Callable[[], None] | None = None) -> None:
        """Queue the next tensor of the plan (its bytes must stay valid until ``done`` is called)."""
        self._raise()
        idx, expected = self._order[self._pos]
        if name != expected:
            raise RuntimeError(f"writer expected tensor '{expected}', got '{name}'")
        self._pos += 1
        data = tensor.contiguous().reshape(-1).view(torch.uint8) if tensor.numel() else None
        self._queue.put((idx, data, done))

    def finish(self, side_files_from: Path | None, extra_files: dict[str, str] | None = None) -> Path:
        """Flush, write index and side files, then rename the partial directory into place."""
        if self._pos != len(self._order):
            raise RuntimeError(f"writer got {self._pos} of {len(self._order)} tensors")
        # Shards with no tensors at all (a model of empty tensors) still need their header written.
        self._queue.put(None)
        self._thread.join()
        self._raise()
        try:
            for s in self.shards:
                p = self.tmp / s.file
                if not p.exists():
                    p.write_bytes(s.header)
            if len(self.shards) > 1:
                total = sum(s.nbytes for s in self.shards)
                weight_map = {n: s.file for s in self.shards for n in s.names}
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            if side_files_from is not None:
                for fname in SIDE_FILES:
                    src = side_files_from / fname
                    if src.is_file():
                        shutil.copyfile(src, self.tmp / fname)
            for fname, text in (extra_files or {}).items():
                (self.tmp / fname).write_text(text)
            if self.out.exists():
                trash = self.out.parent / f".{self.out.name}.cpift-old"
                if trash.exists():
                    shutil.rmtree(trash)
                os.replace(self.out, trash)
                os.replace(self.tmp, self.out)
                shutil.rmtree(trash)
            else:
                os.replace(self.tmp, self.out)
        except OSError as e:
            raise OutputError(f"{self.out}: cannot write the output: {e.strerror or e}") from None
        return self.out

    def abort(self) -> None:
        """Stop the thread and remove the partial directory (nothing finished-looking is left)."""
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("aborted")
            self._queue.put(None)
            self._thread.join()
        shutil.rmtree(self.tmp, ignore_errors=True)
