"""The one rule for every file cpift reads from a model directory.

- ``model_file``: a name inside the directory, never followed out of it: a symbolic link must resolve
  inside the directory (or, for a Hub cache snapshot, into the repo's ``blobs/``, where the Hub links
  every file), and the file must be a regular file; a FIFO, device or socket is refused before it is
  opened, so nothing blocks on it. Shards, indexes, config.json, adapter and tokenizer files all pass here.
- ``read_model_file``: opens what ``model_file`` vetted without blocking (``O_NONBLOCK``) and checks the
  open file again (``fstat``), so a file swapped for a FIFO in between is refused too.
- ``read_side_files``: the files an output gets from its donor (``SIDE_FILES``), read once and validated
  as the format each claims (JSON parses as an object; tokenizer.json loads with the tokenizers
  library, or at least has a tokenizer's model object; text files are UTF-8); the writer copies these
  very bytes, so what was checked is what is published. A bad file fails the merge in one line naming
  it, before the output directory is created.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from cpift.errors import CheckpointError, CpiftError
from cpift.merge.io.publish import file_kind
from cpift.merge.io.safe_parse import MAX_BYTES, load_json_bounded

# Files copied from the first model (or --copy-tokenizer-from) so the output loads as a model.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)
TEXT_FILES = ("merges.txt", "chat_template.jinja")


def _roots(directory: Path) -> list[Path]:
    roots = [directory.resolve()]
    if directory.parent.name == "snapshots":  # a Hub cache snapshot links each file to ../../blobs/<sha>
        roots.append((directory.parent.parent / "blobs").resolve())
    return roots


def model_file(directory: str | os.PathLike, name: str) -> Path | None:
    """The file ``name`` of a model directory, vetted; None when there is none.

    Raises:
        CheckpointError: ``name`` is not a plain file name, is a link leading out of the directory, or
            is not a regular file (a FIFO, device, socket or directory).
    """
    directory = Path(directory)
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise CheckpointError(f"{directory}: {name!r} is not a plain file name in this directory")
    path = directory / name
    if not os.path.lexists(path):
        return None
    _vet(path, directory)
    return path


def _vet(path: Path, directory: Path, *, regular: bool = True) -> None:
    if path.is_symlink():
        target = path.resolve()
        if not any(target.is_relative_to(root) for root in _roots(directory)):
            raise CheckpointError(f"{path}: a link to {target}, outside {directory}; cpift reads no model file "
                                  f"from outside its directory (copy the file in instead)")
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    if regular and not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: is {file_kind(mode)}, not a regular file; cpift reads only regular files "
                              f"from a model directory")


def vet_tree(directory: str | os.PathLike) -> None:
    """``model_file``'s rule for every entry under ``directory`` (what ``push`` uploads): no link out of
    it, no FIFO, device or socket.

    Raises:
        CheckpointError: naming the first entry refused.
    """
    directory = Path(directory)
    for here, dirs, files in os.walk(directory):
        for name in dirs:
            _vet(Path(here) / name, directory, regular=False)
        for name in files:
            _vet(Path(here) / name, directory)


def read_model_file(directory: str | os.PathLike, name: str, *, max_bytes: int = MAX_BYTES) -> bytes | None:
    """The bytes of the vetted file ``name`` of a model directory (``model_file``), or None.

    Raises:
        CheckpointError: as ``model_file``, or the file is larger than ``max_bytes`` or unreadable.
    """
    path = model_file(directory, name)
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: is {file_kind(st.st_mode)}, not a regular file")
        if st.st_size > max_bytes:
            raise CheckpointError(f"{path}: {st.st_size} bytes is more than the {max_bytes} allowed")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(max_bytes + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    finally:
        os.close(fd)


def read_model_json(directory: str | os.PathLike, name: str, *, error: type[CpiftError] = CheckpointError) -> Any:
    """The parsed JSON file ``name`` of a model directory (vetted by ``model_file``), or None when absent.

    Raises:
        CheckpointError: as ``model_file``; ``error``: the JSON is malformed, too deep or too large.
    """
    data = read_model_file(directory, name)
    return None if data is None else load_json_bounded(data, source=Path(directory) / name, error=error)


def check_side_file(path: Path, data: bytes) -> None:
    """Refuse a side file that is not the format its name claims.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    name = path.name
    if name.endswith(".json"):
        value = load_json_bounded(data, source=path, error=CheckpointError)
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
        if name == "tokenizer.json":
            _check_tokenizer_json(path, data, value)
    elif name in TEXT_FILES:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start})") from None
    elif name == "tokenizer.model" and not data:
        raise CheckpointError(f"{path}: empty (a SentencePiece model is a non-empty protobuf)")


def _check_tokenizer_json(path: Path, data: bytes, value: dict) -> None:
    if not isinstance(value.get("model"), dict):
        raise CheckpointError(f"{path}: not a tokenizers JSON (no 'model' object)")
    try:
        from tokenizers import Tokenizer
    except ImportError:  # without the library, the structure above is what can be checked
        return
    try:
        Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # the library raises a bare Exception for a malformed tokenizer
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path}: the tokenizers library cannot load it ({reason})") from None


def read_side_files(directory: str | os.PathLike) -> dict[str, bytes]:
    """Every ``SIDE_FILES`` file of ``directory``, vetted (``model_file``) and validated (``check_side_file``).

    Raises:
        CheckpointError: naming the first file refused.
    """
    found = {}
    for name in SIDE_FILES:
        data = read_model_file(directory, name)
        if data is not None:
            check_side_file(Path(directory) / name, data)
            found[name] = data
    return found
