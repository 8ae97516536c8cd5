"""mergekit-compatible YAML configs: ``cpift-merge config FILE.yml -o OUT`` runs a mergekit user's
config unchanged for ``linear``, ``slerp``, ``task_arithmetic``, ``ties``, ``dare_linear`` and
``dare_ties``, with the semantics of mergekit 0.1.5; anything cpift cannot compute the same way is
refused with a ConfigError naming the file and the field, before any tensor is read.

Pipeline: ``load_config`` (YAML → validated MergeConfig) → ``plan_call`` (MergeConfig → one call of a
``cpift.merge.methods`` function) → ``run_config`` (resolve paths, run the call).

Parameter values (mergekit's rules)
    A value is a number, a gradient (a list of numbers) or a list of conditionals
    ``{filter: SUBSTRING, value: NUMBER_OR_GRADIENT}`` (one such mapping alone counts as a list of one).
    Conditionals: the first entry whose filter is absent, ``null``, ``"*"`` or a substring of the tensor
    name wins; if none matches the value is absent. Numbers may be YAML strings such as ``1e-3`` (YAML 1.1
    reads those as strings; mergekit converts them, so do we).

    Gradients: a tensor's position is t = i / (L − 1) for a tensor of layer i (the ``layers.<i>.``,
    ``h.<i>.``, ``block(s).<i>.`` part of its name) in a model of L = ``num_hidden_layers`` layers
    (t = 1 when L = 1), and t = 0 for every tensor outside the layers: embeddings, the final norm and
    ``lm_head`` alike (mergekit 0.1.5 plans pre- and post-layer weights with t = 0). For n values
    v_0..v_{n−1}: s = t·(n − 1), i0 = ⌊s⌋, i1 = min(n − 1, i0 + 1), f = s − i0,
    value = (1 − f)·v_i0 + f·v_i1.

    Scopes, highest precedence first: the model's own ``parameters`` (per-model parameters only), the
    slice's ``parameters`` (``slices:`` form), the top-level ``parameters``, then mergekit's default. A
    scope whose value is absent for a tensor (no filter matched, empty list) falls through to the next.

Defaults (mergekit 0.1.5, checked in its source): ``weight`` has no default for any of these methods
(a model without one is an error, as in mergekit); ``density`` 1; ``lambda`` 1; ``normalize`` true for
linear and ties, false for task_arithmetic, dare_linear and dare_ties; ``rescale`` true for the DARE
methods only; ``t`` is required for slerp.

Mapping onto cpift (``base`` = ``base_model``; it may also be listed in ``models``)
    linear           linear(models, weights) — a base_model missing from ``models`` is added as the last
                     input, as mergekit does (it then needs the top-level weight).
    slerp            slerp(base, other, t) — exactly two models, one of them base_model (t = 0 gives it).
    task_arithmetic, ties, dare_linear, dare_ties
                     fn(base, others, weights, density, lam) — the base's own delta is zero, so it is
                     dropped from ``models`` (its per-model parameters have no effect; a note says so).

Refused, with the reason in the message
    * other merge methods, ``modules``, ``tokenizer.tokens``, ``chat_template``, LoRA references
      (``model+lora``), ``residual_weight``;
    * ``slices`` unless there is exactly one slice whose sources each span the whole model
      ([0, num_hidden_layers]): anything else builds a different layer stack;
    * ``tokenizer_source: union``, and ``base`` / a path unless every model's tokenizer.json holds the
      same vocabulary whose size equals config.json's vocab_size (then mergekit's vocabulary remapping
      is the identity and copying the tokenizer is exact);
    * ``normalize`` / ``rescale`` values whose arithmetic cpift's function does not perform (e.g.
      ``normalize: false`` for ties); ``normalize: true`` for task_arithmetic and dare_linear is done by
      dividing the weights by their sum (mergekit divides the summed delta: equal up to rounding);
      a ``normalize`` keyword of the cpift function, when it has one, is used directly;
    * a per-tensor (gradient / filtered) ``lambda`` or boolean; unknown keys anywhere (mergekit ignores
      them silently, and a typo should not change a merge).
    ``int8_mask`` is accepted and has no effect: in mergekit it only changes the dtype of the sign mask.

Value ranges are checked up front: t ∈ [0, 1], density ∈ (0, 1], weight and lambda finite, and for a
linear merge with constant weights their sum non-zero.

Known differences that no config can remove: DARE's random drop masks come from cpift's counter-based
RNG (``seed``), and its rescale is 1/density where mergekit rescales to keep the delta's L1 norm.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Union

from .errors import ConfigError

Param = Union[float, Callable[[str], float]]

METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties")
DELTA_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")

# mergekit 0.1.5's parameters per method: (per-model parameters, global-only parameters).
# int8_mask is accepted for every method; it never changes float results.
_INPUT_PARAMS = {"linear": ("weight",), "slerp": ()}
_SHARED_PARAMS = {"linear": ("normalize", "int8_mask"), "slerp": ("t", "int8_mask")}
for _m in DELTA_METHODS:
    _INPUT_PARAMS[_m] = ("weight", "density")
    _SHARED_PARAMS[_m] = ("lambda", "normalize", "rescale", "int8_mask")
del _m

_DEFAULT_NORMALIZE = {"linear": True, "slerp": None, "task_arithmetic": False, "ties": True,
                      "dare_linear": False, "dare_ties": False}
_DEFAULT_RESCALE = {"task_arithmetic": False, "ties": False, "dare_linear": True, "dare_ties": True}
# What cpift's functions compute (merge/methods.py): linear and ties divide by the (agreeing) weights;
# dare_ties ends in TIES's disjoint mean; task_arithmetic and dare_linear do not divide.
# The DARE functions always rescale kept entries; ties never does.
_CPIFT_NORMALIZE = {"linear": True, "task_arithmetic": False, "ties": True, "dare_linear": False,
                    "dare_ties": True}
_CPIFT_RESCALE = {"ties": False, "dare_linear": True, "dare_ties": True}

_BOOL_PARAMS = ("normalize", "rescale", "int8_mask")
_TOP_KEYS = ("merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "modules", "name")
_DTYPES = ("bfloat16", "float16", "float32", "float64")
_TRUE = ("1", "on", "t", "true", "y", "yes")
_FALSE = ("0", "off", "f", "false", "n", "no")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


# --------------------------------------------------------------------------------------------------
# Parameter values: parsing, positions, evaluation


@dataclass(frozen=True)
class Conditional:
    """One ``{filter, value}`` entry; ``filter`` None (or "*") matches every tensor."""

    filter: str | None
    value: float | tuple[float, ...]


# A parsed value: a number, a gradient (tuple of numbers, possibly empty), a tuple of Conditionals,
# or a bool (normalize / rescale / int8_mask, which take plain true/false only).
Setting = Union[float, bool, tuple]


def _where(source: str | os.PathLike | None, fld: str) -> str:
    return f"{source}: {fld}" if source else fld


def _number(raw: Any, fld: str, source, what: str = "a number or a list of numbers") -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ConfigError(f"{_where(source, fld)}: expected {what}, got {raw!r}")
    try:
        v = float(raw.strip()) if isinstance(raw, str) else float(raw)
    except ValueError:
        raise ConfigError(f"{_where(source, fld)}: expected {what}, got {raw!r}") from None
    if not math.isfinite(v):
        raise ConfigError(f"{_where(source, fld)}: expected a finite number, got {raw!r}")
    return v


def _boolean(raw: Any, fld: str, source) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in _TRUE + _FALSE:
        return raw.strip().lower() in _TRUE
    extra = " (per-tensor values are not supported for it)" if isinstance(raw, (list, dict)) else ""
    raise ConfigError(f"{_where(source, fld)}: expected true or false, got {raw!r}{extra}")


def _check_range(name: str, v: float, fld: str, source) -> float:
    if name == "t" and not 0.0 <= v <= 1.0:
        raise ConfigError(f"{_where(source, fld)}: {v:g} is outside [0, 1] (t = 0 gives base_model, "
                          f"1 the other model)")
    if name == "density" and not 0.0 < v <= 1.0:
        raise ConfigError(f"{_where(source, fld)}: {v:g} is outside (0, 1] (the share of each delta "
                          f"that is kept)")
    return v


def _scalar_or_gradient(raw: Any, name: str, fld: str, source) -> float | tuple[float, ...]:
    if isinstance(raw, list):
        if any(isinstance(e, (list, dict)) for e in raw):
            bad = next(i for i, e in enumerate(raw) if isinstance(e, (list, dict)))
            raise ConfigError(f"{_where(source, f'{fld}[{bad}]')}: expected a number, got {raw[bad]!r}")
        return tuple(_check_range(name, _number(e, f"{fld}[{i}]", source, "a number"),
                                  f"{fld}[{i}]", source) for i, e in enumerate(raw))
    return _check_range(name, _number(raw, fld, source), fld, source)


def parse_setting(raw: Any, name: str, fld: str, source: str | os.PathLike | None = None) -> Setting:
    """Validate one mergekit parameter value.

    Args:
        raw: the YAML value: a number, a list of numbers, a ``{filter, value}`` mapping or a list of them.
        name: the parameter (``t``, ``weight``, ``density``, ``lambda``, ``normalize``, ...), which
            decides the type and the range check.
        fld: the field path used in errors, e.g. ``models[1].parameters.weight``.
        source: the config file named in errors.

    Returns:
        A float, a tuple of floats (gradient), a tuple of Conditional, or a bool.

    Raises:
        ConfigError: naming ``source`` and ``fld``.
    """
    if name in _BOOL_PARAMS:
        return _boolean(raw, fld, source)
    if isinstance(raw, dict) or (isinstance(raw, list) and raw and isinstance(raw[0], dict)):
        entries = [raw] if isinstance(raw, dict) else raw
        conds = []
        for i, e in enumerate(entries):
            efld = fld if isinstance(raw, dict) else f"{fld}[{i}]"
            if not isinstance(e, dict):
                raise ConfigError(f"{_where(source, efld)}: expected a {{filter, value}} mapping like the "
                                  f"first entry, got {e!r}")
            unknown = sorted(set(e) - {"filter", "value"})
            if unknown:
                raise ConfigError(f"{_where(source, f'{efld}.{unknown[0]}')}: unknown key (a conditional "
                                  f"value has only 'filter' and 'value')")
            if "value" not in e:
                raise ConfigError(f"{_where(source, f'{efld}.value')}: missing (each conditional needs a "
                                  f"value; leave out 'filter' for the default)")
            flt = e.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise ConfigError(f"{_where(source, f'{efld}.filter')}: expected a substring of tensor "
                                  f"names, got {flt!r}")
            val = e["value"]
            if isinstance(val, dict) or (isinstance(val, list) and any(isinstance(v, dict) for v in val)):
                raise ConfigError(f"{_where(source, f'{efld}.value')}: expected a number or a list of "
                                  f"numbers (conditionals do not nest), got {val!r}")
            conds.append(Conditional(flt, _scalar_or_gradient(val, name, f"{efld}.value", source)))
        return tuple(conds)
    return _scalar_or_gradient(raw, name, fld, source)


def tensor_position(name: str, num_layers: int | None) -> float:
    """mergekit's gradient position of a tensor: i / (L − 1) in layer i of L, 0 outside the layers.

    Raises:
        ConfigError: the name holds a layer index but L is unknown or not above it.
    """
    m = _LAYER_RE.search(name)
    if m is None:
        return 0.0
    i = int(m.group(1))
    if num_layers is None or i >= num_layers:
        raise ConfigError(f"tensor '{name}': layer {i} is outside the model's num_hidden_layers="
                          f"{num_layers} (config.json), so a gradient cannot place it")
    return i / (num_layers - 1) if num_layers > 1 else 1.0


def _interpolate(values: tuple[float, ...], t: float) -> float:
    s = t * (len(values) - 1)
    i0 = int(s)
    i1 = min(len(values) - 1, i0 + 1)
    f = s - i0
    return (1 - f) * values[i0] + f * values[i1]


def evaluate(setting: Setting, tensor: str, t: float) -> float | bool | None:
    """A parsed value for one tensor at gradient position ``t``; None when no conditional matches."""
    if isinstance(setting, (bool, float, int)):
        return setting
    if setting and isinstance(setting[0], Conditional):
        for c in setting:
            if c.filter is None or c.filter == "*" or c.filter in tensor:
                return evaluate(c.value, tensor, t)
        return None
    return _interpolate(setting, t) if setting else None


def _is_constant(s: Setting) -> bool:
    return isinstance(s, (bool, float, int))


def _uses_position(s: Setting) -> bool:
    if _is_constant(s):
        return False
    if s and isinstance(s[0], Conditional):
        return any(not _is_constant(c.value) for c in s)
    return True


def _chain_param(chain: list[Setting], num_layers: int | None, *, default: float | None, fld: str,
                 source) -> Param:
    """One Param from settings in precedence order: a constant when the first one is, else a function."""
    if chain and _is_constant(chain[0]):
        return float(chain[0])
    if not chain:
        if default is None:
            raise ConfigError(f"{_where(source, fld)}: missing")
        return default
    chain = tuple(chain)

    def value(tensor: str) -> float:
        t = None
        for s in chain:
            if t is None and _uses_position(s):
                try:
                    t = tensor_position(tensor, num_layers)
                except ConfigError as e:
                    raise ConfigError(f"{_where(source, fld)}: {e}") from None
            v = evaluate(s, tensor, t if t is not None else 0.0)
            if v is not None:
                return v
        if default is None:
            raise ConfigError(f"{_where(source, fld)}: no value for tensor '{tensor}' (no filter matches "
                              f"it and there is no default entry or top-level value)")
        return default

    return value


def param_fn(value: Any, num_layers: int | None, *, name: str = "value",
             source: str | os.PathLike | None = None) -> Param:
    """Turn a mergekit parameter value into a constant or a function of the tensor name.

    Args:
        value: a raw YAML value (number, gradient list, conditionals) or a parsed Setting.
        num_layers: the model's ``num_hidden_layers`` (needed by gradients only).
        name: the parameter name, for its range check (``t``, ``density``) and in messages.
        source: file named in errors.

    Returns:
        A float for a plain number; otherwise a function ``tensor name -> float``.

    Raises:
        ConfigError: a bad value now; from the returned function, a tensor no filter matches.

    Example:
        >>> f = param_fn([0, 0.5, 1], 5, name="t")
        >>> f("model.layers.1.mlp.up_proj.weight"), f("model.embed_tokens.weight")
        (0.25, 0.0)
    """
    if not isinstance(value, tuple):
        value = parse_setting(value, name, name, source)
    return _chain_param([value], num_layers, default=None, fld=name, source=source)


# --------------------------------------------------------------------------------------------------
# The config


@dataclass(frozen=True)
class ModelSpec:
    """One input model as the config lists it: the reference as written and its own parameters."""

    model: str
    parameters: Mapping[str, Setting]
    field: str  # "models[1]" or "slices[0].sources[1]", for messages


@dataclass(frozen=True)
class MergeConfig:
    """A validated mergekit config.

    ``models`` keeps the listed order (base_model included if listed). ``parameters`` are the top-level
    ones, ``slice_parameters`` those of the single slice in ``slices:`` form. Model references are as
    written; ``run_config`` resolves them.
    """

    method: str
    models: tuple[ModelSpec, ...]
    base_model: str | None
    parameters: Mapping[str, Setting]
    dtype: str | None
    out_dtype: str | None
    source: Path
    slice_parameters: Mapping[str, Setting] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None  # slices form: the common [start, end)
    tokenizer_source: str | None = None  # None, "base" or a model reference
    name: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = e.problem or e.context or "invalid YAML"
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None


def _mapping(raw: Any, fld: str, source, what: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{_where(source, fld)}: expected {what}, got {raw!r}")
    return raw


def _model_ref(raw: Any, fld: str, source) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{_where(source, fld)}: expected a model directory or Hugging Face repo id, "
                          f"got {raw!r}")
    if "+" in raw:
        raise ConfigError(f"{_where(source, fld)}: '{raw}' names a LoRA adapter (model+lora), which cpift "
                          f"does not merge in; merge the adapter into the model first")
    if raw.count("@") > 1:
        raise ConfigError(f"{_where(source, fld)}: '{raw}' has more than one '@' (path@revision)")
    return raw


def _parse_params(raw: Any, fld: str, source, method: str, allowed: tuple[str, ...],
                  per_model: bool) -> dict[str, Setting]:
    params = _mapping(raw, fld, source, "a mapping of parameter names to values")
    out = {}
    for key, val in params.items():
        kfld = f"{fld}.{key}"
        if key not in allowed:
            if per_model and key in _SHARED_PARAMS[method]:
                raise ConfigError(f"{_where(source, kfld)}: '{key}' applies to the whole merge in "
                                  f"{method} (mergekit ignores it here); move it to the top-level parameters")
            known = ", ".join(allowed) or "none"
            scope = "per-model parameters" if per_model else "parameters"
            raise ConfigError(f"{_where(source, kfld)}: unknown parameter for {method} ({scope}: {known})")
        if key == "lambda" and (isinstance(val, (list, dict))):
            raise ConfigError(f"{_where(source, kfld)}: expected one number; a per-tensor lambda is not "
                              f"supported by cpift")
        out[key] = parse_setting(val, key, kfld, source)
    return out


def _parse_model(raw: Any, fld: str, source, method: str, slice_form: bool) -> tuple[ModelSpec, Any]:
    keys = ("model", "parameters", "layer_range") if slice_form else ("model", "parameters")
    if not isinstance(raw, dict):
        raise ConfigError(f"{_where(source, fld)}: expected a mapping with a 'model' key, got {raw!r}")
    for key in raw:
        if key not in keys:
            hint = " (layer_range belongs to slices: sources)" if key == "layer_range" else ""
            raise ConfigError(f"{_where(source, f'{fld}.{key}')}: unknown key{hint}")
    if "model" not in raw:
        raise ConfigError(f"{_where(source, f'{fld}.model')}: missing")
    ref = _model_ref(raw["model"], f"{fld}.model", source)
    params = _parse_params(raw.get("parameters"), f"{fld}.parameters", source, method,
                           _INPUT_PARAMS[method], per_model=True)
    return ModelSpec(ref, params, fld), raw.get("layer_range")


def _parse_slices(raw: Any, source, method: str):
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{_where(source, 'slices')}: expected a non-empty list of slices")
    if len(raw) != 1:
        raise ConfigError(f"{_where(source, 'slices')}: {len(raw)} slices stack layer ranges into a new "
                          f"model; cpift merges whole models, so only one slice covering every layer is "
                          f"supported (or use models:)")
    sl = _mapping(raw[0], "slices[0]", source, "a mapping with 'sources'")
    for key in sl:
        if key not in ("sources", "base_model", "parameters", "residual_weight"):
            raise ConfigError(f"{_where(source, f'slices[0].{key}')}: unknown key")
    if sl.get("residual_weight") is not None:
        raise ConfigError(f"{_where(source, 'slices[0].residual_weight')}: not supported by cpift")
    sources = sl.get("sources")
    if not isinstance(sources, list) or not sources:
        raise ConfigError(f"{_where(source, 'slices[0].sources')}: expected a non-empty list of "
                          f"{{model, layer_range}}")
    models, ranges = [], []
    for i, s in enumerate(sources):
        fld = f"slices[0].sources[{i}]"
        spec, lr = _parse_model(s, fld, source, method, slice_form=True)
        if lr is None:
            raise ConfigError(f"{_where(source, f'{fld}.layer_range')}: missing")
        if (not isinstance(lr, list) or len(lr) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)):
            raise ConfigError(f"{_where(source, f'{fld}.layer_range')}: expected [start, end] integers, "
                              f"got {lr!r}")
        if lr[0] != 0 or lr[1] <= 0:
            raise ConfigError(f"{_where(source, f'{fld}.layer_range')}: {lr} is a partial layer range; "
                              f"partial layer ranges are not supported (cpift merges whole models: use "
                              f"[0, num_hidden_layers], or models:)")
        models.append(spec)
        ranges.append(tuple(lr))
    for i, lr in enumerate(ranges):
        if lr != ranges[0]:
            raise ConfigError(f"{_where(source, f'slices[0].sources[{i}].layer_range')}: {list(lr)} differs "
                              f"from {list(ranges[0])}; partial layer ranges are not supported")
    base = sl.get("base_model")
    if base is not None:
        base = _model_ref(base, "slices[0].base_model", source)
    params = _parse_params(sl.get("parameters"), "slices[0].parameters", source, method,
                           _INPUT_PARAMS[method] + _SHARED_PARAMS[method], per_model=False)
    return models, ranges[0], base, params


def _dtype(raw: Any, fld: str, source) -> str | None:
    if raw is None:
        return None
    name = raw.removeprefix("torch.") if isinstance(raw, str) else raw
    if name not in _DTYPES:
        raise ConfigError(f"{_where(source, fld)}: expected one of {', '.join(_DTYPES)}, got {raw!r}")
    return name


def _tokenizer_source(data: dict, source) -> str | None:
    src = data.get("tokenizer_source")
    tok = data.get("tokenizer")
    fld = "tokenizer_source"
    if tok is not None:
        if src is not None:
            raise ConfigError(f"{_where(source, 'tokenizer')}: give tokenizer or tokenizer_source, not both")
        tok = _mapping(tok, "tokenizer", source, "a mapping")
        for key in tok:
            if key == "source":
                continue
            if key in ("tokens", "pad_to_multiple_of"):
                if tok[key] is not None:
                    raise ConfigError(f"{_where(source, f'tokenizer.{key}')}: not supported (cpift does not "
                                      f"edit vocabularies or embeddings)")
                continue
            raise ConfigError(f"{_where(source, f'tokenizer.{key}')}: unknown key")
        src, fld = tok.get("source", "union"), "tokenizer.source"
    if src is None:
        return None
    if src == "union":
        raise ConfigError(f"{_where(source, fld)}: 'union' builds a new vocabulary and remaps embeddings, "
                          f"which cpift does not do; use 'base', a model path, or leave it out")
    if src == "base":
        return "base"
    return _model_ref(src, fld, source)


def _check_values(method: str, models: tuple[ModelSpec, ...], base: str | None,
                  params: dict, slice_params: dict, source, slice_form: bool) -> None:
    """Checks that need no files: model counts, duplicates, required values, a linear weight sum of 0."""
    names = [m.model for m in models]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"{_where(source, models[i].field + '.model')}: '{n}' is listed twice")
    listed_base = base is not None and base in names
    if slice_form and base is not None and not listed_base and method != "linear":
        raise ConfigError(f"{_where(source, 'slices[0].sources')}: base_model '{base}' must be one of the "
                          f"sources (in slices form mergekit does not add it)")
    # In models form mergekit adds an unlisted base_model as one more input (linear too).
    inputs = len(models) + (0 if listed_base or base is None or slice_form else 1)
    if method == "slerp":
        if base is None:
            raise ConfigError(f"{_where(source, 'base_model')}: missing; slerp needs it (t = 0 gives it)")
        if inputs != 2:
            raise ConfigError(f"{_where(source, 'models')}: slerp merges exactly two models, base_model and "
                              f"one other; got {inputs}")
    elif method in DELTA_METHODS:
        if base is None:
            raise ConfigError(f"{_where(source, 'base_model')}: missing; {method} merges deltas from it")
        if inputs - 1 < 1:
            raise ConfigError(f"{_where(source, 'models')}: {method} needs at least one model besides "
                              f"base_model")
    elif inputs < 2:
        raise ConfigError(f"{_where(source, 'models')}: linear needs at least two models, got {inputs}")

    # Required parameters must have a value in some scope.
    # (A value that covers only some tensors is caught per tensor when the merge validates its inputs.)
    def covered(spec: ModelSpec | None, key: str) -> bool:
        return _first(spec, key, slice_params, params) is not None

    if method == "slerp" and not covered(None, "t"):
        raise ConfigError(f"{_where(source, 'parameters.t')}: missing; slerp needs t in [0, 1] "
                          f"(0 gives base_model)")
    weighted = [] if method == "slerp" else [m for m in models if method == "linear" or m.model != base]
    if method == "linear" and base is not None and not listed_base and not slice_form:
        weighted.append(ModelSpec(base, {}, "base_model"))
    for m in weighted:
        if not covered(m, "weight"):
            fld = "parameters.weight" if m.field == "base_model" else f"{m.field}.parameters.weight"
            why = (" (as in mergekit, a base_model missing from models is an input of a linear merge, and "
                   "it takes the top-level weight)" if m.field == "base_model" else "")
            raise ConfigError(f"{_where(source, fld)}: missing; {method} needs a weight for every model "
                              f"(mergekit has no default){why}; set it for this model or under the "
                              f"top-level parameters")
    if method == "linear":
        ws = [_first(m, "weight", slice_params, params) for m in weighted]
        if all(w is not None and _is_constant(w) for w in ws) and sum(ws) == 0:
            raise ConfigError(f"{_where(source, 'models')}: the weights sum to 0 (a linear merge divides "
                              f"by their sum)")


def _first(spec: ModelSpec | None, key: str, slice_params: Mapping, params: Mapping) -> Setting | None:
    for scope in ((spec.parameters if spec else {}), slice_params, params):
        if key in scope:
            return scope[key]
    return None


def load_config(path: str | os.PathLike) -> MergeConfig:
    """Read and validate a mergekit YAML config (``yaml.safe_load``); nothing on disk but it is read.

    Args:
        path: the ``.yml`` file.

    Returns:
        MergeConfig, every value validated.

    Raises:
        ConfigError: naming the file and the field (``models[1].parameters.weight: ...``), or the line
            and column of a YAML syntax error.

    Example:
        >>> cfg = load_config("slerp.yml")
        >>> cfg.method, cfg.base_model
        ('slerp', 'models/base')
    """
    source = Path(path)
    data = _read_yaml(source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level (merge_method, models, ...), "
                          f"got {type(data).__name__}")
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{source}: {key}: unknown key (known: {', '.join(_TOP_KEYS)})")
    method = data.get("merge_method")
    if method is None:
        raise ConfigError(f"{source}: merge_method: missing (one of {', '.join(METHODS)})")
    if method not in METHODS:
        raise ConfigError(f"{source}: merge_method: {method!r} is not supported by cpift (supported: "
                          f"{', '.join(METHODS)})")
    if data.get("modules"):
        raise ConfigError(f"{source}: modules: multi-module configs are not supported; use models:")
    if data.get("chat_template") is not None:
        raise ConfigError(f"{source}: chat_template: not supported (cpift copies the tokenizer files as "
                          f"they are); set the template in the output's tokenizer_config.json afterwards")
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{source}: name: expected a string, got {name!r}")

    has_models, has_slices = data.get("models") is not None, data.get("slices") is not None
    if has_models == has_slices:
        raise ConfigError(f"{source}: models: give exactly one of 'models' and 'slices'")
    base = data.get("base_model")
    if base is not None:
        base = _model_ref(base, "base_model", source)
    slice_params: dict = {}
    layer_range = None
    if has_models:
        raw_models = data["models"]
        if not isinstance(raw_models, list) or not raw_models:
            raise ConfigError(f"{source}: models: expected a non-empty list of {{model, parameters}}")
        models = tuple(_parse_model(m, f"models[{i}]", source, method, slice_form=False)[0]
                       for i, m in enumerate(raw_models))
    else:
        listed, layer_range, slice_base, slice_params = _parse_slices(data["slices"], source, method)
        models = tuple(listed)
        if slice_base is not None:
            if base is not None and slice_base != base:
                raise ConfigError(f"{source}: slices[0].base_model: '{slice_base}' differs from the "
                                  f"top-level base_model '{base}'")
            base = slice_base
    params = _parse_params(data.get("parameters"), "parameters", source, method,
                           _INPUT_PARAMS[method] + _SHARED_PARAMS[method], per_model=False)
    _check_values(method, models, base, params, slice_params, source, slice_form=has_slices)
    return MergeConfig(method=method, models=models, base_model=base, parameters=params,
                       dtype=_dtype(data.get("dtype"), "dtype", source),
                       out_dtype=_dtype(data.get("out_dtype"), "out_dtype", source),
                       source=source, slice_parameters=slice_params, layer_range=layer_range,
                       tokenizer_source=_tokenizer_source(data, source), name=name, raw=data)


# --------------------------------------------------------------------------------------------------
# From a config to one call of cpift.merge.methods


@dataclass
class MethodCall:
    """``getattr(cpift.merge.methods, function)(*args, out, **kwargs, **common)``, plus notes."""

    function: str
    args: tuple
    kwargs: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _shared(cfg: MergeConfig, key: str, default: Any) -> Any:
    s = _first(None, key, cfg.slice_parameters, cfg.parameters)
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
              native: Collection[str] = ()) -> MethodCall:
    """The cpift function call a config stands for.

    Args:
        cfg: a loaded config.
        num_layers: ``num_hidden_layers`` of the models (needed when a value is a gradient).
        paths: model reference as written → resolved path (default: the reference itself). Models that
            resolve to the same path are the same model.
        native: keywords the target function accepts beyond the documented contract (``normalize``,
            ``rescale``); such settings are passed on instead of emulated or refused.

    Returns:
        MethodCall with the positional model arguments and the method keywords.

    Raises:
        ConfigError: a normalize/rescale value cpift's function cannot compute; a gradient without
            ``num_layers``; two entries naming one model.
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
        if any(not isinstance(s, bool) and _uses_position(s) for s in settings):
            raise ConfigError(f"{src}: a gradient (list of values) needs the models' num_hidden_layers, "
                              f"which was not found in the first model's config.json")

    def chain(spec: ModelSpec | None, key: str) -> list[Setting]:
        scopes = ((spec.parameters if spec else {}), cfg.slice_parameters, cfg.parameters)
        return [s[key] for s in scopes if key in s]

    def param(spec: ModelSpec | None, key: str, default: float | None, fld: str) -> Param:
        return _chain_param(chain(spec, key), num_layers, default=default, fld=fld, source=src)

    def fld_of(spec: ModelSpec, key: str) -> str:
        if key in spec.parameters:
            return f"{spec.field}.parameters.{key}"
        return f"slices[0].parameters.{key}" if key in cfg.slice_parameters else f"parameters.{key}"

    normalize = _shared(cfg, "normalize", _DEFAULT_NORMALIZE[method])
    # int8_mask needs nothing: mergekit uses it only as the dtype of the TIES sign mask.

    if method == "slerp":
        others = [m for m in cfg.models if path(m.model) != base_key]
        t = param(None, "t", None, "parameters.t")
        return MethodCall("slerp", (path(cfg.base_model), path(others[0].model)), {"t": t}, notes)

    if method == "linear":
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
        return MethodCall("linear", (tuple(path(m.model) for m in specs),), kwargs, notes)

    # task_arithmetic, ties, dare_linear, dare_ties
    specs = [m for m in cfg.models if path(m.model) != base_key]
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
        rescale = _shared(cfg, "rescale", _DEFAULT_RESCALE[method])
        if "rescale" in native:
            kwargs["rescale"] = rescale
        elif rescale != _CPIFT_RESCALE[method]:
            what = ("rescales kept delta entries by 1/density" if _CPIFT_RESCALE[method]
                    else "does not rescale the trimmed deltas")
            raise ConfigError(f"{src}: parameters.rescale: {str(rescale).lower()} is not supported for "
                              f"{method} (cpift's {method} always {what})")
    if "normalize" in native:
        kwargs["normalize"] = normalize
    elif normalize != _CPIFT_NORMALIZE[method]:
        if normalize and method in ("task_arithmetic", "dare_linear"):
            ws = _normalize_weights(ws)
            notes.append("note: normalize: true: the weights are divided by their sum (mergekit divides the "
                         "summed delta instead; equal up to rounding)")
        else:
            default = " (mergekit's default for dare_ties)" if method == "dare_ties" and not normalize else ""
            does = ("divides by the sum of the agreeing weights (TIES disjoint mean)" if normalize is False
                    else "does not divide")
            raise ConfigError(f"{src}: parameters.normalize: {str(normalize).lower()}{default} is not "
                              f"supported for {method}: cpift's {method} always {does}; set normalize: "
                              f"{str(not normalize).lower()} to get that")
    kwargs = {"weights": ws, **kwargs}
    return MethodCall(method, (path(cfg.base_model), tuple(path(m.model) for m in specs)), kwargs, notes)


