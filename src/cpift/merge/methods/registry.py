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

# What a parameter's value is on the command line.
KINDS = ("number", "integer", "per_model", "number_or_per_model", "flag", "seed")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method.

    ``name`` is the function's keyword, ``cli`` its option, ``kind`` one of KINDS (``per_model``: a
    comma-separated list, one value per model; ``number_or_per_model``: one value or such a list).
    ``lo``/``hi`` bound it (``lo_open``: lo excluded). ``mergekit``: the key of a mergekit config
    that sets it, and ``mergekit_default`` mergekit's default (None: required there). ``label``: its name
    in error messages, the card and the recipe when that is not ``name`` (``lam``: lambda).
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
    its input ``roles`` (``model_a``/``model_b``: two models; ``models``: two or more; ``base`` then
    ``models``: the base and one or more fine-tunes; ``models`` with ``optional_base``: models and
    perhaps a base), parameters, one-line definition and source."""

    name: str
    cli: str
    module: str
    roles: tuple[str, ...]
    params: tuple[ParamSpec, ...]
    definition: str
    paper: str
    summary: str
    mergekit: MergekitSpec | None = None
    bench: dict[str, str] = field(default_factory=dict)  # CLI option -> value for a bench run
    min_models: int = 1  # for a method with a base: the fine-tunes it needs besides the base
    # roles ("models",) with optional_base: ``--base B`` may be given (the function's ``base`` keyword;
    # mergekit's BasePolicy.OPTIONAL: the models are then taken as deltas from it); max_models: the
    # most models it takes besides a base (None: no limit)
    optional_base: bool = False
    max_models: int | None = None
    # A declared method (merge/methods/declare.py): its per-tensor function and cross-parameter check;
    # its public function is then built by merge/methods/runner.py.
    tensor: Callable[..., None] | None = None
    check: Callable[..., None] | None = None
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

    @property
    def has_base(self) -> bool:
        return self.roles[0] == "base"

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
    return tuple(name for name, s in METHODS.items() if s.has_base)


def mergekit_flags() -> tuple[str, ...]:
    """The mergekit keys of the methods' true/false parameters (``filter_wise``)."""
    return tuple(dict.fromkeys(p.mergekit for s in METHODS.values() for p in s.params
                               if p.kind == "flag" and p.mergekit))


WEIGHTS = ParamSpec("weights", "--weights", "per_model", None,
                    "Comma-separated weight per model{base} (default: all 1).",
                    mergekit="weight")
register(MethodSpec(
    "model_stock", "model-stock", "cpift.merge.methods.stock", ("base", "models"),
    (ParamSpec("filter_wise", "--filter-wise", "flag", False,
               "One t per row of the last dimension instead of one per tensor (torch ops, not fused).",
               mergekit="filter_wise", mergekit_default=False),),
    "c = mean pairwise cosine of the deltas x_i − b, t = N·c / (1 + (N−1)·c), "
    "t·mean x_i + (1 − t)·b (t = 0 where 1 + (N−1)·c ≈ 0)",
    "Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models (arXiv:2403.19522)",
    "Model Stock: move from the base towards the fine-tunes' average by a ratio set by their deltas' angle.",
    MergekitSpec((), ("filter_wise",), normalize=None, cpift_normalize=None),
    bench={}, min_models=2))  # no parameter to set: the bench runs it with its defaults
register(MethodSpec(
    "passthrough", "passthrough", "cpift.merge.methods.layers", ("model",),
    (ParamSpec("scale", "--scale", "number", None,
               "Multiply every tensor by this (default: copy bit for bit).", mergekit="scale"),),
    "x (or scale · x): one model's tensors; with mergekit slices, layer ranges of several models stacked",
    "mergekit (Goddard et al. 2024, arXiv:2403.13257); SOLAR depth up-scaling (Kim et al. 2023, arXiv:2312.15166)",
    "Copy one model (times --scale); stacking layer ranges (slices) runs from a mergekit YAML.",
    MergekitSpec(("scale",), (), normalize=None, cpift_normalize=None)))


# The hypersphere merges (merge/methods/hypersphere.py): nuslerp and multislerp take an optional base.
_SPHERE_WEIGHTS = ParamSpec("weights", "--weights", "per_model", None,
                            "Comma-separated weight per model, base excluded (default: all 1).", mergekit="weight")
