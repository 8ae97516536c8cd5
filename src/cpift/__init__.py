"""cpift: model merging and CPI-FT with a streaming tensor core.

The subpackages are the folders beside this file: ``kernels/`` (the tensor core), ``merge/``,
``training/`` and ``cli/``. They live under ``src/cpift/``, never at the repository root, so that
``python -m ...`` run from a clone cannot import one of them in place of another distribution of the
same bare name (Hugging Face's ``kernels``, which transformers imports).

The names below are the public facade: the typed functions behind every command, imported on first
use (``import cpift`` itself loads neither torch nor triton). Example::

    import cpift
    result = cpift.ties("base", ["math", "code"], "merged", density=0.3)
    print(result.summary())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_FACADE = {
    "linear": "cpift.merge.methods.average",
    "slerp": "cpift.merge.methods.spherical",
    "task_arithmetic": "cpift.merge.methods.delta",
    "ties": "cpift.merge.methods.delta",
    "dare_linear": "cpift.merge.methods.delta",
    "dare_ties": "cpift.merge.methods.delta",
    "model_stock": "cpift.merge.methods.stock",
    "breadcrumbs": "cpift.merge.methods.sparse_delta",
    "breadcrumbs_ties": "cpift.merge.methods.sparse_delta",
    "della": "cpift.merge.methods.sparse_delta",
    "della_linear": "cpift.merge.methods.sparse_delta",
    "passthrough": "cpift.merge.methods.layers",
    "nuslerp": "cpift.merge.methods.hypersphere",
    "multislerp": "cpift.merge.methods.hypersphere",
    "karcher": "cpift.merge.methods.hypersphere",
    "sce": "cpift.merge.methods.consensus",
    "nearswap": "cpift.merge.methods.swap",
    "compute_cores": "cpift.merge.cpi.cores",
    "cluster_masks": "cpift.merge.cpi.cluster",
    "fuse": "cpift.merge.cpi.fuse",
    "pull": "cpift.merge.hub",
    "push": "cpift.merge.hub",
}

__all__ = ["__version__", *_FACADE]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily (PEP 562)
    from cpift.merge.cpi.cluster import cluster_masks
    from cpift.merge.cpi.cores import compute_cores
    from cpift.merge.cpi.fuse import fuse
    from cpift.merge.hub import pull, push
    from cpift.merge.methods.average import linear
    from cpift.merge.methods.consensus import sce
    from cpift.merge.methods.delta import dare_linear, dare_ties, task_arithmetic, ties
    from cpift.merge.methods.hypersphere import karcher, multislerp, nuslerp
    from cpift.merge.methods.layers import passthrough
    from cpift.merge.methods.sparse_delta import breadcrumbs, breadcrumbs_ties, della, della_linear
    from cpift.merge.methods.stock import model_stock
    from cpift.merge.methods.spherical import slerp
    from cpift.merge.methods.swap import nearswap


def __getattr__(name: str) -> Any:
    module = _FACADE.get(name)
    if module is None:
        raise AttributeError(f"module 'cpift' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
