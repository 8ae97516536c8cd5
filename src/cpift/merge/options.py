"""The options every merge takes (the CLI's common options), typed: ``MergeOptions``, keyword-only.

Every merge function (the methods, ``fuse``) takes them as keywords, ``ties(..., dry_run=True,
device="cuda")``, or as one ``options=MergeOptions(...)`` (keywords given beside it win);
``merge_options`` checks their names, so a misspelt option is a one-line ParameterError instead of a
silently ignored keyword. ``stream_merge`` (merge/engine.py) receives them field by field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping

from cpift.errors import ParameterError


@dataclass(frozen=True, kw_only=True)
class MergeOptions:
    """How a merge reads, computes and writes; see ``stream_merge`` for each field.

    Example:
        >>> plan = ties("base", ["a", "b"], "out", density=0.3, options=MergeOptions(dry_run=True))
    """

    dtype: Any = None  # str or torch.dtype: cast the inputs for the math
    out_dtype: Any = None  # str or torch.dtype of the output tensors
    max_shard_size: int | str = "5GB"
    overwrite: bool = False
    allow_nonfinite: bool = False
    allow_crimes: bool = False  # merge different architectures / disagreeing integer tensors (consistency.py)
    copy_tokenizer_from: str | os.PathLike | None = None
    progress: bool = True
    backend: str | None = None
    device: Any = None  # str or torch.device: where the math runs
    dry_run: bool = False
    resume: bool = False
    inputs: tuple[str | os.PathLike, ...] = ()  # files read besides the models (-o may not hold them)
    recipe: Mapping[str, Any] | None = None  # the config that asked for this merge, recorded as is
    config_updates: Mapping[str, Any] | None = None  # keys set in the output config.json (num_hidden_layers)

    def replace(self, **changes: Any) -> MergeOptions:
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> dict[str, Any]:
        """The fields as keywords of ``stream_merge``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


FIELDS = tuple(f.name for f in dataclasses.fields(MergeOptions))


def merge_options(options: MergeOptions | None = None, overrides: Mapping[str, Any] | None = None) -> MergeOptions:
    """``options`` (default: all defaults) with the keywords in ``overrides`` replacing its fields.

    Raises:
        ParameterError: a keyword that is no merge option (the message lists them).
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ParameterError(f"{unknown[0]}: not an option of a merge (options: {', '.join(FIELDS)})")
    if "inputs" in overrides:
        overrides["inputs"] = tuple(overrides["inputs"] or ())
    return (options or MergeOptions()).replace(**overrides)
