"""Core-mask files: one safetensors file per task, a packed-bit uint8 tensor per scored tensor (docs/cpi-ft.md).

A mask entry covers a block of B consecutive entries of the row-major flattened parameter:
granularity ``element`` (B = 1), ``row`` (B = the last dimension; a 1-D tensor is one row) or
``block:N`` (B = N; the last block of a tensor may be shorter). Entry i covers flat elements
[i·B, min((i+1)·B, numel)). The packed tensor holds ceil(numel / B) bits, bit j of byte i being
entry 8i + j (kernels/masks.py).

The header metadata (strings only, as safetensors requires) records:
  format       "cpift-core-mask/1"
  granularity  "element" | "row" | "block:N"
  p, k         the percentage and the number of selected entries over all scored tensors
  threshold    the k-th largest score (float32, as a decimal string), the tie rule's value
  base, task   identity of the two models ("path" and "sha256" of their index or config), JSON
  shapes       {tensor name: shape of the parameter}, JSON
  counts       {tensor name: selected entries}, JSON
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from cpift.errors import CheckpointError, MismatchError, ParameterError
from cpift.kernels.masks import packed_len, popcount, unpack_bits
from cpift.merge.io.safe_parse import load_json_bounded
from cpift.merge.io.writer import safetensors_header
from cpift.numbers import parse_number, shown

FORMAT = "cpift-core-mask/1"


def parse_granularity(value: str) -> str:
    """Normalise 'element' | 'row' | 'block:N' (N ≥ 1); raise ParameterError otherwise."""
    v = str(value).strip().lower()
    if v in ("element", "row"):
        return v
    if v.startswith("block:"):
        n = parse_number(v[6:], "granularity: block:N", integer=True, lo=1, hi=2**40, error=ParameterError,
                         what="an integer N ≥ 1")
        return f"block:{n}"
    raise ParameterError(f"granularity: expected element, row or block:N with N ≥ 1, got {shown(value)}")


def block_size(granularity: str, shape: tuple[int, ...] | list[int]) -> int:
    """Entries of the flattened tensor one mask bit covers."""
    g = parse_granularity(granularity)
    if g == "element":
        return 1
    if g == "row":
        return max(1, int(shape[-1])) if len(shape) else 1
    return int(g[6:])


def mask_entries(granularity: str, shape: tuple[int, ...] | list[int]) -> int:
    """Number of mask entries (bits) for a tensor of this shape."""
    numel = 1
    for d in shape:
        numel *= int(d)
    b = block_size(granularity, shape)
    return (numel + b - 1) // b


@dataclass
class CoreMask:
    """One task's core mask, loaded: packed bits per tensor plus the header metadata."""

    path: Path
    granularity: str
    p: float
    k: int
    threshold: float
    shapes: dict[str, tuple[int, ...]]
    counts: dict[str, int]
    base: dict
    task: dict
    packed: Mapping[str, torch.Tensor]  # read from the file on access when loaded lazily

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def entries(self, name: str) -> int:
        return mask_entries(self.granularity, self.shapes[name])

    def bits(self, name: str) -> torch.Tensor:
        """The mask entries of one tensor as a 1-D bool tensor (one per block)."""
        return unpack_bits(self.packed[name], self.entries(name), backend="torch")

    def element_mask(self, name: str) -> torch.Tensor:
        """A bool tensor shaped like the parameter: True on every element of a selected block."""
        shape = self.shapes[name]
        numel = 1
        for d in shape:
            numel *= d
        bits = self.bits(name)
        b = block_size(self.granularity, shape)
        flat = bits if b == 1 else bits.repeat_interleave(b)[:numel]
        return flat.reshape(shape)

    def check_matches(self, shapes: dict[str, tuple[int, ...]], model: str | os.PathLike) -> None:
        """Raise MismatchError unless every masked tensor exists in `shapes` with the same shape."""
        for name, shape in self.shapes.items():
            if name not in shapes:
                raise MismatchError(f"{self.path}: mask tensor '{name}' is not in {model}; "
                                    f"the mask was made for another model")
            if tuple(shapes[name]) != tuple(shape):
                raise MismatchError(f"{self.path}: mask tensor '{name}' has shape {list(shape)} but {model} "
                                    f"has {list(shapes[name])}; the mask was made for another model")


