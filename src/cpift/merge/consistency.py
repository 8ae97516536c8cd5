"""One rule for what may be merged together, checked at one place (``check_compatible`` in engine.py,
which every merge and ``cores`` run before anything is written):

- the same architecture: where two inputs' config.json both name ``model_type`` / ``architectures``,
  they agree (a Llama and a Mistral with identical tensor names would otherwise merge silently, with
  the first one's config);
- non-floating tensors (integer and bool buffers, which cpift copies rather than merges) hold the same
  dtype and the same values in every input, so copying the first one's loses nothing;
- a tensor is floating-point in every input or in none (an integer tensor is not merged with a float).

Floating-point dtypes may differ (bf16 beside fp32): they are read in the merge's float32 math, with a
note (``cast_notes``). Each breach is a MismatchError naming the tensor or the config.json files; ``allow_crimes`` (the
CLI's ``--allow-crimes``, mergekit's flag) turns them into notes and the merge goes on, copying the
first input's non-floating tensors as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from cpift.errors import MismatchError
from cpift.merge.io.safe_parse import load_json_bounded
from cpift.merge.io.st_header import DTYPE_NAMES

ARCH_KEYS = ("model_type", "architectures")
FLAG = "pass --allow-crimes to merge anyway"


def leaves(model: Any) -> list[Any]:
    """The checkpoints behind an opened model: a layer view's sources (mergekit slices), else itself."""
    sources = getattr(model, "sources", None)
    return list(sources()) if callable(sources) else [model]


def _identity(model: Any) -> tuple[Path, dict] | None:
    """(config.json, its model_type / architectures) of a checkpoint's directory, if it has them."""
    file = Path(model.dir) / "config.json"
    if not file.is_file():
        return None
    conf = load_json_bounded(file.read_bytes(), source=file, error=MismatchError)
    if not isinstance(conf, dict):
        return None
    return file, {k: conf[k] for k in ARCH_KEYS if conf.get(k) is not None}


def _architecture_breaches(models: Sequence[Any]) -> list[str]:
    known = [i for m in models for leaf in leaves(m) if (i := _identity(leaf)) is not None]
    out = []
    for file, ident in known[1:]:
        first, want = known[0]
        for key in ARCH_KEYS:
            if key in ident and key in want and ident[key] != want[key] and file != first:
                out.append(f"{file}: {key} {ident[key]!r}, but {first} has {want[key]!r}: these are different "
                           f"architectures")
                break
    return out


def cast_notes(models: Sequence[Any]) -> list[str]:
    """One note per (input, dtype pair) whose floating-point dtype differs from the first input's."""
    first, notes, seen = models[0], [], set()
    for other in models[1:]:
        for name, info in first.tensors.items():
            o = other.tensors[name]
            floats = o.dtype.is_floating_point and info.dtype.is_floating_point
            if floats and o.dtype != info.dtype and (info.dtype, o.dtype, other.path) not in seen:
                seen.add((info.dtype, o.dtype, other.path))
                notes.append(f"note: {other.path} stores {DTYPE_NAMES[o.dtype]} where {first.path} stores "
                             f"{DTYPE_NAMES[info.dtype]} (e.g. '{name}'); both are read as float32 for the math")
    return notes


def _tensor_breaches(models: Sequence[Any]) -> list[str]:
    first = models[0]
    out = []
    for name, info in first.tensors.items():
        others = [(m, m.tensors[name]) for m in models[1:]]
        for m, o in others:
            if o.dtype.is_floating_point != info.dtype.is_floating_point:
                kinds = [("floating-point" if d.is_floating_point else "non-floating") for d in (info.dtype, o.dtype)]
                out.append(f"tensor '{name}': {info.dtype} ({kinds[0]}) in {first.path} but {o.dtype} ({kinds[1]}) "
                           f"in {m.path}; an integer tensor is not merged with a float")
                break
        else:
            if info.dtype.is_floating_point:
                continue
            ref = first.get(name)
            for m, o in others:
                if o.dtype != info.dtype or not torch.equal(m.get(name), ref):
                    out.append(f"tensor '{name}' ({info.dtype}, not merged but copied) differs between "
                               f"{first.path} and {m.path}" + (f" ({o.dtype})" if o.dtype != info.dtype else ""))
                    break
    return out


def check_consistency(models: Sequence[Any], *, allow_crimes: bool = False) -> list[str]:
    """Apply the module's rule; return notes (each allowed breach), or raise on the first breach.

    Raises:
        MismatchError: different architectures, a tensor floating in one input and not in another, or a
            non-floating tensor that differs between inputs (unless ``allow_crimes``).
    """
    breaches = _architecture_breaches(models) + _tensor_breaches(models)
    if breaches and not allow_crimes:
        raise MismatchError(f"{breaches[0]} ({FLAG})")
    return cast_notes(models) + [f"note: {b}; merged anyway (--allow-crimes): the first input's non-floating "
                                 f"tensors are copied" for b in breaches]
