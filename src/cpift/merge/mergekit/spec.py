"""The validated form of a mergekit config (config.py builds it; plan.py and run.py read it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cpift.merge.mergekit.stack import StackSlice
from cpift.merge.mergekit.values import Setting


@dataclass(frozen=True)
class ModelSpec:
    """One input model as the config lists it: the reference as written and its own parameters."""

    model: str
    parameters: Mapping[str, Setting]
    field: str  # "models[1]" or "slices[0].sources[1]", for messages


@dataclass(frozen=True)
class MergeSlice:
    """One slice of a merging ``slices:`` config (merge/mergekit/slices.py): its sources (each with its
    ``layer_range``, all of one length), its own base_model and parameters."""

    sources: tuple[ModelSpec, ...]
    ranges: tuple[tuple[int, int], ...]
    base_model: str | None
    parameters: Mapping[str, Setting]
    field: str  # "slices[1]"

    @property
    def length(self) -> int:
        return self.ranges[0][1] - self.ranges[0][0]


@dataclass(frozen=True)
class MergeConfig:
    """A validated mergekit config.

    ``models`` keeps the listed order (base_model too, if listed; with several ``slices``, every model
    they name, once). ``parameters``: the top-level ones, ``slice_parameters``: a single slice's; model
    references as written (``run_config`` resolves them).
    """

    method: str
    models: tuple[ModelSpec, ...]
    base_model: str | None
    parameters: Mapping[str, Setting]
    dtype: str | None
    out_dtype: str | None
    source: Path
    slice_parameters: Mapping[str, Setting] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None  # slices form: the first source's [start, end)
    tokenizer_source: str | None = None  # None, "base" or a model reference
    name: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)
    cpift: Mapping[str, Any] = field(default_factory=dict)  # values.parse_cpift_block
    stack: tuple[StackSlice, ...] = ()  # passthrough slices (merge/mergekit/stack.py)
    slices: tuple[MergeSlice, ...] = ()  # slices merged by the method (merge/mergekit/slices.py)


def first_setting(spec: ModelSpec | None, key: str, slice_params: Mapping, params: Mapping) -> Setting | None:
    for scope in ((spec.parameters if spec else {}), slice_params, params):
        if key in scope:
            return scope[key]
    return None
