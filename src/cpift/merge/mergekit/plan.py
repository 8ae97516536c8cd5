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


def _shared(cfg: MergeConfig, key: str, default: Any) -> Any:
    return default if (s := first_setting(None, key, cfg.slice_parameters, cfg.parameters)) is None else s


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


def _whole_merge(cfg: MergeConfig, p: Any, param: Callable[..., Param]) -> Any:
    """A setting for the whole merge: a number (sce's select_topk, karcher's tol) may vary per tensor
    (gradients, filters), a flag (model_stock's filter_wise) is one value."""
    if p.kind != "flag":
        fld = "slices[0].parameters" if p.mergekit in cfg.slice_parameters else "parameters"
        return param(None, p.mergekit, p.mergekit_default, f"{fld}.{p.mergekit}")
    return _shared(cfg, p.mergekit, p.mergekit_default)


def _sphere_call(cfg: MergeConfig, path, param, fld_of, base_key, base_listed: bool, notes: list[str]) -> MethodCall:
    """nuslerp, multislerp: the models besides base_model, their weights, ``base`` when base_model is given
    (mergekit's optional base: the origin of the deltas). karcher: every model, base_model too (mergekit
    adds an unlisted one as one more input, as for linear). The shared settings as constants or per tensor."""
    spec = METHODS[cfg.method]
    kwargs: dict[str, Any] = {}
    for p in spec.params:
        if p.mergekit and not p.per_model:
            kwargs[p.name] = _whole_merge(cfg, p, param)
    if spec.optional_base:
        specs = [m for m in cfg.models if path(m.model) != base_key]
        for m in cfg.models:
            if path(m.model) == base_key and m.parameters:
                notes.append(f"note: {m.field}.parameters ({', '.join(m.parameters)}) have no effect: "
                             f"{m.model} is base_model, the origin of the deltas (mergekit ignores them too)")
        kwargs["weights"] = [param(m, "weight", None, fld_of(m, "weight")) for m in specs]
        if cfg.base_model is not None:
            kwargs["base"] = path(cfg.base_model)
    else:
        specs = list(cfg.models)
        if cfg.base_model is not None and not base_listed and cfg.layer_range is None:
            specs.append(ModelSpec(cfg.base_model, {}, "base_model"))
            notes.append(f"note: base_model '{cfg.base_model}' is not listed in models; as in mergekit, "
                         f"{cfg.method} includes it as its last input")
    return MethodCall(cfg.method, (tuple(path(m.model) for m in specs),), kwargs, notes)


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
    src = cfg.source
    paths = dict(paths or {})
    path = lambda ref: paths.get(ref, ref)  # noqa: E731
    notes: list[str] = []
    method = cfg.method

    seen: dict[Any, str] = {}
    for m in cfg.models:
        key = path(m.model)
        if key in seen:
            raise ConfigError(f"{src}: {m.field}.model: '{m.model}' is the same model as {seen[key]}")
        seen[key] = f"{m.field} ('{m.model}')"
    base_key = path(cfg.base_model) if cfg.base_model is not None else None
    base_listed = base_key is not None and base_key in seen

    if num_layers is None:
        settings = [*cfg.parameters.values(), *cfg.slice_parameters.values(),
                    *(s for m in cfg.models for s in m.parameters.values())]
        if any(not isinstance(s, bool) and uses_position(s) for s in settings):
            raise ConfigError(f"{src}: a gradient (list of values) needs the models' num_hidden_layers, "
                              f"which was not found in the first model's config.json")

    def chain(spec: ModelSpec | None, key: str) -> list[Setting]:
        scopes = ((spec.parameters if spec else {}), cfg.slice_parameters, cfg.parameters)
        return [s[key] for s in scopes if key in s]

    def param(spec: ModelSpec | None, key: str, default: float | None, fld: str) -> Param:
        return chain_param(chain(spec, key), num_layers, default=default, fld=fld, source=src, position=position)

    def fld_of(spec: ModelSpec, key: str) -> str:
        if key in spec.parameters:
            return f"{spec.field}.parameters.{key}"
        where = spec.field.partition(".sources")[0] if ".sources" in spec.field else "slices[0]"
        return f"{where}.parameters.{key}" if key in cfg.slice_parameters else f"parameters.{key}"

    # linear, and the delta family (λ, merge/methods/delta.py): the branches below
    if METHODS[method].tensor is not None and METHODS[method].roles != ("models",) and not METHODS[method].param("lam"):
        return _declared_call(cfg, path, param, fld_of, base_key, notes)

    mk = METHODS[method].mergekit
    normalize = _shared(cfg, "normalize", mk.normalize)
    # int8_mask needs nothing: mergekit uses it only as the dtype of the TIES sign mask.

    if METHODS[method].optional_base or (METHODS[method].roles == ("models",) and "weight" not in mk.inputs):
        return _sphere_call(cfg, path, param, fld_of, base_key, base_listed, notes)

    if METHODS[method].roles == ("model_a", "model_b"):
        others = [m for m in cfg.models if path(m.model) != base_key]
        t = param(None, "t", None, "parameters.t")
        return MethodCall(method, (path(cfg.base_model), path(others[0].model)), {"t": t}, notes)

    if METHODS[method].roles == ("model",):  # passthrough of one whole model
        spec = cfg.models[0] if cfg.models else ModelSpec(cfg.base_model, {}, "base_model")
        scale = chain(spec, "scale")
        kw = {"scale": param(spec, "scale", 1.0, fld_of(spec, "scale"))} if scale else {}
        return MethodCall(method, (path(spec.model),), kw, notes)

    if METHODS[method].roles == ("models",):
        specs = list(cfg.models)
        if cfg.base_model is not None and not base_listed and cfg.layer_range is None:
            specs.append(ModelSpec(cfg.base_model, {}, "base_model"))
            notes.append(f"note: base_model '{cfg.base_model}' is not listed in models; as in mergekit, "
                         f"the linear merge includes it as its last input, with the top-level weight")
        ws = [param(m, "weight", None, fld_of(m, "weight")) for m in specs]
        kwargs: dict[str, Any] = {"weights": ws}
        if "normalize" in native:
            kwargs["normalize"] = normalize
        elif not normalize:
            total = sum(ws) if not any(callable(w) for w in ws) else None
            if total is None or abs(total - 1.0) > 1e-6:
                raise ConfigError(f"{src}: parameters.normalize: false is only supported for linear when "
                                  f"the weights are constants summing to 1 (cpift's linear always divides "
                                  f"by the sum of the weights); got "
                                  f"{'per-tensor weights' if total is None else f'a sum of {total:g}'}")
        return MethodCall(method, (tuple(path(m.model) for m in specs),), kwargs, notes)

    specs = [m for m in cfg.models if path(m.model) != base_key]
    if "weight" not in mk.inputs:  # model_stock, sce: the fine-tunes and the shared settings, nothing per model
        kwargs = {p.name: _whole_merge(cfg, p, param) for p in METHODS[method].params if p.mergekit}
        return MethodCall(method, (path(cfg.base_model), tuple(path(m.model) for m in specs)), kwargs, notes)

    # task_arithmetic, ties, dare_linear, dare_ties
    for m in cfg.models:
        if path(m.model) == base_key and m.parameters:
            notes.append(f"note: {m.field}.parameters ({', '.join(m.parameters)}) have no effect: "
                         f"{m.model} is base_model, whose delta is zero (mergekit ignores them too)")
    ws = [param(m, "weight", None, fld_of(m, "weight")) for m in specs]
    lam = _shared(cfg, "lambda", 1.0)
    kwargs = {"lam": float(lam)}
    if method == "task_arithmetic":
        scopes = [("parameters", cfg.parameters), ("slices[0].parameters", cfg.slice_parameters),
                  *((f"{m.field}.parameters", m.parameters) for m in specs)]
        for fld, key in ((f, k) for f, scope in scopes for k in ("density", "rescale") if k in scope):
            notes.append(f"note: {fld}.{key} has no effect in task_arithmetic (mergekit ignores it too); "
                         f"ties and dare_linear sparsify")
    else:
        kwargs["density"] = [param(m, "density", 1.0, fld_of(m, "density")) for m in specs]
        for p in METHODS[method].params:  # breadcrumbs' gamma, della's epsilon
            if p.per_model and p.mergekit not in (None, "weight", "density"):
                kwargs[p.name] = [param(m, p.mergekit, p.mergekit_default, fld_of(m, p.mergekit)) for m in specs]
        rescale = _shared(cfg, "rescale", mk.rescale)
        if "rescale" in native:
            kwargs["rescale"] = rescale
        elif rescale != mk.cpift_rescale:
            what = ("rescales kept delta entries by 1/density" if mk.cpift_rescale
                    else "does not rescale the trimmed deltas")
            raise ConfigError(f"{src}: parameters.rescale: {str(rescale).lower()} is not supported for "
                              f"{method} (cpift's {method} always {what})")
    if "normalize" in native:
        kwargs["normalize"] = normalize
    elif normalize != mk.cpift_normalize:
        if normalize and not mk.cpift_normalize:
            ws = _normalize_weights(ws)
            notes.append("note: normalize: true: the weights are divided by their sum (mergekit divides the "
                         "summed delta instead; equal up to rounding)")
        else:
            default = f" (mergekit's default for {method})" if normalize == mk.normalize else ""
            does = ("divides by the sum of the agreeing weights (TIES disjoint mean)" if normalize is False
                    else "does not divide")
            raise ConfigError(f"{src}: parameters.normalize: {str(normalize).lower()}{default} is not "
                              f"supported for {method}: cpift's {method} always {does}; set normalize: "
                              f"{str(not normalize).lower()} to get that")
    kwargs = {"weights": ws, **kwargs}
    return MethodCall(method, (path(cfg.base_model), tuple(path(m.model) for m in specs)), kwargs, notes)


