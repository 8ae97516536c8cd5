"""The method registry: one MethodSpec per merge method, read by everything that lists methods.

The ``cpift-merge`` command of each method (cli/merge_cli.py), YAML planning (merge/mergekit/),
the model card's definition and recipe (merge/card.py), step recipes and the bench
(merge/tools/bench_cases.py) derive from ``METHODS``; none of them names a method itself. Adding a
method is one file in merge/methods/ named after it: a per-tensor function built from kernels/ and its
``@method`` declaration (declare.py), listed in ``DECLARED`` below; merge/methods/runner.py runs it.
This module is plain data, loaded on first use: the registry imports no kernel (nor torch).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .inputs import Inputs

# What a parameter's value is on the command line.
KINDS = ("number", "integer", "per_model", "number_or_per_model", "flag", "seed")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method.

    ``name`` is the function's keyword, ``cli`` its option, ``kind`` one of KINDS (``per_model``: a
    comma-separated list, one value per model; ``number_or_per_model``: one value or such a list).
    ``lo``/``hi`` bound it (``lo_open``: lo excluded). ``mergekit``: the key of a mergekit config
    that sets it, and ``mergekit_default`` mergekit's default (None: required there). ``optional``: None
    is a value (not given: the function gets None). ``unit``: what an integer counts, named in its error
    ("expected a whole number of iterations"), which the method then gives for the command line too.
    ``label``: its name in error messages, the card and the recipe when that is not ``name`` (``lam``: lambda).
    """

    name: str
    cli: str
    kind: str
    default: Any
    help: str
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    mergekit: str | None = None
    mergekit_default: Any = None
    missing: str = ""  # what to say when a parameter without a default is not given
    optional: bool = False
    unit: str = ""
    label: str = ""

    @property
    def key(self) -> str:
        return self.label or self.name

    @property
    def per_model(self) -> bool:
        return self.kind in ("per_model", "number_or_per_model")


@dataclass(frozen=True)
class MergekitSpec:
    """How a mergekit config of this method maps onto the cpift function: the keys mergekit 0.1.5
    accepts per model (``inputs``) and for the whole merge (``shared``; ``int8_mask`` always, it
    never changes float results), mergekit's default of ``normalize``/``rescale`` and what the cpift
    function computes (None: the setting does not apply)."""

    inputs: tuple[str, ...]
    shared: tuple[str, ...]
    normalize: bool | None
    cpift_normalize: bool | None
    rescale: bool | None = None
    cpift_rescale: bool | None = None


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: ``name`` (Python and mergekit), ``cli`` (command), where its function lives,
    what it merges (``inputs``), parameters, one-line definition and source."""

    name: str
    cli: str
    module: str
    inputs: Inputs
    params: tuple[ParamSpec, ...]
    definition: str
    paper: str
    summary: str
    mergekit: MergekitSpec | None = None
    bench: dict[str, str] = field(default_factory=dict)  # CLI option -> value for a bench run
    # A declared method (merge/methods/declare.py): its per-tensor function and cross-parameter check;
    # its public function is then built by merge/methods/runner.py.
    tensor: Callable[..., None] | None = None
    check: Callable[..., None] | None = None
    notes: Callable[..., list[str]] | None = None  # the notes a merge prints, from its parameters
    # settings: true/false keywords only a mergekit config (or Python) sets, no command-line option
    # (the delta family's normalize, rescale); prepare: a whole-model pass before streaming
    # (merge/methods/declare.py)
    settings: tuple[ParamSpec, ...] = ()
    prepare: Callable[..., Any] | None = None

    @property
    def native(self) -> tuple[str, ...]:
        """The mergekit settings the function takes as keywords (merge/mergekit/plan.py passes them on)."""
        return tuple(p.name for p in self.settings)

    @property
    def keywords(self) -> tuple[ParamSpec, ...]:
        """Every keyword of the method's function: its parameters, then its settings."""
        return (*self.params, *self.settings)

    @property
    def function(self) -> Callable[..., Any]:
        if self.tensor is not None:
            return importlib.import_module("cpift.merge.methods.runner").public(self)
        return getattr(importlib.import_module(self.module), self.name)

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method (its name and command must be new)."""
    if spec.name in METHODS or any(s.cli == spec.cli for s in METHODS.values()):
        raise ValueError(f"method '{spec.name}' (command '{spec.cli}') is already registered")
    if any(p.kind not in KINDS for p in spec.params):
        raise ValueError(f"method '{spec.name}': parameter kinds must be among {', '.join(KINDS)}")
    METHODS[spec.name] = spec
    return spec


def by_cli(command: str) -> MethodSpec | None:
    return next((s for s in METHODS.values() if s.cli == command), None)


def mergekit_methods() -> tuple[str, ...]:
    return tuple(name for name, s in METHODS.items() if s.mergekit is not None)


def delta_methods() -> tuple[str, ...]:
    return tuple(name for name, s in METHODS.items() if s.inputs.requires_base)


def mergekit_flags() -> tuple[str, ...]:
    """The mergekit keys of the methods' true/false parameters (``filter_wise``)."""
    return tuple(dict.fromkeys(p.mergekit for s in METHODS.values() for p in s.params
                               if p.kind == "flag" and p.mergekit))


WEIGHTS = ParamSpec("weights", "--weights", "per_model", None,
                    "Comma-separated weight per model{base} (default: all 1).",
                    mergekit="weight")
def declared_recipe(spec: MethodSpec, params: Mapping[str, Any], refs: list[str], *, base: bool) -> dict[str, Any]:
    """The mergekit config of a merge by a declared method (merge/card.py writes it as the recipe):
    base_model if it has one (``base``: refs[0] is a base, required or optional), each model with its
    per-model parameters, the whole-merge parameters (those not given left out)."""
    def plain(p, v: Any) -> Any:
        return bool(v) if p.kind == "flag" else int(v) if p.kind in ("integer", "seed") else float(v)

    base_ref, models = spec.inputs.split_refs(refs, base_given=base)
    pair = spec.inputs.lists_base_model
    per = [p for p in spec.params if p.mergekit and p.per_model]
    values = {p.key: params[p.key] if isinstance(params[p.key], (list, tuple))
              else [1.0 if params[p.key] is None else params[p.key]] * len(models) for p in per}
    cfg: dict[str, Any] = {"base_model": base_ref} if base_ref is not None else {}
    cfg["models"] = [{"model": r, **({"parameters": {p.mergekit: plain(p, values[p.key][i]) for p in per}}
                                     if per and not (pair and i == 0) else {})} for i, r in enumerate(models)]
    whole = [p for p in spec.keywords if p.mergekit and not p.per_model]
    shared = {p.mergekit: plain(p, params[p.key]) for p in whole if params[p.key] is not None}
    return {**cfg, **({"parameters": shared} if whole else {})}


# Declared methods (merge/methods/declare.py), one file each, registered when imported.
DECLARED = ("slerp", "linear", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl", "consensus_ta", "consensus_ties",
            "nuslerp", "multislerp", "karcher", "model_stock", "passthrough", "delta")
for _module in DECLARED:
    importlib.import_module(f"cpift.merge.methods.{_module}")
