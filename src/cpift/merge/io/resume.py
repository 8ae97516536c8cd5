"""Resumable merges: the partial directory keeps a manifest of its finished output shards.

``.NAME.cpift-partial/cpift-resume.json`` = ``{"version", "fingerprint", "shards": {file: sha256}}``.
It is written when the partial directory is laid out (no shards yet), then rewritten atomically
(temporary file + ``os.replace``) each time a shard is complete and hashed. A merge run again with
``resume=True`` (``--resume``) keeps every listed shard whose file still has that SHA-256, rewrites the
others, and computes only the tensors of the shards it rewrites.

Refusal: the fingerprint holds what decides the output bytes: the method, its parameters (a
per-tensor function is evaluated on every tensor name), the dtypes, the shard size and the shard
layout, and, per input, the SHA-256 of its index and config.json and the size and modification time
of every shard file. Any difference refuses to resume with one line naming it, because shards of the
old recipe or the old inputs next to shards of the new ones would make a model that no command
describes.

Two costs are left out on purpose:
- No fsync. A killed process leaves what it wrote in the page cache (the shards are MAP_SHARED
  files); a machine that dies may lose pages, and the re-hash on resume catches that. An fsync per
  shard would make every merge wait for the disk, for a case the checksum already covers.
- The last shard is not hashed. It completes right before the index is written and the directory
  renamed, so a crash in that window costs one shard, and the common single-shard output pays
  nothing at all. Hashing (0.75 GB/s on one core here) runs in a background thread at low priority
  while the next shard is computed.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from cpift.errors import OutputError
from cpift.merge.io.checkpoint import BIN_INDEX_NAME, INDEX_NAME, Checkpoint
from cpift.merge.io.manifest import RESUME_JOURNAL
from cpift.merge.io.model_files import read_model_file
from cpift.merge.io.publish import write_atomic

MANIFEST = RESUME_JOURNAL
VERSION = 1


def sha256_file(path: Path, *, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL on large buffers
    return h.hexdigest()


def _canon(value: Any, names: Sequence[str]) -> Any:
    """A JSON value that equals another one exactly when the two parameters give the same math."""
    if callable(value):
        return {"per_tensor": [_canon(value(n), names) for n in names]}
    if isinstance(value, Mapping):
        return {str(k): _canon(v, names) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canon(v, names) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _file_sha(directory: Path, name: str) -> str | None:
    data = read_model_file(directory, name)
    return hashlib.sha256(data).hexdigest() if data is not None else None


def input_identity(model: Checkpoint) -> dict:
    """What resume compares of one input: index and config hashes, each shard's size and mtime."""
    files = sorted({f for f in model.input_paths() if f.is_file()})  # an adapter's files too
    return {"path": os.path.abspath(model.path),
            "index_sha256": _file_sha(model.dir, model.index_name),
            "config_sha256": _file_sha(model.dir, "config.json"),
            "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}}


def fingerprint(*, method: str, params: Mapping[str, Any] | None, recipe: Any, options: Mapping[str, Any],
                models: Sequence[Checkpoint], names: Sequence[str], headers: Sequence[tuple[str, bytes]]) -> dict:
    """The identity of a merge for resume: options (``params`` evaluated on ``names``), inputs, layout."""
    layout = hashlib.sha256()
    for file, header in headers:
        layout.update(file.encode() + b"\0" + header)
    return {"options": {"method": method, "params": _canon(params, names), "recipe": _canon(recipe, names),
                        **{k: _canon(v, names) for k, v in options.items()}},
            "inputs": [input_identity(m) for m in models],
            "layout_sha256": layout.hexdigest()}


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _changed(old: Any, new: Any, path: str) -> tuple[str, Any, Any] | None:
    """The first (dotted key, old, new) where two option values differ, descending into mappings."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in dict.fromkeys([*new, *old]):
            found = _changed(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    return None if old == new else (path, old, new)


def difference(old: Mapping, new: Mapping) -> str | None:
    """What changed between two fingerprints, as a phrase; None if nothing did."""
    found = _changed(old.get("options", {}), new["options"], "")
    if found:
        key, then, now = found
        return f"option '{key}' changed ({_short(then)} then, {_short(now)} now)"
    o_in, n_in = old.get("inputs", []), new["inputs"]
    if len(o_in) != len(n_in):
        return f"the merge had {len(o_in)} input models, now {len(n_in)}"
    for i, (a, b) in enumerate(zip(o_in, n_in)):
        if a.get("path") != b["path"]:
            return f"input {i + 1} was {a.get('path')}, now {b['path']}"
        index = BIN_INDEX_NAME if any(f.endswith(".bin") for f in b["files"]) else INDEX_NAME
        for key, fname in (("index_sha256", index), ("config_sha256", "config.json")):
            if a.get(key) != b[key]:
                return f"{Path(b['path']) / fname} changed since the interrupted merge"
        for fname in dict.fromkeys([*b["files"], *a.get("files", {})]):
            if a.get("files", {}).get(fname) != b["files"].get(fname):
                return f"{Path(b['path']) / fname} changed since the interrupted merge (size or modification time)"
    if old.get("layout_sha256") != new["layout_sha256"]:
        return "the output shard layout changed"
    return None


def load_manifest(tmp: Path) -> dict | None:
    try:
        data = json.loads((tmp / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("shards"), dict):
        return None
    return data


def inspect_partial(tmp: Path, out: Path, files: Sequence[tuple[str, int]],
                    fp: Mapping) -> tuple[dict[int, str], list[str]]:
    """Which shards of an interrupted merge in ``tmp`` can be kept: ``({shard index: sha256}, notes)``.

    ``files``: (file name, full size) per planned shard. Reads, never writes.

    Raises:
        OutputError: the interrupted merge had other options or inputs.
    """
    if not tmp.is_dir():
        return {}, [f"note: --resume: no unfinished merge at {tmp}; starting from the beginning"]
    manifest = load_manifest(tmp)
    if manifest is None:
        return {}, [f"note: --resume: {tmp} has no readable {MANIFEST} (interrupted before it was written); "
                    f"starting from the beginning"]
    why = difference(manifest.get("fingerprint", {}), fp)
    if why is not None:
        raise OutputError(f"{out}: cannot resume: {why}; run without --resume to start over "
                          f"(this replaces the unfinished output in {tmp})")
    kept: dict[int, str] = {}
    notes = []
    index = {name: i for i, (name, _) in enumerate(files)}
    for fname, digest in manifest["shards"].items():
        i = index.get(fname)
        path = tmp / fname
        if i is None:
            continue
        try:
            good = path.is_file() and path.stat().st_size == files[i][1] and sha256_file(path) == digest
        except OSError:
            good = False
        if good:
            kept[i] = digest
        else:
            notes.append(f"note: --resume: {path} does not match its SHA-256 in {MANIFEST}; rewriting it")
    notes.append(f"note: --resume: kept {len(kept)} of {len(files)} output shards (SHA-256 verified); "
                 f"computing the other {len(files) - len(kept)}")
    return kept, notes


class Journal:
    """The manifest of one partial directory, and the thread that hashes finished shards into it."""

    def __init__(self, tmp: Path, fp: Mapping, kept: Mapping[str, str]):
        self.tmp = tmp
        self.data = {"version": VERSION, "fingerprint": dict(fp), "shards": dict(kept)}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None
        self.save()

    def save(self) -> None:
        """Replace the manifest atomically: a reader sees the old one or the new one, never a torn one."""
        write_atomic(self.tmp / MANIFEST, json.dumps(self.data, indent=1) + "\n")

    def shard_done(self, file: str) -> None:
        """Hash ``file`` (complete in the page cache) in the background and record it."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cpift-shard-hash", daemon=True)
            self._thread.start()
        self._queue.put(file)

    def record(self, file: str, digest: str) -> None:
        self.data["shards"][file] = digest
        self.save()

    def _run(self) -> None:
        try:
            # Lowest priority for this thread only (Linux nice is per thread): hashing fills idle
            # cycles instead of stalling torch's worker threads at their barriers.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (OSError, AttributeError):
            pass
        while (file := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.record(file, sha256_file(self.tmp / file))
                except OSError as e:
                    self._error = e

    def close(self) -> None:
        """Wait for the hashes still queued; raise the first error the thread met."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error

    def remove(self) -> None:
        (self.tmp / MANIFEST).unlink(missing_ok=True)
