"""The merge methods, one file per family (average: linear; spherical: slerp; delta: task_arithmetic,
ties, dare_linear, dare_ties; sparse_delta: breadcrumbs, breadcrumbs_ties, della, della_linear; stock:
model_stock; layers: passthrough; hypersphere: nuslerp, multislerp, karcher; consensus: sce; swap: nearswap), all
listed in the registry (registry.py).
``cpift.merge.methods.ties`` etc. are the functions themselves, loaded on first use from the registry,
so importing the registry (as the card and the mergekit planner do) loads no method. (A family file
is never named like one of its functions: the submodule would shadow the function.)"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .registry import METHODS

__all__ = ["linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties", "model_stock", "breadcrumbs",
           "breadcrumbs_ties", "della", "della_linear", "passthrough",
           "nuslerp", "multislerp", "karcher", "sce", "nearswap"]

if TYPE_CHECKING:
    from .average import linear
    from .consensus import sce
    from .delta import dare_linear, dare_ties, task_arithmetic, ties
    from .hypersphere import karcher, multislerp, nuslerp
    from .layers import passthrough
    from .sparse_delta import breadcrumbs, breadcrumbs_ties, della, della_linear
    from .stock import model_stock
    from .spherical import slerp
    from .swap import nearswap


def __getattr__(name: str) -> Any:
    spec = METHODS.get(name)
    if spec is None:
        raise AttributeError(f"module 'cpift.merge.methods' has no attribute {name!r}")
    return spec.function
