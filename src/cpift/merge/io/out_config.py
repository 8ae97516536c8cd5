"""The output's config.json says the dtype its tensors are stored in.

The writer copies config.json from the first model (or the tokenizer donor); when ``--out-dtype`` /
``--dtype`` casts the tensors, the copy would still name the input's dtype, and transformers would
load the model in it. transformers 5 writes and reads the key ``dtype`` (``torch_dtype`` is still
read, as the older name); both are set to the stored dtype, ``dtype`` always, ``torch_dtype`` where
the input had it (older readers look only there).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from cpift.errors import CheckpointError

CONFIG_NAME = "config.json"


def config_with_dtype(source_dir: str | Path, raw: bytes | None, dtype: torch.dtype | None,
                      updates: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``{"config.json": text}`` with the stored dtype set, or ``{}`` when there is nothing to change.

    Args:
        source_dir: the directory config.json is copied from (named in errors).
        raw: its bytes, as merge/io/model_files.py read them (None: it has none).
        dtype: the dtype every floating-point output tensor is stored in; None keeps each input's.
        updates: other keys to set (a layer stack's ``num_hidden_layers``); None removes the key (an
            fp8 input's ``quantization_config``, merge/io/fp8.py).

    Raises:
        CheckpointError: config.json is not a JSON object (so its dtype cannot be set).
    """
    path = Path(source_dir) / CONFIG_NAME
    if (dtype is None and not updates) or raw is None:
        return {}
    try:
        cfg = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read it to set its dtype to {dtype} ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, so its dtype can be set to {dtype}")
    new = dict(updates or {})
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        new.update({k: name for k in ["dtype", *(["torch_dtype"] if "torch_dtype" in cfg else [])]})
    if all(cfg.get(k) == v for k, v in new.items()):
        return {}
    cfg.update({k: v for k, v in new.items() if v is not None})
    for k in [k for k, v in new.items() if v is None]:
        cfg.pop(k, None)
    return {CONFIG_NAME: json.dumps(cfg, indent=2, sort_keys=True) + "\n"}