# --------------------------------------------------------------------------------------------------
# Running it


def resolve_model(ref: str, fld: str, source: str | os.PathLike | None = None) -> Path:
    """A model reference as mergekit reads it: an existing path, relative to the *current working
    directory* (not to the config file), else a Hugging Face repo id (``org/name[@revision]``) already
    in the local Hub cache (nothing is downloaded).

    Raises:
        ConfigError: neither exists.
    """
    if os.path.exists(ref):
        return Path(os.path.abspath(ref))
    repo, _, rev = ref.partition("@")
    if os.path.exists(repo) and rev:
        raise ConfigError(f"{_where(source, fld)}: '{ref}': a revision applies to Hub models only")
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo, revision=rev or None, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means "not in the cache"
            pass
    raise ConfigError(f"{_where(source, fld)}: '{ref}' is not a directory (relative paths are relative to "
                      f"the current directory, {os.getcwd()}, as in mergekit) nor a model in the local "
                      f"Hugging Face cache (download it first, e.g. with cpift-merge pull)")


def _model_config(model_dir: Path) -> dict | None:
    f = model_dir / "config.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else None
    except (OSError, ValueError):
        raise ConfigError(f"{f}: not readable JSON") from None


def _num_layers(conf: dict | None) -> int | None:
    if not conf:
        return None
    for c in (conf, conf.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer"):
            v = c.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _vocabulary(model_dir: Path) -> dict[str, int] | None:
    """token → id of a fast tokenizer (tokenizer.json: model vocab plus added tokens), None if absent."""
    f = model_dir / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        out = (dict(vocab) if isinstance(vocab, dict)
               else {entry[0]: i for i, entry in enumerate(vocab)})
        for tok in data.get("added_tokens") or []:
            out[tok["content"]] = tok["id"]
        return out
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        raise ConfigError(f"{f}: not a readable tokenizer.json") from None


def _check_tokenizer(cfg: MergeConfig, tok_dir: Path, dirs: list[Path], first: Path) -> None:
    """tokenizer_source is exact in cpift only when mergekit's vocabulary remapping is the identity."""
    fld = f"{cfg.source}: tokenizer_source"
    ref = _vocabulary(tok_dir)
    if ref is None:
        raise ConfigError(f"{fld}: {tok_dir} has no tokenizer.json, so cpift cannot check that every model "
                          f"shares its vocabulary (mergekit would remap embeddings); leave tokenizer_source "
                          f"out to copy the tokenizer of base_model")
    for d in dirs:
        voc = _vocabulary(d)
        if voc is None:
            raise ConfigError(f"{fld}: {d} has no tokenizer.json, so cpift cannot check its vocabulary "
                              f"against {tok_dir}'s; leave tokenizer_source out")
        if voc != ref:
            raise ConfigError(f"{fld}: {d} and {tok_dir} have different vocabularies; mergekit would remap "
                              f"the embedding rows, which cpift does not do")
    conf = _model_config(first) or {}
    size = conf.get("vocab_size", (conf.get("text_config") or {}).get("vocab_size"))
    if size != len(ref) or max(ref.values(), default=-1) >= len(ref):
        raise ConfigError(f"{fld}: the tokenizer has {len(ref)} tokens but the embeddings have {size} rows; "
                          f"mergekit would resize them to the tokenizer, which cpift does not do; leave "
                          f"tokenizer_source out")


def run_config(path: str | os.PathLike, out: str | os.PathLike, *, seed: int = 0, **common) -> Any:
    """Run a mergekit YAML config with cpift.

    Model references are resolved as mergekit does: a relative path is relative to the current working
    directory (not to the config file); a name that is no path is looked up in the local Hub cache.
    ``num_hidden_layers`` comes from the first listed model's config.json. The config's ``dtype`` and
    ``out_dtype`` (default: ``dtype``) apply unless given here; config.json and the tokenizer are copied
    from ``tokenizer_source`` if set, else from base_model, else from the first model.

    Args:
        path: the YAML file.
        out: output directory.
        seed: seed of the DARE drop masks (mergekit's ``--random-seed``); ignored by other methods.
        **common: keywords of every cpift merge function (``dtype``, ``out_dtype``, ``max_shard_size``,
            ``overwrite``, ``allow_nonfinite``, ``copy_tokenizer_from``, ``progress``); a value that is
            not None here overrides the config.

    Returns:
        MergeResult of the method run; its notes include the config's notes.

    Raises:
        ConfigError: the config, or a model it names, is unusable; and whatever the method raises.

    Example:
        >>> run_config("ties.yml", "merged", max_shard_size="2GB")
    """
    cfg = load_config(path)
    src = cfg.source
    paths = {m.model: resolve_model(m.model, f"{m.field}.model", src) for m in cfg.models}
    if cfg.base_model is not None and cfg.base_model not in paths:
        paths[cfg.base_model] = resolve_model(cfg.base_model, "base_model", src)
    first = paths[cfg.models[0].model]
    num_layers = _num_layers(_model_config(first))
    if cfg.layer_range is not None:
        for m in cfg.models:
            n = _num_layers(_model_config(paths[m.model]))
            if n is None:
                raise ConfigError(f"{src}: {m.field}.layer_range: no num_hidden_layers in "
                                  f"{paths[m.model] / 'config.json'} to check the range against")
            if cfg.layer_range != (0, n):
                raise ConfigError(f"{src}: {m.field}.layer_range: {list(cfg.layer_range)} does not cover "
                                  f"the model's {n} layers; partial layer ranges are not supported "
                                  f"(use [0, {n}])")
    donor = paths[cfg.base_model] if cfg.base_model is not None else first
    if cfg.tokenizer_source is not None:
        tok = (donor if cfg.tokenizer_source == "base"
               else paths.get(cfg.tokenizer_source)
               or resolve_model(cfg.tokenizer_source, "tokenizer_source", src))
        _check_tokenizer(cfg, tok, list(dict.fromkeys(paths.values())), first)
        donor = tok

    from . import methods  # the engine, only once the config is known to be good

    fn = getattr(methods, cfg.method)
    native = {k for k in ("normalize", "rescale") if k in inspect.signature(fn).parameters}
    call = plan_call(cfg, num_layers=num_layers, paths=paths, native=native)
    if cfg.method in ("dare_linear", "dare_ties"):
        call.kwargs["seed"] = seed
    settings = {"dtype": cfg.dtype, "out_dtype": cfg.out_dtype or cfg.dtype, "copy_tokenizer_from": donor,
                "recipe": {"format": "mergekit", "config_file": os.fspath(path), "config": dict(cfg.raw)}}
    settings.update({k: v for k, v in common.items() if v is not None})
    result = fn(*call.args, out, **call.kwargs, **settings)
    result.notes.extend(call.notes)
    return result
