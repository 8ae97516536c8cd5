"""From a validated MergeConfig to one call of a ``cpift.merge.methods`` function (run.py runs it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping

from cpift.errors import ConfigError
from cpift.merge.mergekit.spec import MergeConfig, ModelSpec, first_setting
from cpift.merge.mergekit.values import Param, Setting, chain_param, uses_position
from cpift.merge.methods.registry import METHODS

# What mergekit 0.1.5 does by default, and what cpift's functions compute: each method's MergekitSpec
# (merge/methods/registry.py); e.g. linear and ties divide by the weights, task_arithmetic does not.


@dataclass
class MethodCall:
    """``METHODS[function].function(*args, out, **kwargs, **common)`` (the registry's), plus notes."""

    function: str
    args: tuple
    kwargs: dict[str, Any]
    notes: list[str] = field(default_factory=list)


@dataclass
class _Scope:
    """A config as plan_call reads it: references resolved through ``paths``, settings through their
    scopes (the model's, the slice's, the whole merge's), and the notes for the user."""

    cfg: MergeConfig
    paths: Mapping[str, Any]
    num_layers: int | None
    position: Callable[[str], float] | None
    notes: list[str] = field(default_factory=list)

    def path(self, ref: Any) -> Any:
        return self.paths.get(ref, ref)

    @property
    def base_key(self) -> Any:
        return self.path(self.cfg.base_model) if self.cfg.base_model is not None else None

    @property
    def base_listed(self) -> bool:
        return self.base_key is not None and any(self.path(m.model) == self.base_key for m in self.cfg.models)

    def chain(self, spec: ModelSpec | None, key: str) -> list[Setting]:
        scopes = ((spec.parameters if spec else {}), self.cfg.slice_parameters, self.cfg.parameters)
        return [s[key] for s in scopes if key in s]

    def param(self, spec: ModelSpec | None, key: str, default: float | None, fld: str) -> Param:
        return chain_param(self.chain(spec, key), self.num_layers, default=default, fld=fld, source=self.cfg.source,
                           position=self.position)

    def model_param(self, spec: ModelSpec, key: str, default: float | None = None) -> Param:
        return self.param(spec, key, default, self.fld_of(spec, key))

    def fld_of(self, spec: ModelSpec, key: str) -> str:
        if key in spec.parameters:
            return f"{spec.field}.parameters.{key}"
        where = spec.field.partition(".sources")[0] if ".sources" in spec.field else "slices[0]"
        return f"{where}.parameters.{key}" if key in self.cfg.slice_parameters else f"parameters.{key}"

    def shared(self, key: str, default: Any) -> Any:
        s = first_setting(None, key, self.cfg.slice_parameters, self.cfg.parameters)
        return default if s is None else s


def _normalize_weights(ws: list[Param]) -> list[Param]:
    """w_i / Σ_j w_j per tensor (a sum below 1e-8 in magnitude counts as 1, as mergekit's divisor does)."""
    def divisor(vals: list[float]) -> float:
        d = sum(vals)
        return 1.0 if abs(d) < 1e-8 else d

    if not any(callable(w) for w in ws):
        d = divisor(ws)
        return [w / d for w in ws]
    funcs = [w if callable(w) else (lambda _n, c=w: c) for w in ws]

    def scaled(i: int) -> Callable[[str], float]:
        return lambda name: funcs[i](name) / divisor([f(name) for f in funcs])

    return [scaled(i) for i in range(len(ws))]


def plan_call(cfg: MergeConfig, *, num_layers: int | None = None, paths: Mapping[str, Any] | None = None,
              native: Collection[str] = (), position: Callable[[str], float] | None = None) -> MethodCall:
    """The cpift function call a config stands for.

    Args:
        cfg: a loaded config.
        num_layers: ``num_hidden_layers`` of the models (needed when a value is a gradient).
        paths: reference as written → resolved path (default: itself); one path is one model.
        native: keywords the function takes beyond the contract (``normalize``, ``rescale``): passed on.
        position: a tensor name's gradient position (default: i / (L − 1) from its layer index; a slice
            of a merging ``slices:`` config places it within the slice, merge/mergekit/slices.py).

    Returns: MethodCall with the positional model arguments and the method keywords.

    Raises:
        ConfigError: a normalize/rescale value cpift cannot compute; a gradient without ``num_layers``;
            two entries naming one model.
    """
    sc = _Scope(cfg, dict(paths or {}), num_layers, position)
    _refuse_same_model(sc)
    if num_layers is None:
        _refuse_gradients(cfg)
    spec = METHODS[cfg.method]
    if spec.inputs.max_models == 1:  # mergekit gives passthrough's scale per model
        return _passthrough_call(sc)
    if spec.inputs.base_keyword or (spec.inputs.counts_base_model and "weight" not in spec.mergekit.inputs):
        return _sphere_call(sc)
    if spec.param("lam") is not None:  # the delta family (merge/methods/delta.py): its notes and λ
        return _delta_call(sc, native)
    return _declared_call(sc, native)


def _refuse_same_model(sc: _Scope) -> None:
    seen: dict[Any, str] = {}
    for m in sc.cfg.models:
        key = sc.path(m.model)
        if key in seen:
            raise ConfigError(f"{sc.cfg.source}: {m.field}.model: '{m.model}' is the same model as {seen[key]}")
        seen[key] = f"{m.field} ('{m.model}')"


def _refuse_gradients(cfg: MergeConfig) -> None:
    settings = [*cfg.parameters.values(), *cfg.slice_parameters.values(),
                *(s for m in cfg.models for s in m.parameters.values())]
    if any(not isinstance(s, bool) and uses_position(s) for s in settings):
        raise ConfigError(f"{cfg.source}: a gradient (list of values) needs the models' num_hidden_layers, "
                          f"which was not found in the first model's config.json")


def _call_models(sc: _Scope, base_is: str = "") -> list[ModelSpec]:
    """The models of the call besides base_model (a note for each parameter given to it, ``base_is``
    saying what it is), or, where the method counts base_model as a model, every model and an unlisted
    base_model last (models form)."""
    spec, cfg = METHODS[sc.cfg.method], sc.cfg
    if not spec.inputs.counts_base_model:
        for m in cfg.models:
            if sc.path(m.model) == sc.base_key and m.parameters:
                sc.notes.append(f"note: {m.field}.parameters ({', '.join(m.parameters)}) have no effect: "
                                f"{m.model} is base_model{base_is} (mergekit ignores them too)")
        return [m for m in cfg.models if sc.path(m.model) != sc.base_key]
    specs = list(cfg.models)
    if cfg.base_model is not None and not sc.base_listed and cfg.layer_range is None:
        specs.append(ModelSpec(cfg.base_model, {}, "base_model"))
        how = (f"the {cfg.method} merge includes it as its last input, with the top-level weight"
               if "weight" in spec.mergekit.inputs else f"{cfg.method} includes it as its last input")
        sc.notes.append(f"note: base_model '{cfg.base_model}' is not listed in models; as in mergekit, {how}")
    return specs


def _whole_merge(sc: _Scope, p: Any) -> Any:
    """A setting for the whole merge: a number (sce's select_topk, karcher's tol) may vary per tensor
    (gradients, filters), a flag (model_stock's filter_wise) is one value."""
    if p.kind != "flag":
        fld = "slices[0].parameters" if p.mergekit in sc.cfg.slice_parameters else "parameters"
        return sc.param(None, p.mergekit, p.mergekit_default, f"{fld}.{p.mergekit}")
    return sc.shared(p.mergekit, p.mergekit_default)


def _declared_call(sc: _Scope, native: Collection[str]) -> MethodCall:
    """A declared method (merge/methods/declare.py): the inputs its declaration takes, each declared
    parameter from its mergekit key (per model, or for the whole merge); a mergekit setting it does not
    declare (normalize, rescale) must keep the value the method computes."""
    cfg, spec = sc.cfg, METHODS[sc.cfg.method]
    specs = _call_models(sc)
    kwargs: dict[str, Any] = {}
    for p in spec.params:
        if p.mergekit is not None:
            kwargs[p.name] = ([sc.model_param(m, p.mergekit, p.mergekit_default) for m in specs] if p.per_model
                              else _whole_merge(sc, p))
    _check_computed(sc, spec, kwargs, native)
    models = tuple(sc.path(m.model) for m in specs)
    return MethodCall(cfg.method, spec.inputs.call_args(sc.base_key, models), kwargs, sc.notes)


def _check_computed(sc: _Scope, spec: Any, kwargs: dict[str, Any], native: Collection[str]) -> None:
    """A normalize/rescale the method does not declare: passed on where the function takes it (``native``),
    else refused unless it is what the method computes; only a method that divides by its weights' sum
    takes normalize: false, with constant weights summing to 1."""
    weights = kwargs.get("weights")
    mk, method, src = spec.mergekit, sc.cfg.method, sc.cfg.source
    declared = {p.mergekit for p in spec.params}
    for key, default, computed in (("normalize", mk.normalize, mk.cpift_normalize),
                                   ("rescale", mk.rescale, mk.cpift_rescale)):
        if key not in mk.shared or key in declared:
            continue
        if key in native:  # the function takes it as a keyword
            kwargs[key] = sc.shared(key, default)
            continue
        if sc.shared(key, default) == computed:
            continue
        if key != "normalize" or not computed or weights is None:
            raise ConfigError(f"{src}: parameters.{key}: {str(not computed).lower()} is not supported "
                              f"for {method} (cpift's {method} computes {key}: {str(computed).lower()})")
        total = sum(weights) if not any(callable(w) for w in weights) else None
        if total is None or abs(total - 1.0) > 1e-6:
            raise ConfigError(f"{src}: parameters.normalize: false is only supported for {method} when "
                              f"the weights are constants summing to 1 (cpift's {method} always divides "
                              f"by the sum of the weights); got "
                              f"{'per-tensor weights' if total is None else f'a sum of {total:g}'}")


# The input forms the generic call does not cover: passthrough's per-model scale, the hypersphere merges'
# optional base, the delta family's λ and notes.

def _passthrough_call(sc: _Scope) -> MethodCall:
    """passthrough of one whole model (a stack of layer ranges is merge/mergekit/stack.py's)."""
    cfg = sc.cfg
    spec = cfg.models[0] if cfg.models else ModelSpec(cfg.base_model, {}, "base_model")
    kw = {"scale": sc.model_param(spec, "scale", 1.0)} if sc.chain(spec, "scale") else {}
    return MethodCall(cfg.method, (sc.path(spec.model),), kw, sc.notes)


def _sphere_call(sc: _Scope) -> MethodCall:
    """nuslerp, multislerp: the models besides base_model, their weights, ``base`` when base_model is given
    (mergekit's optional base: the origin of the deltas). karcher: every model, base_model too (mergekit
    adds an unlisted one as one more input, as for linear). The shared settings as constants or per tensor."""
    cfg, spec = sc.cfg, METHODS[sc.cfg.method]
    kwargs: dict[str, Any] = {p.name: _whole_merge(sc, p) for p in spec.params if p.mergekit and not p.per_model}
    specs = _call_models(sc, ", the origin of the deltas")
    if spec.inputs.base_keyword:
        kwargs["weights"] = [sc.model_param(m, "weight") for m in specs]
        if cfg.base_model is not None:
            kwargs["base"] = sc.base_key
    return MethodCall(cfg.method, (tuple(sc.path(m.model) for m in specs),), kwargs, sc.notes)


def _delta_call(sc: _Scope, native: Collection[str]) -> MethodCall:
    """task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, della: the fine-tunes' weights (and
    densities, gammas, epsilons), lambda, and normalize/rescale as the function computes them."""
    cfg, spec = sc.cfg, METHODS[sc.cfg.method]
    mk = spec.mergekit
    specs = _call_models(sc, ", whose delta is zero")
    ws = [sc.model_param(m, "weight") for m in specs]
    kwargs: dict[str, Any] = {"lam": float(sc.shared("lambda", 1.0))}
    if cfg.method == "task_arithmetic":
        scopes = [("parameters", cfg.parameters), ("slices[0].parameters", cfg.slice_parameters),
                  *((f"{m.field}.parameters", m.parameters) for m in specs)]
        for fld, key in ((f, k) for f, scope in scopes for k in ("density", "rescale") if k in scope):
            sc.notes.append(f"note: {fld}.{key} has no effect in task_arithmetic (mergekit ignores it too); "
                            f"ties and dare_linear sparsify")
    else:
        kwargs["density"] = [sc.model_param(m, "density", 1.0) for m in specs]
        for p in spec.params:  # breadcrumbs' gamma, della's epsilon
            if p.per_model and p.mergekit not in (None, "weight", "density"):
                kwargs[p.name] = [sc.model_param(m, p.mergekit, p.mergekit_default) for m in specs]
        rescale = sc.shared("rescale", mk.rescale)
        if "rescale" in native:
            kwargs["rescale"] = rescale
        elif rescale != mk.cpift_rescale:
            what = ("rescales kept delta entries by 1/density" if mk.cpift_rescale
                    else "does not rescale the trimmed deltas")
            raise ConfigError(f"{cfg.source}: parameters.rescale: {str(rescale).lower()} is not supported for "
                              f"{cfg.method} (cpift's {cfg.method} always {what})")
    ws = _delta_normalize(sc, native, ws, kwargs)
    kwargs = {"weights": ws, **kwargs}
    return MethodCall(cfg.method, (sc.base_key, tuple(sc.path(m.model) for m in specs)), kwargs, sc.notes)


def _delta_normalize(sc: _Scope, native: Collection[str], ws: list[Param], kwargs: dict[str, Any]) -> list[Param]:
    """The weights after the config's normalize: passed on where the function takes it, else the weights
    divided by their sum where only mergekit normalizes, else it must be what the function computes."""
    mk, method = METHODS[sc.cfg.method].mergekit, sc.cfg.method
    normalize = sc.shared("normalize", mk.normalize)
    if "normalize" in native:
        kwargs["normalize"] = normalize
    elif normalize != mk.cpift_normalize:
        if normalize and not mk.cpift_normalize:
            sc.notes.append("note: normalize: true: the weights are divided by their sum (mergekit divides the "
                            "summed delta instead; equal up to rounding)")
            return _normalize_weights(ws)
        default = f" (mergekit's default for {method})" if normalize == mk.normalize else ""
        does = ("divides by the sum of the agreeing weights (TIES disjoint mean)" if normalize is False
                else "does not divide")
        raise ConfigError(f"{sc.cfg.source}: parameters.normalize: {str(normalize).lower()}{default} is not "
                          f"supported for {method}: cpift's {method} always {does}; set normalize: "
                          f"{str(not normalize).lower()} to get that")
    return ws