def save_core_mask(path: str | os.PathLike, packed: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                   *, granularity: str, p: float, k: int, threshold: float, counts: dict[str, int],
                   base: dict | None = None, task: dict | None = None) -> Path:
    """Write a mask file atomically (sibling temp file, then rename)."""
    path = Path(path)
    g = parse_granularity(granularity)
    for name, t in packed.items():
        want = packed_len(mask_entries(g, shapes[name]))
        if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != want:
            raise ValueError(f"save_core_mask: '{name}' must be uint8[{want}], got {t.dtype}{list(t.shape)}")
    meta = {
        "format": FORMAT, "granularity": g, "p": repr(float(p)), "k": str(int(k)),
        "threshold": repr(float(threshold)), "base": json.dumps(base or {}), "task": json.dumps(task or {}),
        "shapes": json.dumps({n: list(map(int, shapes[n])) for n in packed}),
        "counts": json.dumps({n: int(counts.get(n, 0)) for n in packed}),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    _write_safetensors(tmp, {n: packed[n] for n in sorted(packed)}, meta)
    os.replace(tmp, path)
    return path


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A uint8-only safetensors file with a canonical header (sorted keys, tensors in name order).

    safetensors' own writer orders the metadata by a randomly seeded hash map, so two runs would
    give different bytes; the header is merge/io/writer.py's, with its keys sorted.
    """
    head, _ = safetensors_header([(n, "U8", [t.numel()], t.numel()) for n, t in tensors.items()], metadata,
                                 sort_keys=True)
    with open(path, "wb") as f:
        f.write(head)
        for t in tensors.values():
            f.write(t.contiguous().cpu().numpy().tobytes())


class _LazyPacked(Mapping):
    """Packed tensors read one at a time from the (memory-mapped) file: streaming over masks."""

    def __init__(self, path: Path, names: list[str]):
        self.path, self.names = path, names

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.names:
            raise KeyError(name)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def load_core_mask(path: str | os.PathLike, *, lazy: bool = False) -> CoreMask:
    """Read and validate a mask file; CheckpointError names the file and what is wrong.

    lazy=True reads only the header; each packed tensor is read when accessed (its size is still
    checked here, from the header).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: mask file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not a cpift core mask (metadata format is "
                                      f"{meta.get('format')!r}, expected '{FORMAT}')")
            shapes = {n: tuple(s) for n, s in _meta_map(path, meta, "shapes", _is_shape).items()}
            if lazy:
                packed = _LazyPacked(path, list(f.keys()))
                sizes = {n: f.get_slice(n) for n in f.keys()}
            else:
                packed = sizes = {n: f.get_tensor(n) for n in f.keys()}
            kinds = {n: (str(t.get_dtype()) if lazy else t.dtype, list(t.get_shape()) if lazy else list(t.shape))
                     for n, t in sizes.items()}
            def num(key: str, **bounds):
                return parse_number(meta[key], f"{path}: metadata {key}", error=CheckpointError, **bounds)

            mask = CoreMask(path=path, granularity=parse_granularity(meta["granularity"]),
                            p=num("p", lo=0, lo_open=True, hi=100), k=num("k", integer=True, lo=0),
                            threshold=math.inf if meta["threshold"] == "inf" else num("threshold"),
                            shapes=shapes,
                            counts=_meta_map(path, meta, "counts", _is_count), base=_meta_map(path, meta, "base"),
                            task=_meta_map(path, meta, "task"), packed=packed)
    except CheckpointError:
        raise
    except (KeyError, ValueError, OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: malformed core mask ({type(e).__name__}: {e})") from None
    if set(packed) != set(shapes):
        raise CheckpointError(f"{path}: malformed core mask (tensors and 'shapes' metadata disagree)")
    for name, (dtype, shape) in kinds.items():
        want = packed_len(mask.entries(name))
        if dtype not in (torch.uint8, "U8") or shape != [want]:
            raise CheckpointError(f"{path}: mask tensor '{name}' should be uint8[{want}], got {dtype}{shape}")
    _check_counts(mask)
    return mask


def _is_shape(v: object) -> bool:
    return isinstance(v, list) and all(type(d) is int and d >= 0 for d in v)


def _is_count(v: object) -> bool:
    return type(v) is int and v >= 0


def _meta_map(path: Path, meta: dict, key: str, valid=None) -> dict:
    """A JSON object held in one metadata string (bounded parse), each value checked by ``valid``."""
    value = load_json_bounded(meta[key], source=f"{path}: metadata '{key}'", error=CheckpointError)
    if not isinstance(value, dict) or (valid is not None and not all(valid(v) for v in value.values())):
        raise CheckpointError(f"{path}: malformed core mask (metadata '{key}' is not the expected JSON object)")
    return value


def _check_counts(mask: CoreMask) -> None:
    """The recorded counts must be what the bits say: per tensor (popcount) and in total (k)."""
    if set(mask.counts) != set(mask.shapes):
        raise CheckpointError(f"{mask.path}: malformed core mask (metadata 'counts' and 'shapes' name "
                              f"different tensors)")
    for name in mask.names:
        bits = popcount(mask.packed[name])
        if bits != mask.counts[name]:
            raise CheckpointError(f"{mask.path}: mask tensor '{name}' has {bits} selected entries but its "
                                  f"recorded count is {mask.counts[name]}; the file is corrupt")
    if sum(mask.counts.values()) != mask.k:
        raise CheckpointError(f"{mask.path}: the per-tensor counts add up to {sum(mask.counts.values())} "
                              f"but k is {mask.k}; the file is corrupt")