def _declared_call(cfg: MergeConfig, path, param, fld_of, base_key, notes: list[str]) -> MethodCall:
    """A declared method (merge/methods/declare.py): the inputs its declaration takes, each declared
    parameter from its mergekit key (per model, or for the whole merge); a mergekit setting it does not
    declare (normalize, rescale) must keep the value the method computes."""
    spec = METHODS[cfg.method]
    mk = spec.mergekit
    specs = [m for m in cfg.models if path(m.model) != base_key] if spec.has_base or spec.roles[0] == "model_a" \
        else list(cfg.models)
    for m in cfg.models:
        if path(m.model) == base_key and m.parameters:
            notes.append(f"note: {m.field}.parameters ({', '.join(m.parameters)}) have no effect: "
                         f"{m.model} is base_model (mergekit ignores them too)")
    kwargs: dict[str, Any] = {}
    for p in spec.params:
        if p.mergekit is None:
            continue
        if p.per_model:
            kwargs[p.name] = [param(m, p.mergekit, p.mergekit_default, fld_of(m, p.mergekit)) for m in specs]
        else:
            kwargs[p.name] = _whole_merge(cfg, p, param)
    declared = {p.mergekit for p in spec.params}
    for key, default, computed in (("normalize", mk.normalize, mk.cpift_normalize),
                                   ("rescale", mk.rescale, mk.cpift_rescale)):
        if key in mk.shared and key not in declared and _shared(cfg, key, default) != computed:
            raise ConfigError(f"{cfg.source}: parameters.{key}: {str(not computed).lower()} is not supported "
                              f"for {cfg.method} (cpift's {cfg.method} computes {key}: {str(computed).lower()})")
    models = tuple(path(m.model) for m in specs)
    if spec.roles[0] == "model_a":
        return MethodCall(cfg.method, (path(cfg.base_model), models[0]), kwargs, notes)
    return MethodCall(cfg.method, (path(cfg.base_model), models) if spec.has_base else (models,), kwargs, notes)