register(MethodSpec(
    "nuslerp", "nuslerp", "cpift.merge.methods.hypersphere", ("models",),
    (_SPHERE_WEIGHTS,
     ParamSpec("flatten", "--flatten", "flag", True,
               "Each tensor one vector (default); --no-flatten: one vector per row of the last dimension "
               "(torch ops, not fused).", mergekit="nuslerp_flatten", mergekit_default=True),
     ParamSpec("row_wise", "--row-wise", "flag", False,
               "With --no-flatten: the vectors run along dimension 0 instead (torch ops, not fused).",
               mergekit="nuslerp_row_wise", mergekit_default=False)),
    "SLERP of two models by t = w_1 / (w_0 + w_1) (0.5 where |w_0 + w_1| < 1e-6): cos = ⟨x_0, x_1⟩ / "
    "(max(‖x_0‖, 1e-7)·max(‖x_1‖, 1e-7)), (1 − t)·x_0 + t·x_1 where 1 − cos² ≤ 1e-16, else "
    "(sin((1 − t)θ)·x_0 + sin(tθ)·x_1) / sin θ; with a base on the deltas x_i − b, b added back",
    "mergekit (Goddard et al. 2024, arXiv:2403.13257): NuSLERP",
    "NuSLERP: SLERP of two models by their weights' ratio, optionally on deltas from --base.",
    MergekitSpec(("weight",), ("nuslerp_flatten", "nuslerp_row_wise"), normalize=None, cpift_normalize=None),
    bench={}, min_models=2, optional_base=True, max_models=2))
register(MethodSpec(
    "multislerp", "multislerp", "cpift.merge.methods.hypersphere", ("models",),
    (_SPHERE_WEIGHTS,
     ParamSpec("normalize_weights", "--normalize-weights", "flag", True,
               "Divide the weights by their sum (default); --no-normalize-weights uses them as given.",
               mergekit="normalize_weights", mergekit_default=True),
     ParamSpec("eps", "--eps", "number", 1e-8, "Stabilising constant added to the norms (mergekit's eps).",
               lo=0.0, mergekit="eps", mergekit_default=1e-8)),
    "barycentric interpolation on the hypersphere: u_i = x_i / (‖x_i‖ + eps), m̂ the normalised Σ w_i u_i, "
    "τ = Σ w_i (u_i − ⟨u_i, m̂⟩ m̂), s = ‖τ‖ + eps, (m̂ cos s + τ sin(s)/s)·Σ w_i ‖x_i‖; with a base on "
    "the deltas x_i − b, b added back; ‖Σ w_i u_i‖ < eps: two models the lerp Σ w_i x_i, more an error",
    "C. Goddard, Multi-SLERP (blog: https://goddard.blog/posts/multislerp-wow-what-a-cool-idea), as mergekit cites it",
    "Multi-SLERP: barycentric interpolation of N models on the hypersphere, optionally on deltas from --base.",
    MergekitSpec(("weight",), ("normalize_weights", "eps"), normalize=None, cpift_normalize=None),
    bench={}, optional_base=True))
register(MethodSpec(
    "karcher", "karcher", "cpift.merge.methods.hypersphere", ("models",),
    (ParamSpec("max_iter", "--max-iter", "number", 10, "Iterations at most (a whole number ≥ 0).",
               lo=0.0, mergekit="max_iter", mergekit_default=10),
     ParamSpec("tol", "--tol", "number", 1e-5,
               "Norms and angles below it count as zero; a step below it ends the iteration.",
               lo=0.0, mergekit="tol", mergekit_default=1e-5)),
    "Karcher mean of the unit vectors x_i / ‖x_i‖ (norms > tol), weights 1/N: from their normalised mean, "
    "m ← exp_m(Σ_i θ_i/sin θ_i·(u_i − cos θ_i·m) / N) up to max_iter times (a step < tol stops), "
    "times Σ_i ‖x_i‖ / N",
    "arXiv:2603.04972, as mergekit 0.1.5 cites it; the Karcher mean: Karcher 1977, Riemannian center of mass and "
    "mollifier smoothing",
    "Karcher mean: the equal-weight Riemannian mean of N models on the hypersphere.",
    MergekitSpec((), ("max_iter", "tol"), normalize=None, cpift_normalize=None),
    bench={}))



def declared_recipe(spec: MethodSpec, params: Mapping[str, Any], refs: list[str]) -> dict[str, Any]:
    """The mergekit config of a merge by a declared method (merge/card.py writes it as the recipe):
    base_model if it takes one, each model with its per-model parameters, the whole-merge parameters."""
    def plain(p, v: Any) -> Any:
        return bool(v) if p.kind == "flag" else int(v) if p.kind in ("integer", "seed") else float(v)

    pair, base = spec.roles[0] == "model_a", spec.has_base
    models = refs if pair else refs[1:] if base else refs
    per = [p for p in spec.params if p.mergekit and p.per_model]
    values = {p.key: params[p.key] if isinstance(params[p.key], (list, tuple))
              else [1.0 if params[p.key] is None else params[p.key]] * len(models) for p in per}
    cfg: dict[str, Any] = {"base_model": refs[0]} if pair or base else {}
    cfg["models"] = [{"model": r, **({"parameters": {p.mergekit: plain(p, values[p.key][i]) for p in per}}
                                     if per and not (pair and i == 0) else {})} for i, r in enumerate(models)]
    shared = {p.mergekit: plain(p, params[p.key]) for p in spec.keywords if p.mergekit and not p.per_model}
    return {**cfg, **({"parameters": shared} if shared else {})}


# Declared methods (merge/methods/declare.py), one file each, registered when imported.
DECLARED = ("slerp", "linear", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl", "consensus_ta", "consensus_ties",
            "delta")
for _module in DECLARED:
    importlib.import_module(f"cpift.merge.methods.{_module}")
