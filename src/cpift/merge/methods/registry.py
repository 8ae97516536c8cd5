"""The method registry: one MethodSpec per merge method, read by everything that lists methods.

The ``cpift-merge`` command of each method (cli/merge_cli.py), YAML planning (merge/mergekit/),
the model card's definition and recipe (merge/card.py), step recipes and the bench
(merge/tools/bench_cases.py) derive from ``METHODS``; none of them names a method itself. Adding a
method is one file in merge/methods/ named after it: a per-tensor function built from kernels/ and its
``@method`` declaration (declare.py), listed in ``DECLARED`` below; merge/methods/runner.py runs it.
The methods not yet declared that way register a MethodSpec here that names their whole-model function
by module and attribute. This module is plain data, loaded on first use: the registry imports no
kernel (nor torch).
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
    native: tuple[str, ...] = ()  # mergekit settings the function takes as keywords (normalize)
    bench: dict[str, str] = field(default_factory=dict)  # CLI option -> value for a bench run
    # A declared method (merge/methods/declare.py): its per-tensor function and cross-parameter check;
    # its public function is then built by merge/methods/runner.py.
    tensor: Callable[..., None] | None = None
    check: Callable[..., None] | None = None
    notes: Callable[..., list[str]] | None = None  # the notes a merge prints, from its parameters

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
LAMBDA = ParamSpec("lam", "--lambda", "number", 1.0, "Scale λ of the combined delta added to the base.",
                   mergekit="lambda", mergekit_default=1.0)
SEED = ParamSpec("seed", "--seed", "seed", 0, "Seed of the drop mask; the same seed gives byte-identical output.")


def _density(default: float, text: str) -> ParamSpec:
    return ParamSpec("density", "--density", "number_or_per_model", default,
                     text + " One value, or comma-separated per model, each in (0, 1].",
                     lo=0.0, hi=1.0, lo_open=True, mergekit="density", mergekit_default=1.0)


_DELTA_INPUTS = ("weight", "density")  # mergekit reads density for task_arithmetic too (and ignores it)
_DELTA_SHARED = ("lambda", "normalize", "rescale", "int8_mask")
_DROP = "drop each delta entry with probability 1 − density, rescale by 1/density, then "
_DARE = "Yu et al. 2024, Language Models are Super Mario (arXiv:2311.03099)"
_TIES = "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)"

register(MethodSpec(
    "task_arithmetic", "task-arithmetic", "cpift.merge.methods.delta", Inputs("required"), (WEIGHTS, LAMBDA),
    "b + λ Σ w_i (x_i − b)", "Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)",
    "b + λ Σ w_i (x_i − b).",
    MergekitSpec(_DELTA_INPUTS, _DELTA_SHARED, normalize=False, cpift_normalize=False, rescale=False,
                 cpift_rescale=None)))
register(MethodSpec(
    "ties", "ties", "cpift.merge.methods.delta", Inputs("required"),
    (WEIGHTS, LAMBDA, _density(1.0, "Share of each delta kept by magnitude (k = floor(density × numel))."),
     ParamSpec("global_trim", "--global-trim", "flag", False,
               "Trim with one magnitude threshold over the whole model (TIES paper) instead of per tensor.")),
    "trim each delta to its largest-magnitude share (density), elect a sign per entry, "
    "combine the agreeing deltas", _TIES,
    "TIES: trim deltas by magnitude, elect a sign per entry, average the agreeing deltas.",
    MergekitSpec(_DELTA_INPUTS, _DELTA_SHARED, normalize=True, cpift_normalize=True, rescale=False,
                 cpift_rescale=False),
    native=("normalize", "rescale"), bench={"--density": "0.3"}))


def _dare(name: str, then: str, *, cpift_normalize: bool, native: tuple[str, ...]) -> MethodSpec:
    """DARE drop-and-rescale followed by ``then`` (task arithmetic or TIES sign election)."""
    density = _density(0.5, "Probability of keeping each delta entry (kept entries are scaled by 1/density).")
    return MethodSpec(name, name.replace("_", "-"), "cpift.merge.methods.delta", Inputs("required"),
                      (WEIGHTS, LAMBDA, density, SEED), _DROP + then, _DARE, f"DARE drop-and-rescale, then {then}.",
                      MergekitSpec(_DELTA_INPUTS, _DELTA_SHARED, normalize=False, cpift_normalize=cpift_normalize,
                                   rescale=True, cpift_rescale=True),
                      native=native, bench={"--density": "0.5"})


register(_dare("dare_linear", "task arithmetic", cpift_normalize=False, native=()))
register(_dare("dare_ties", "TIES sign election", cpift_normalize=True, native=("normalize",)))
def _sparse(name: str, extra: ParamSpec, density: float, definition: str, paper: str, summary: str, *,
            normalize: bool, rescale: bool, seed: bool) -> MethodSpec:
    """mergekit's breadcrumbs / della family (merge/methods/sparse_delta.py): normalize and rescale are
    the function's keywords, set from a config (mergekit's defaults otherwise)."""
    dens = _density(density, "Share of each delta kept.")
    return MethodSpec(name, name.replace("_", "-"), "cpift.merge.methods.sparse_delta", Inputs("required"),
                      (WEIGHTS, LAMBDA, dens, extra, *((SEED,) if seed else ())), definition, paper, summary,
                      MergekitSpec((*_DELTA_INPUTS, extra.mergekit), _DELTA_SHARED, normalize=normalize,
                                   cpift_normalize=normalize, rescale=rescale, cpift_rescale=rescale),
                      native=("normalize", "rescale"), bench={"--density": "0.5"})


_GAMMA = ParamSpec("gamma", "--gamma", "number_or_per_model", 0.01,
                   "Share of each delta's largest-magnitude entries dropped, in [0, 1].",
                   lo=0.0, hi=1.0, mergekit="gamma", mergekit_default=0.01)
_EPSILON = ParamSpec("epsilon", "--epsilon", "number_or_per_model", 0.15,
                     "Spread of the keep probability over a row's magnitude ranks: density ± epsilon, in (0, 1).",
                     mergekit="epsilon", mergekit_default=0.15)
_CRUMBS = "Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795)"
_DELLA = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"
_BAND = "keep each delta's entries ranked between its smallest and its largest gamma share by |δ| (density kept), then "
_MAGPRUNE = ("keep each row's entries with probability density − ε + 2ε·rank/(C − 1) by |δ| rank (seeded), "
             "rescale to the delta's L1 norm, then ")
register(_sparse("breadcrumbs", _GAMMA, 0.9, _BAND + "task arithmetic", _CRUMBS,
                 "Breadcrumbs: drop the smallest and the largest deltas, then task arithmetic.",
                 normalize=False, rescale=False, seed=False))
register(_sparse("breadcrumbs_ties", _GAMMA, 0.9, _BAND + "TIES sign election", _CRUMBS,
                 "Breadcrumbs' sparsification, then TIES sign election.", normalize=False, rescale=False, seed=False))
register(_sparse("della", _EPSILON, 0.5, _MAGPRUNE + "TIES sign election and disjoint mean", _DELLA,
                 "DELLA: magnitude-ranked random drops, L1 rescale, TIES sign election.",
                 normalize=True, rescale=True, seed=True))
register(_sparse("della_linear", _EPSILON, 0.5, _MAGPRUNE + "task arithmetic", _DELLA,
                 "DELLA's drops and rescale, then task arithmetic.", normalize=False, rescale=True, seed=True))


def declared_recipe(spec: MethodSpec, params: Mapping[str, Any], refs: list[str], *, base: bool) -> dict[str, Any]:
    """The mergekit config of a merge by a declared method (merge/card.py writes it as the recipe):
    base_model if it has one (``base``: refs[0] is a base, required or optional), each model with its
    per-model parameters, the whole-merge parameters (those not given left out)."""
    def plain(p, v: Any) -> Any:
        return bool(v) if p.kind == "flag" else int(v) if p.kind in ("integer", "seed") else float(v)

    base_ref, models = spec.inputs.split_refs(refs, base_given=base)
    pair = spec.inputs.lists_base_model
    per = [p for p in spec.params if p.mergekit and p.per_model]
    values = {p.name: params[p.name] if isinstance(params[p.name], (list, tuple))
              else [1.0 if params[p.name] is None else params[p.name]] * len(models) for p in per}
    cfg: dict[str, Any] = {"base_model": base_ref} if base_ref is not None else {}
    cfg["models"] = [{"model": r, **({"parameters": {p.mergekit: plain(p, values[p.name][i]) for p in per}}
                                     if per and not (pair and i == 0) else {})} for i, r in enumerate(models)]
    whole = [p for p in spec.params if p.mergekit and not p.per_model]
    shared = {p.mergekit: plain(p, params[p.name]) for p in whole if params[p.name] is not None}
    return {**cfg, **({"parameters": shared} if whole else {})}


# Declared methods (merge/methods/declare.py), one file each, registered when imported.
DECLARED = ("slerp", "linear", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl", "consensus_ta", "consensus_ties",
            "nuslerp", "multislerp", "karcher", "model_stock", "passthrough")
for _module in DECLARED:
    importlib.import_module(f"cpift.merge.methods.{_module}")
