"""Training: SFT with exact core freezing (data, freeze, sft, evaluate) and the CPI-FT pipeline.

Import the modules themselves (``from cpift.training.sft import sft``): this package imports
nothing heavy, so the CLI starts without loading transformers. ``freeze_cores`` (any training
loop) and ``CoreFreezeCallback`` (transformers' Trainer, TRL) are exported here, loaded on first use.
"""

from __future__ import annotations

_LAZY = {"freeze_cores": "freeze", "Freezer": "freeze", "CoreFreezeCallback": "callback"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'cpift.training' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
