"""The merge methods: each declared (declare.py) in one file named after it, or after its family (delta:
task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear); the
runner is runner.py, and the registry (registry.py) lists them.
``cpift.merge.methods.ties`` etc. are the functions themselves, loaded on first use from the registry,
so importing the registry (as the card and the mergekit planner do) loads no method (a declared method's
file imports its kernels only when it runs). A family file is never named like one of its functions."""

from __future__ import annotations

from typing import Any

from .registry import DECLARED, METHODS

__all__ = list(METHODS)

# A declared method's file is named after it: importing it (the registry does) bound the submodule here,
# which would shadow the function; unbound, the name goes to __getattr__ and so to the function.
for _module in DECLARED:
    if _module in METHODS:
        globals().pop(_module, None)


def __getattr__(name: str) -> Any:
    spec = METHODS.get(name)
    if spec is None:
        raise AttributeError(f"module 'cpift.merge.methods' has no attribute {name!r}")
    return spec.function
