"""What a model argument names, decided from its text and the file system alone (no torch): a
``BASE+ADAPTER`` pair, a PEFT adapter directory, or else a model path or Hub id (merge/hub.py)."""

from __future__ import annotations

import os
from pathlib import Path

from cpift.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"


def split_lora_ref(ref: str | os.PathLike) -> tuple[str, str] | None:
    """``(base, adapter)`` for ``BASE+ADAPTER`` (an existing path with a ``+`` in it stays a path)."""
    text = os.fspath(ref)
    if "+" not in text or os.path.exists(text):
        return None
    parts = text.split("+")
    if len(parts) != 2 or not all(parts):
        raise CheckpointError(f"{text}: expected BASE+ADAPTER with exactly one '+'")
    return parts[0], parts[1]


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A PEFT adapter directory: adapter_config.json and no model weights of its own."""
    p = Path(path)
    return (p.is_dir() and (p / ADAPTER_CONFIG).is_file()
            and not any((p / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")))
