"""Parse and validate a safetensors header as strictly as the safetensors library does.

The rules, as huggingface/safetensors ``safetensors/src/tensor.rs`` (``SafeTensors::read_metadata``,
``Metadata::validate``) and its serde types apply them:

1. The first 8 bytes are the header length N (u64, little-endian); a file shorter than 8 bytes is
   refused (HeaderTooSmall), N > 100_000_000 is refused (HeaderTooLarge) and 8 + N must lie inside
   the file (InvalidHeaderLength).
2. The header is UTF-8 (InvalidHeader) holding one JSON object (serde_json: no NaN/Infinity, no
   trailing characters but whitespace, at most 127 nested levels under its recursion limit of 128).
3. ``__metadata__`` is absent, null, or an object of string -> string.
4. Every other entry is an object with ``dtype`` (a known name), ``shape`` (non-negative integers)
   and ``data_offsets`` (exactly two non-negative integers); unknown extra fields are ignored.
5. Sorted by their offsets, the tensors start at 0 and each begins where the previous one ended, with
   begin <= end (InvalidOffset): no gap, no overlap.
6. numel * itemsize, computed in u64 without overflow (ValidationOverflow), equals end - begin
   (TensorInvalidInfo).
7. The last end equals the size of the data section, the file's size - 8 - N (MetadataIncompleteBuffer):
   a truncated file and trailing bytes are both refused.

cpift reads a subset of the library's dtypes; a header with another one (C64, F4, ...) is refused
as unsupported, with its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from cpift.errors import CheckpointError
from cpift.merge.io.safe_parse import load_json_bounded

HEADER_MAX_BYTES = 100_000_000  # the library's MAX_HEADER_SIZE
HEADER_MAX_DEPTH = 127  # serde_json's recursion limit 128: 127 nested levels parse, 128 do not
_USIZE = 1 << 64

if TYPE_CHECKING:
    import torch

# Each dtype cpift reads: its header name, its torch attribute and its size in bytes. The headers are
# parsed and validated without torch (a refusal of a bad input costs no torch import, cli/precheck.py);
# DTYPES and DTYPE_NAMES (torch dtypes) are built on first use.
_DTYPE_TABLE = (("F64", "float64", 8), ("F32", "float32", 4), ("F16", "float16", 2), ("BF16", "bfloat16", 2),
                ("I64", "int64", 8), ("I32", "int32", 4), ("I16", "int16", 2), ("I8", "int8", 1),
                ("U64", "uint64", 8), ("U32", "uint32", 4), ("U16", "uint16", 2), ("U8", "uint8", 1),
                ("BOOL", "bool", 1), ("F8_E4M3", "float8_e4m3fn", 1), ("F8_E5M2", "float8_e5m2", 1))
ITEMSIZE: dict[str, int] = {name: size for name, _, size in _DTYPE_TABLE}
FLOATING_NAMES = frozenset(name for name, _, _ in _DTYPE_TABLE if name.startswith(("F", "BF")))
_TORCH_TABLES: dict[str, dict] = {}


def __getattr__(name: str) -> dict:
    """``DTYPES`` (header name -> torch.dtype) and ``DTYPE_NAMES`` (its inverse), built when first asked for."""
    if name not in ("DTYPES", "DTYPE_NAMES"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _TORCH_TABLES:
        import torch

        dtypes = {key: getattr(torch, attr) for key, attr, _ in _DTYPE_TABLE}
        _TORCH_TABLES.update(DTYPES=dtypes, DTYPE_NAMES={v: k for k, v in dtypes.items()})
    return _TORCH_TABLES[name]


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype of a header dtype name (imports torch)."""
    return __getattr__("DTYPES")[name]


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a validated header: offsets relative to the start of the data section."""

    name: str
    dtype: Any  # a torch.dtype; the header's name (a str) where parsed with dtype_of=str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(file: Path) -> tuple[dict, int]:
    """Parse one safetensors header (rules 1-2); return (header object, offset where data begins)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            n = int.from_bytes(raw, "little")
            if n > HEADER_MAX_BYTES:
                raise CheckpointError(f"{file}: not a safetensors file (header length {n} is over the "
                                      f"{HEADER_MAX_BYTES} bytes safetensors allows)")
            if 8 + n > size:
                raise CheckpointError(f"{file}: truncated or not a safetensors file "
                                      f"(header of {n} bytes, file of {size})")
            text = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: shard file is missing") from None
    except IsADirectoryError:
        raise CheckpointError(f"{file}: is a directory, expected a safetensors file") from None
    header = load_json_bounded(text, source=f"{file}: not a safetensors file: header",
                               max_depth=HEADER_MAX_DEPTH, max_bytes=HEADER_MAX_BYTES, error=CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file (header is not a JSON object)")
    return header, 8 + n


def _usize(v: object) -> bool:
    return type(v) is int and 0 <= v < _USIZE


def _entry(file: Path, name: str, meta: object, dtype_of: Callable[[str], Any]) -> tuple[HeaderEntry, int]:
    """Rule 4 for one tensor; (its entry, its itemsize)."""
    bad = f"{file}: tensor '{name}' has a malformed header entry"
    if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
        raise CheckpointError(f"{bad} (expected an object with dtype, shape and data_offsets)")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise CheckpointError(f"{bad} (dtype {dtype!r} is unknown or not supported; cpift reads "
                              f"{', '.join(ITEMSIZE)})")
    if not isinstance(shape, list) or not all(_usize(d) for d in shape):
        raise CheckpointError(f"{bad} (shape {shape!r} is not a list of non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_usize(x) for x in offsets):
        raise CheckpointError(f"{bad} (data_offsets {offsets!r} is not two non-negative integers)")
    return HeaderEntry(name, dtype_of(dtype), tuple(shape), offsets[0], offsets[1]), ITEMSIZE[dtype]


def header_entries(file: Path, header: dict, data_size: int, *,
                   dtype_of: Callable[[str], Any] = torch_dtype) -> list[HeaderEntry]:
    """Validate a parsed header against a data section of ``data_size`` bytes (rules 3-7).

    ``dtype_of`` maps a header dtype name to the entries' ``dtype`` (``str``: keep the name, no torch).

    Returns:
        The tensors in offset order.

    Raises:
        CheckpointError: naming ``file`` and the tensor or field that breaks a rule.
    """
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{file}: malformed header: __metadata__ must be an object of strings")
    sized = sorted((_entry(file, n, m, dtype_of) for n, m in header.items() if n != "__metadata__"),
                   key=lambda pair: (pair[0].begin, pair[0].end))
    start = 0
    for e, itemsize in sized:
        if e.begin != start or e.end < e.begin:
            why = ("overlaps the previous tensor" if e.begin < start else
                   "leaves a gap after the previous tensor" if e.begin > start else "ends before it begins")
            raise CheckpointError(f"{file}: tensor '{e.name}' has invalid data_offsets [{e.begin}, {e.end}]: "
                                  f"it {why} (expected to begin at {start})")
        start = e.end
        numel = 1
        for d in e.shape:  # as the library: the element count, then the bytes, each within u64
            numel *= d
            if numel >= _USIZE:
                break
        nbytes = numel * itemsize
        if nbytes >= _USIZE:
            raise CheckpointError(f"{file}: tensor '{e.name}': shape {list(e.shape)} overflows "
                                  f"the byte count")
        if e.end - e.begin != nbytes:
            raise CheckpointError(f"{file}: tensor '{e.name}' spans {e.end - e.begin} bytes but its shape "
                                  f"{list(e.shape)} and dtype need {nbytes}")
    if start > data_size:
        raise CheckpointError(f"{file}: truncated: its tensors need {start} bytes of data but the file "
                              f"holds {data_size}")
    if start < data_size:
        raise CheckpointError(f"{file}: malformed: {data_size - start} bytes after the last tensor's "
                              f"data (safetensors requires the tensors to cover the file exactly)")
    return [e for e, _ in sized]
