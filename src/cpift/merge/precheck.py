"""The checks that refuse bad input before torch is imported, so a refusal costs a fraction of a second.

A merge command runs ``precheck`` first: the model arguments that are local paths are opened with
their safetensors headers parsed and validated without torch (``Checkpoint(typed=False)``), the
method's numeric parameters are range-checked against their declaration (merge/methods/registry.py),
``--max-shard-size`` is parsed, and the models must hold the same tensors with the same shapes. Each
check is the one the merge itself runs later (same function, same message), so the precheck refuses
nothing the merge would accept. What needs torch or the network (Hub ids, LoRA adapters, ``.bin``
shards, dtypes, the architecture check) is left to the merge.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Sequence

from cpift.merge.hub import is_hub_ref
from cpift.merge.io.checkpoint import Checkpoint, check_same_tensors
from cpift.merge.io.refs import is_adapter_dir, split_lora_ref
from cpift.merge.io.sizes import parse_size
from cpift.merge.methods.params import value
from cpift.merge.methods.registry import DECLARED, MethodSpec

# The click arguments that hold model references, in the order the methods open them.
MODEL_ARGUMENTS = ("model_a", "model_b", "model", "base", "models")


def model_refs(args: Iterable[Any]) -> list[str]:
    """The model references among a method's positional arguments (paths, or lists of them), in order."""
    refs: list[str] = []
    for v in args:
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(x, (str, os.PathLike)):
                refs.append(os.fspath(x))
    return refs


def _is_local(ref: str) -> bool:
    """A plain model path (or a missing one, which the reader names): not a Hub id, adapter or BASE+ADAPTER."""
    return split_lora_ref(ref) is None and not is_hub_ref(ref) and not is_adapter_dir(ref)


def open_headers(refs: Iterable[str]) -> list[Checkpoint] | None:
    """Open each local model argument's headers (no torch); None when any argument is not plain local
    safetensors of the dtypes the merge reads as stored (its checks are then the merge's: fp8 tensors
    are read dequantised, their scales hidden, merge/io/fp8.py)."""
    out = []
    for ref in refs:
        if not _is_local(ref):
            return None
        ckpt = Checkpoint(ref, typed=False)
        if not ckpt.complete or any(i.dtype.startswith("F8_") for i in ckpt.tensors.values()):
            return None
        out.append(ckpt)
    return out


def check_params(spec: MethodSpec, given: dict[str, Any]) -> None:
    """Range-check the method's numeric parameters given as numbers or lists of numbers (per model).

    Only parameters with a declared finite bound are checked (tests/merge/test_precheck.py holds the
    methods to their declarations); the others are the method's to check, in its words.
    """
    for p in spec.params:
        v = given.get(p.name)
        bounded = math.isfinite(p.lo) or math.isfinite(p.hi)
        if bounded and p.kind in ("number", "per_model", "number_or_per_model") and v is not None:
            many = isinstance(v, (list, tuple))
            for i, x in enumerate(v if many else [v]):
                # Named as the method names it: a declared method (runner.py) says which entry of a list.
                field = f"{p.name}[{i}]" if many and spec.name in DECLARED else p.name
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    value(x, "<none>", field, lo=p.lo, hi=p.hi, lo_open=p.lo_open)


def check_models(refs: Sequence[str]) -> None:
    """Open the models' headers and compare their tensors, where every model is local safetensors.

    Raises:
        CheckpointError, MismatchError: as the merge would raise them.
    """
    models = open_headers(refs)
    if models and len(models) > 1:
        check_same_tensors(models)


def precheck(spec: MethodSpec | None, given: dict[str, Any], *, max_shard_size: int | str = "5GB") -> None:
    """Refuse what can be refused without torch: unreadable model headers, parameters out of range, a
    bad shard size, models whose tensors differ. Returns None when nothing was found wrong.

    Raises:
        CpiftError: the first problem, as the merge would report it.
    """
    refs = model_refs(given.get(key) for key in MODEL_ARGUMENTS) if spec is not None else []
    models = open_headers(refs)
    if spec is not None:
        check_params(spec, given)
    parse_size(max_shard_size)
    if models and len(models) > 1:
        check_same_tensors(models)
