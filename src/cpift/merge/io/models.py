"""A step's input models: open them, check they fit together, list the paths they read, and name the
input entry behind a non-finite result."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from cpift.kernels.finite import first_nonfinite
from cpift.merge.consistency import check_consistency
from cpift.merge.io.checkpoint import Checkpoint, check_same_tensors


def open_models(paths: Sequence[str | os.PathLike | Checkpoint]) -> list[Checkpoint]:
    """Open every model argument (an open Checkpoint, e.g. a stacked layer view, is used as is); a Hub id
    (``org/name[@rev]``) that is no local path is pulled first; ``BASE+ADAPTER`` or a PEFT adapter
    directory is read with the LoRA merged in (merge/io/lora.py)."""
    from cpift.merge.io.lora import open_model

    return [p if isinstance(p, Checkpoint) else open_model(p) for p in paths]


def check_compatible(models: list[Checkpoint], *, allow_crimes: bool = False) -> list[str]:
    """Every model must hold the same tensor names with the same shapes, and be consistent by
    merge/consistency.py's rule (architecture, dtypes; ``allow_crimes``: notes instead); return its notes."""
    check_same_tensors(models)
    return check_consistency(models, allow_crimes=allow_crimes)


def model_paths(models: Sequence[Checkpoint]) -> list[Path]:
    """Every path a merge reads of its models: each directory and shard file (a Hub snapshot's blobs too)."""
    return [p for m in models for p in m.input_paths()]


def explain_nonfinite(models: Sequence[Checkpoint], names: Sequence[str],
                      views: Sequence[torch.Tensor] | None = None) -> str | None:
    """The first input entry among ``names`` that is NaN or Inf, as a message naming tensor, file and flat
    index; None when every input is finite (the result overflowed). ``views``: the flat tensors of the one
    name already read, one per model (else each is read again: the rare path, a second look)."""
    for name in names:
        for i, m in enumerate(models):
            v = views[i] if views is not None else m.get(name).reshape(-1)
            bad = first_nonfinite(v)
            if bad is not None:
                return f"tensor '{name}' in {m.path} holds a non-finite value ({v[bad].item()}) at flat index {bad}"
    return None
