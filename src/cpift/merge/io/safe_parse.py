"""Bounded parsing of user JSON and YAML: nesting depth, size and YAML alias expansion are capped.

Every reader of a user file (index, shard header, config.json, training JSONL, mergekit YAML,
step and pipeline recipes, mask metadata) goes through these two functions, so a hostile document
ends in one error naming its source instead of a RecursionError or a run that never ends:

- depth: at most ``max_depth`` nested lists/objects (default 64). Python's json module recurses
  per level, so a deeper document is refused, whether it is caught by the depth walk below or by
  the interpreter's own recursion limit first.
- size: at most ``max_bytes`` of text (default 100 MB, the cap safetensors puts on a header).
- YAML aliases: an alias re-uses its anchor's node, so ``a: &a [x, x]; b: &b [*a, *a]; ...`` is a few
  hundred bytes that describe 10^9 nodes (billion laughs). The loader counts the nodes each node
  stands for, aliases expanded, and refuses a document past ``max_nodes``; the count is computed once
  per node, so refusing takes time linear in the document's text, not its expansion.
- JSON constants NaN / Infinity are not JSON (RFC 8259) and are refused, as serde_json does.

A config or recipe file is read by ``read_user_text``, the one rule for a file named on the command
line: a regular file is read; a FIFO or pipe (``cpift-merge config <(cat a.yml)``) is read exactly once,
with a bounded wait (``STREAM_WAIT`` seconds for its writer, then one line naming it, never a hang), and
its text is kept for the rest of the run, so a second reader of the same path gets the same text; a
device, socket or directory is refused before reading.
"""

from __future__ import annotations

import json
import os
import select
import stat
import time
from typing import Any

import yaml

from cpift.errors import ConfigError, CpiftError
from cpift.merge.io.publish import file_kind

MAX_DEPTH = 64
MAX_BYTES = 100_000_000
MAX_YAML_NODES = 1_000_000
MAX_TEXT_BYTES = 10_000_000  # a config or recipe
STREAM_WAIT = 3.0  # seconds a FIFO's writer has to deliver the whole text
_streams: dict[tuple[int, int], str] = {}  # (device, inode) of each stream read: its text


