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

# public name -> module that defines it; the merge methods come from their registry (cpift.merge.methods)
_FACADE = {
    "compute_cores": "cpift.merge.cpi.cores",
    "cluster_masks": "cpift.merge.cpi.cluster",
    "fuse": "cpift.merge.cpi.fuse",
    "pull": "cpift.merge.hub",
    "push": "cpift.merge.hub",
}
_METHODS = "cpift.merge.methods"

__all__ = ["__version__", *importlib.import_module(_METHODS).__all__, *_FACADE]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily (PEP 562)
    from cpift.merge.cpi.cluster import cluster_masks  # noqa: F401
    from cpift.merge.cpi.cores import compute_cores  # noqa: F401
    from cpift.merge.cpi.fuse import fuse  # noqa: F401
    from cpift.merge.hub import pull, push  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _FACADE.get(name) or (_METHODS if name in __all__ else None)
    if module is None:
        raise AttributeError(f"module 'cpift' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
