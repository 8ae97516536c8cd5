"""The runner of every declared method (merge/methods/declare.py): open the inputs, validate the
parameters against their declared ranges, stream the per-tensor function over the models, publish the
output with its card and recipe (merge/engine.py). ``public(spec)`` is the method's Python function,
``cpift.<method>``, with the declared inputs as arguments and the declared parameters as keywords.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

from cpift.errors import ParameterError
from cpift.merge.engine import MergeResult, stream_merge
from cpift.merge.io.dryrun import MergePlan
from cpift.merge.io.models import model_paths, open_models
from cpift.merge.io.publish import check_output
from cpift.merge.options import FIELDS, MergeOptions, option_parameters, options_from

from .params import PathLike, float_names, per_model, value, weights_for
from .registry import MethodSpec, ParamSpec

_KW = inspect.Parameter.KEYWORD_ONLY
_POS = inspect.Parameter.POSITIONAL_OR_KEYWORD


def _field(p: ParamSpec, raw: Any, i: int) -> str:
    return f"{p.key}[{i}]" if isinstance(raw, (list, tuple)) else p.key


def _resolve_one(p: ParamSpec, raw: Any, tensor: str, field: str) -> Any:
    if raw is None and p.optional:
        return None
    if p.kind == "flag":
        if not isinstance(raw, bool):
            raise ParameterError(f"{field}: expected true or false, got {raw!r}")
        return raw
    if p.kind == "seed":
        if not isinstance(raw, int) or isinstance(raw, bool) or raw < 0:
            raise ParameterError(f"{field}: expected a non-negative integer, got {raw!r}")
        return raw
    v = value(raw, tensor, field, lo=p.lo, hi=p.hi, lo_open=p.lo_open)
    if p.kind == "integer":
        if not v.is_integer():
            raise ParameterError(f"{field}: expected a whole number{' of ' + p.unit if p.unit else ''}, got {v:g}")
        return int(v)
    return v


def validate(spec: MethodSpec, given: dict[str, Any], count: int,
             names: list[str]) -> tuple[Callable[[str], dict], dict[str, Any]]:
    """Check every parameter on every tensor it can vary over; return (tensor name → resolved values, the
    parameters as the card and the recipe show them: one value per model for a per-model parameter)."""
    raws: dict[str, Any] = {}
    for p in spec.keywords:
        raw = given[p.name]
        if raw is None and p.name == "weights":
            raw = weights_for(None, count)
        elif raw is None and not p.optional:
            raise ParameterError(f"{p.key}: missing; {spec.name} needs {p.missing or p.cli}")
        if p.per_model:
            raw = per_model(raw, count, p.key)
        elif p.kind == "integer" and isinstance(raw, float) and raw.is_integer():
            raw = int(raw)  # shown as the whole number it is
        raws[p.name] = raw

    def resolve(tensor: str) -> dict[str, Any]:
        values = {}
        for p in spec.keywords:
            raw = raws[p.name]
            if p.per_model:
                values[p.name] = [_resolve_one(p, r, tensor, _field(p, given[p.name], i)) for i, r in enumerate(raw)]
            else:
                values[p.name] = _resolve_one(p, raw, tensor, p.key)
        if spec.check is not None:
            spec.check(values, tensor)
        return values

    varies = any(callable(r) or (isinstance(r, list) and any(map(callable, r))) for r in raws.values())
    for n in names if varies else names[:1]:
        resolve(n)
    return resolve, {p.key: raws[p.name] for p in spec.keywords}


def run(spec: MethodSpec, args: tuple, out: PathLike, given: dict[str, Any], *, base: PathLike | None = None,
        options: MergeOptions | None = None) -> MergeResult | MergePlan:
    """Open, validate, stream ``spec.tensor`` over every floating tensor, publish (merge/engine.py)."""
    opts = options or MergeOptions()
    paths, roles, count = spec.inputs.stream(spec.name, args, base)
    ckpts = open_models(paths)
    resolve, shown = validate(spec, given, count, float_names(ckpts))
    extra = _prepare(spec, ckpts, shown, out, opts)
    shapes = {n: ckpts[0].info(n).shape for n in ckpts[0].names()}
    fn, backend = spec.tensor, opts.backend
    named = "name" in inspect.signature(fn).parameters  # a seeded method's per-tensor seed

    def combine(name, xs, out_t):
        values = {**resolve(name), **extra.get(name, {}), **({"name": name} if named else {})}
        if spec.inputs.base_keyword:  # the function takes the base (or None) as ``base``, the models as xs
            values["base"], xs = (xs[0], xs[1:]) if base is not None else (None, xs)
        try:
            fn(xs, out_t, backend=backend, shape=shapes[name], **values)
        except ParameterError as e:  # a refusal that depends on the tensor's values: name the tensor
            raise ParameterError(f"tensor '{name}': {e}") from None

    notes = spec.notes(shown) if spec.notes is not None else None
    return stream_merge(spec.name, ckpts, out, combine, params=shown, notes=notes, roles=roles, options=opts)


def _prepare(spec: MethodSpec, ckpts: list, shown: dict[str, Any], out: PathLike,
             opts: MergeOptions) -> Mapping[str, Mapping[str, Any]]:
    """The declaration's whole-model pass, if it has one; a bad -o is refused before it (stream_merge checks
    again)."""
    if spec.prepare is None:
        return {}
    check_output(out, overwrite=opts.overwrite, inputs=[*model_paths(ckpts), opts.copy_tokenizer_from, *opts.inputs])
    return spec.prepare(ckpts, shown, opts) or {}


def _signature(spec: MethodSpec) -> inspect.Signature:
    params = [inspect.Parameter(n, _POS) for n in (*spec.inputs.positional, "out")]
    if spec.inputs.base_keyword:
        params.append(inspect.Parameter("base", _KW, default=None))
    params += [inspect.Parameter(p.name, _KW, default=p.default) for p in spec.keywords]
    params += option_parameters()  # the merge options as keywords (merge/options.py)
    return inspect.Signature(params)


_PUBLIC: dict[int, Callable[..., MergeResult | MergePlan]] = {}


def public(spec: MethodSpec) -> Callable[..., MergeResult | MergePlan]:
    """The Python function of a declared method, its parameters and then the merge options as keywords:
    ``ram(base, models, out, *, epsilon=1e-5, dtype=None, ...)`` (one function object per spec:
    ``cpift.ram is cpift.merge.methods.ram``)."""
    if id(spec) not in _PUBLIC:
        _PUBLIC[id(spec)] = _build(spec)
    return _PUBLIC[id(spec)]


def _build(spec: MethodSpec) -> Callable[..., MergeResult | MergePlan]:
    sig = _signature(spec)

    def merge(*args: Any, **kwargs: Any) -> MergeResult | MergePlan:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        opts = options_from(bound.arguments)
        return _run_bound(spec, sig, bound.arguments, opts)

    merge.__name__ = merge.__qualname__ = spec.name
    merge.__module__ = spec.module
    merge.__doc__ = f"{spec.summary}\n\nDefinition: {spec.definition}.\nSource: {spec.paper}.\n" + "".join(
        f"\n    {p.name}: {p.help}" for p in spec.params)
    merge.__signature__ = sig  # type: ignore[attr-defined]
    return merge


def run_method(spec: MethodSpec, *args: Any, options: MergeOptions, **params: Any) -> MergeResult | MergePlan:
    """Run a method with the merge options as one object (the CLI, mergekit configs): ``args`` and
    ``params`` as its Python function takes them, less the option keywords (a TypeError names any other)."""
    if spec.tensor is None:  # an undeclared whole-model function (a plug-in): the options as its keywords
        return spec.function(*args, **params, **options.pick(FIELDS))
    sig = _signature(spec)
    sig = sig.replace(parameters=[q for q in sig.parameters.values() if q.name not in FIELDS])
    bound = sig.bind(*args, **params)
    bound.apply_defaults()
    return _run_bound(spec, sig, bound.arguments, options)


def _run_bound(spec: MethodSpec, sig: inspect.Signature, a: dict[str, Any],
               options: MergeOptions) -> MergeResult | MergePlan:
    """``run`` with the arguments bound to the method's signature."""
    given = {p.name: a[p.name] for p in spec.keywords}
    inputs: Sequence[Any] = [a[n] for n, q in sig.parameters.items() if q.kind is _POS and n != "out"]
    return run(spec, tuple(inputs), a["out"], given, base=a.get("base"), options=options)