def read_user_text(path: str | os.PathLike, *, what: str = "file", error: type[CpiftError] = ConfigError,
                   max_bytes: int = MAX_TEXT_BYTES, wait: float = STREAM_WAIT) -> str:
    """The UTF-8 text of a config or recipe file named by the user (module docstring's rule).

    Raises:
        ``error``: one line naming ``path``: missing, unreadable, not a file or a stream, a stream
            whose writer did not finish within ``wait`` seconds, too large, or not UTF-8.
    """
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        elif stat.S_ISFIFO(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key not in _streams:
                _streams[key] = _decode(_read_stream(path, what, error, max_bytes, wait), path, what, error)
            return _streams[key]
        else:
            raise error(f"{path}: the {what} is {file_kind(st.st_mode)}, not a regular file; give a YAML file (or "
                        f"a pipe such as <(cat f.yml))")
    except CpiftError:
        raise
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise error(f"{path}: the {what} is larger than the {max_bytes} bytes allowed")
    return _decode(data, path, what, error)


def _decode(data: bytes, path, what: str, error: type[CpiftError]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: the {what} is not UTF-8 text") from None


def _read_stream(path, what: str, error: type[CpiftError], max_bytes: int, wait: float) -> bytes:
    """Everything a FIFO's writer sends until it closes, within ``wait`` seconds (no writer: refused)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO without a writer must not block
    chunks, size, deadline = [], 0, time.monotonic() + wait
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise error(f"{path}: the {what} is a FIFO and no writer finished sending it within {wait:g} s; "
                            f"give a regular file, or start the writer first")
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # the writer closed its end: the whole text is here
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise error(f"{path}: the {what} is larger than the {max_bytes} bytes allowed")
    finally:
        os.close(fd)


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON/YAML value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    seen: set[int] = set()
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)) and id(v) not in seen:
            seen.add(id(v))
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def load_json_bounded(text: str | bytes, *, source: str | os.PathLike, max_depth: int = MAX_DEPTH,
                      max_bytes: int = MAX_BYTES, error: type[CpiftError] = ConfigError) -> Any:
    """Parse JSON text with bounded depth and size.

    Args:
        text: the document; bytes must be UTF-8 (no BOM, no invalid sequences).
        source: what the text is (a path, ``file:line``), named in the error.
        max_depth: most nested lists/objects allowed (the top-level object counts as 1).
        max_bytes: largest document accepted.
        error: the CpiftError subclass raised.

    Returns:
        The parsed value.

    Raises:
        ``error``: one line naming ``source`` and what is wrong.

    Example:
        >>> load_json_bounded('{"a": [1]}', source="config.json")
        {'a': [1]}
    """
    if len(text) > max_bytes:
        raise error(f"{source}: {len(text)} bytes is more than the {max_bytes} allowed")
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        raise error(f"{source}: not valid UTF-8 (byte {e.start})") from None
    except RecursionError:
        raise error(f"{source}: JSON nested more than {max_depth} levels deep") from None
    except json.JSONDecodeError as e:
        raise error(f"{source}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # NaN / Infinity
        raise error(f"{source}: not valid JSON ({e})") from None
    if _depth(value) > max_depth:
        raise error(f"{source}: JSON nested more than {max_depth} levels deep")
    return value


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that caps nesting depth and the node count with aliases expanded."""

    max_depth = MAX_DEPTH
    max_nodes = MAX_YAML_NODES

    def __init__(self, stream):
        super().__init__(stream)
        self._level = 0
        self._weight: dict[int, int] = {}  # id(node) -> nodes it stands for, aliases expanded

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)  # the anchored node, shared
            return node
        self._level += 1
        if self._level > self.max_depth:
            raise yaml.YAMLError(f"nested more than {self.max_depth} levels deep")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._level -= 1
        weight = 1
        if isinstance(node, yaml.SequenceNode):
            weight += sum(self._weight.get(id(c), 1) for c in node.value)
        elif isinstance(node, yaml.MappingNode):
            weight += sum(self._weight.get(id(k), 1) + self._weight.get(id(v), 1) for k, v in node.value)
        if weight > self.max_nodes:
            raise yaml.YAMLError(f"more than {self.max_nodes} nodes once its aliases are expanded "
                                 f"(an alias bomb?)")
        self._weight[id(node)] = weight
        return node


def load_yaml_file(path: str | os.PathLike, *, what: str, error: type[CpiftError] = ConfigError) -> Any:
    """A YAML file named by the user (a config, a recipe), read by ``read_user_text`` and parsed by
    ``load_yaml_bounded``: the one way cpift reads YAML. ``what`` names the file in errors."""
    return load_yaml_bounded(read_user_text(path, what=what, error=error), source=path, error=error)


def load_yaml_bounded(text: str, *, source: str | os.PathLike, max_depth: int = MAX_DEPTH,
                      max_bytes: int = 10_000_000, max_nodes: int = MAX_YAML_NODES,
                      error: type[CpiftError] = ConfigError) -> Any:
    """Parse YAML (safe tags only) with bounded depth, size and alias expansion.

    Args:
        text: the document.
        source: the file named in the error.
        max_depth: most nested sequences/mappings allowed.
        max_bytes: largest document accepted.
        max_nodes: most nodes the document may stand for once its aliases are expanded.
        error: the CpiftError subclass raised.

    Returns:
        The parsed value (None for an empty document).

    Raises:
        ``error``: one line naming ``source``: invalid YAML, too deep, too large or an alias bomb.

    Example:
        >>> load_yaml_bounded("merge_method: linear", source="merge.yml")
        {'merge_method': 'linear'}
    """
    if len(text) > max_bytes:
        raise error(f"{source}: {len(text)} bytes is more than the {max_bytes} allowed")
    loader_cls = type("Loader", (_BoundedLoader,), {"max_depth": max_depth, "max_nodes": max_nodes})
    loader = loader_cls(text)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise error(f"{source}: invalid YAML: nested more than {max_depth} levels deep") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(e, "problem", None) or getattr(e, "context", None) or str(e)
        raise error(f"{source}: {where}invalid YAML: {' '.join(str(what).split())}") from None
    finally:
        loader.dispose()
