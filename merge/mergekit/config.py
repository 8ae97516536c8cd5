"""mergekit-compatible YAML configs: ``cpift-merge config FILE.yml -o OUT`` runs a mergekit user's
config unchanged for the registered methods (merge/methods/registry.py: linear, slerp, task_arithmetic,
ties, dare_linear, dare_ties, model_stock), with mergekit 0.1.5's semantics; anything cpift cannot
compute so is refused with a ConfigError naming the file and the field, before any tensor is read.

Pipeline: ``load_config`` (YAML → MergeConfig, here) → ``plan_call``, ``run_config`` (plan.py); values.py.

Defaults (mergekit 0.1.5's; the registry's MergekitSpec): none for ``weight`` and slerp's ``t`` (a
model without one is an error), ``density`` 1, ``lambda`` 1.

Mapping onto cpift (``base`` = ``base_model``; it may also be listed in ``models``)
    linear           linear(models, weights) — a base_model missing from ``models`` is added as the last
                     input, as mergekit does (it then needs the top-level weight).
    slerp            slerp(base, other, t) — exactly two models, one of them base_model (t = 0 gives it).
    task_arithmetic, ties, dare_linear, dare_ties
                     fn(base, others, weights, density, lam) — the base's own delta is zero, so it is
                     dropped from ``models`` (its per-model parameters have no effect; a note says so).
    model_stock      model_stock(base, others, filter_wise) — base_model and ≥ 2 others, no per-model keys.

Refused, with the reason in the message
    * other merge methods, ``modules``, ``tokenizer.tokens``, ``chat_template``, ``residual_weight``
      (``model+lora`` runs: merge/io/lora.py);
    * ``slices`` other than one slice spanning every layer, or a passthrough stack (stack.py);
    * ``tokenizer_source: union``, and ``base`` / a path unless every tokenizer.json holds the same
      vocabulary, of config.json's vocab_size (mergekit's remapping is then the identity: a copy is exact);
    * ``normalize`` / ``rescale`` values whose arithmetic cpift's function does not perform (``normalize:
      false`` for ties); ``normalize: true`` for task_arithmetic / dare_linear divides the weights by their
      sum (mergekit the summed delta: equal up to rounding), or sets the function's own keyword;
    * a per-tensor ``lambda`` or boolean; unknown keys anywhere (a typo should not change a merge).
    ``int8_mask`` is accepted and has no effect: in mergekit it only changes the dtype of the sign mask.

cpift's own settings go in a top-level ``cpift:`` mapping (the recipes cpift writes use it): ``seed``,
``global_trim``, ``max_shard_size``, ``copy_tokenizer_from``.

Value ranges are checked up front (t ∈ [0, 1], density ∈ (0, 1], finite weight and lambda, a non-zero
constant linear weight sum). Known differences: DARE's drops come from cpift's counter-based RNG
(``seed``), and its rescale is 1/density where mergekit keeps the delta's L1 norm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cpift.errors import ConfigError
from cpift.merge.io.safe_parse import load_yaml_bounded
from cpift.merge.mergekit.stack import StackSlice, parse_stack
from cpift.merge.mergekit.values import (Setting, is_constant, located, parse_cpift_block, parse_setting,
                                         slice_sources)
from cpift.merge.methods.registry import METHODS as REGISTRY, mergekit_methods


# The methods a config can name and mergekit 0.1.5's parameters of each (per model, whole merge)
# are the registry's (merge/methods/registry.py), read when a config is loaded.
METHODS = mergekit_methods()  # as registered at import


def _input_params(method: str) -> tuple[str, ...]:
    return REGISTRY[method].mergekit.inputs


def _shared_params(method: str) -> tuple[str, ...]:
    return REGISTRY[method].mergekit.shared

_TOP_KEYS = ("merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "modules", "name", "cpift")
_DTYPES = ("bfloat16", "float16", "float32", "float64")

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

    ``models`` keeps the listed order (base_model too, if listed). ``parameters``: the top-level ones,
    ``slice_parameters``: the single slice's; model references as written (``run_config`` resolves them).
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
    cpift: Mapping[str, Any] = field(default_factory=dict)  # values.parse_cpift_block
    stack: tuple[StackSlice, ...] = ()  # passthrough slices (merge/mergekit/stack.py)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    return load_yaml_bounded(text, source=path)


def _mapping(raw: Any, fld: str, source, what: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{located(source, fld)}: expected {what}, got {raw!r}")
    return raw


def _model_ref(raw: Any, fld: str, source) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{located(source, fld)}: expected a model directory or Hugging Face repo id, "
                          f"got {raw!r}")
    if raw.count("+") > 1:
        raise ConfigError(f"{located(source, fld)}: '{raw}' has more than one '+' (model+lora)")
    if any(part.count("@") > 1 for part in raw.split("+")):
        raise ConfigError(f"{located(source, fld)}: '{raw}' has more than one '@' (path@revision)")
    return raw


def _parse_params(raw: Any, fld: str, source, method: str, allowed: tuple[str, ...],
                  per_model: bool) -> dict[str, Setting]:
    params = _mapping(raw, fld, source, "a mapping of parameter names to values")
    out = {}
    for key, val in params.items():
        kfld = f"{fld}.{key}"
        if key not in allowed:
            if per_model and key in _shared_params(method):
                raise ConfigError(f"{located(source, kfld)}: '{key}' applies to the whole merge in "
                                  f"{method} (mergekit ignores it here); move it to the top-level parameters")
            known = ", ".join(allowed) or "none"
            scope = "per-model parameters" if per_model else "parameters"
            raise ConfigError(f"{located(source, kfld)}: unknown parameter for {method} ({scope}: {known})")
        if key == "lambda" and (isinstance(val, (list, dict))):
            raise ConfigError(f"{located(source, kfld)}: expected one number; a per-tensor lambda is not "
                              f"supported by cpift")
        out[key] = parse_setting(val, key, kfld, source)
    return out


def _parse_model(raw: Any, fld: str, source, method: str, slice_form: bool) -> tuple[ModelSpec, Any]:
    keys = ("model", "parameters", "layer_range") if slice_form else ("model", "parameters")
    if not isinstance(raw, dict):
        raise ConfigError(f"{located(source, fld)}: expected a mapping with a 'model' key, got {raw!r}")
    for key in raw:
        if key not in keys:
            hint = " (layer_range belongs to slices: sources)" if key == "layer_range" else ""
            raise ConfigError(f"{located(source, f'{fld}.{key}')}: unknown key{hint}")
    if "model" not in raw:
        raise ConfigError(f"{located(source, f'{fld}.model')}: missing")
    ref = _model_ref(raw["model"], f"{fld}.model", source)
    params = _parse_params(raw.get("parameters"), f"{fld}.parameters", source, method,
                           _input_params(method), per_model=True)
    return ModelSpec(ref, params, fld), raw.get("layer_range")


def _parse_slices(raw: Any, source, method: str):
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{located(source, 'slices')}: expected a non-empty list of slices")
    if len(raw) != 1:
        raise ConfigError(f"{located(source, 'slices')}: {len(raw)} slices stack layer ranges into a new "
                          f"model; cpift merges whole models, so only one slice covering every layer is "
                          f"supported (or use models:)")
    sl = _mapping(raw[0], "slices[0]", source, "a mapping with 'sources'")
    sources = slice_sources(sl, "slices[0]", source)
    models, ranges = [], []
    for i, s in enumerate(sources):
        fld = f"slices[0].sources[{i}]"
        spec, lr = _parse_model(s, fld, source, method, slice_form=True)
        if lr is None:
            raise ConfigError(f"{located(source, f'{fld}.layer_range')}: missing")
        if (not isinstance(lr, list) or len(lr) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)):
            raise ConfigError(f"{located(source, f'{fld}.layer_range')}: expected [start, end] integers, "
                              f"got {lr!r}")
        if lr[0] != 0 or lr[1] <= 0:
            raise ConfigError(f"{located(source, f'{fld}.layer_range')}: {lr} is a partial layer range; "
                              f"partial layer ranges are not supported (cpift merges whole models: use "
                              f"[0, num_hidden_layers], or models:)")
        models.append(spec)
        ranges.append(tuple(lr))
    for i, lr in enumerate(ranges):
        if lr != ranges[0]:
            raise ConfigError(f"{located(source, f'slices[0].sources[{i}].layer_range')}: {list(lr)} differs "
                              f"from {list(ranges[0])}; partial layer ranges are not supported")
    base = sl.get("base_model")
    if base is not None:
        base = _model_ref(base, "slices[0].base_model", source)
    params = _parse_params(sl.get("parameters"), "slices[0].parameters", source, method,
                           _input_params(method) + _shared_params(method), per_model=False)
    return models, ranges[0], base, params


def _dtype(raw: Any, fld: str, source) -> str | None:
    if raw is None:
        return None
    name = raw.removeprefix("torch.") if isinstance(raw, str) else raw
    if name not in _DTYPES:
        raise ConfigError(f"{located(source, fld)}: expected one of {', '.join(_DTYPES)}, got {raw!r}")
    return name


def _tokenizer_source(data: dict, source) -> str | None:
    src = data.get("tokenizer_source")
    tok = data.get("tokenizer")
    fld = "tokenizer_source"
    if tok is not None:
        if src is not None:
            raise ConfigError(f"{located(source, 'tokenizer')}: give tokenizer or tokenizer_source, not both")
        tok = _mapping(tok, "tokenizer", source, "a mapping")
        for key in tok:
            if key == "source":
                continue
            if key in ("tokens", "pad_to_multiple_of"):
                if tok[key] is not None:
                    raise ConfigError(f"{located(source, f'tokenizer.{key}')}: not supported (cpift does not "
                                      f"edit vocabularies or embeddings)")
                continue
            raise ConfigError(f"{located(source, f'tokenizer.{key}')}: unknown key")
        src, fld = tok.get("source", "union"), "tokenizer.source"
    if src is None:
        return None
    if src == "union":
        raise ConfigError(f"{located(source, fld)}: 'union' builds a new vocabulary and remaps embeddings, "
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
            raise ConfigError(f"{located(source, models[i].field + '.model')}: '{n}' is listed twice")
    listed_base = base is not None and base in names
    if slice_form and base is not None and not listed_base and method != "linear":
        raise ConfigError(f"{located(source, 'slices[0].sources')}: base_model '{base}' must be one of the "
                          f"sources (in slices form mergekit does not add it)")
    # In models form mergekit adds an unlisted base_model as one more input (linear too).
    inputs = len(models) + (0 if listed_base or base is None or slice_form else 1)
    if REGISTRY[method].roles == ("model",):
        if inputs != 1 and not slice_form:  # a stack's slices are checked in stack.py
            raise ConfigError(f"{located(source, 'models')}: {method} takes one model (with base_model, if "
                              f"not listed, counted), got {inputs}; stack layer ranges with slices:")
    elif REGISTRY[method].roles == ("model_a", "model_b"):
        if base is None:
            raise ConfigError(f"{located(source, 'base_model')}: missing; slerp needs it (t = 0 gives it)")
        if inputs != 2:
            raise ConfigError(f"{located(source, 'models')}: slerp merges exactly two models, base_model and "
                              f"one other; got {inputs}")
    elif REGISTRY[method].has_base:
        if base is None:
            raise ConfigError(f"{located(source, 'base_model')}: missing; {method} merges deltas from it")
        if inputs - 1 < (need := REGISTRY[method].min_models):
            what = "one model" if need == 1 else f"{need} models"
            raise ConfigError(f"{located(source, 'models')}: {method} needs at least {what} besides base_model, "
                              f"got {inputs - 1}")
    elif inputs < 2:
        raise ConfigError(f"{located(source, 'models')}: linear needs at least two models, got {inputs}")

    # Required parameters must have a value in some scope.
    # (A value that covers only some tensors is caught per tensor when the merge validates its inputs.)
    def covered(spec: ModelSpec | None, key: str) -> bool:
        return first_setting(spec, key, slice_params, params) is not None

    if method == "slerp" and not covered(None, "t"):
        raise ConfigError(f"{located(source, 'parameters.t')}: missing; slerp needs t in [0, 1] "
                          f"(0 gives base_model)")
    weighted = ([] if "weight" not in _input_params(method)
                else [m for m in models if method == "linear" or m.model != base])
    if method == "linear" and base is not None and not listed_base and not slice_form:
        weighted.append(ModelSpec(base, {}, "base_model"))
    for m in weighted:
        if not covered(m, "weight"):
            fld = "parameters.weight" if m.field == "base_model" else f"{m.field}.parameters.weight"
            why = (" (as in mergekit, a base_model missing from models is an input of a linear merge, and "
                   "it takes the top-level weight)" if m.field == "base_model" else "")
            raise ConfigError(f"{located(source, fld)}: missing; {method} needs a weight for every model "
                              f"(mergekit has no default){why}; set it for this model or under the "
                              f"top-level parameters")
    if method == "linear":
        ws = [first_setting(m, "weight", slice_params, params) for m in weighted]
        if all(w is not None and is_constant(w) for w in ws) and sum(ws) == 0:
            raise ConfigError(f"{located(source, 'models')}: the weights sum to 0 (a linear merge divides "
                              f"by their sum)")


def first_setting(spec: ModelSpec | None, key: str, slice_params: Mapping, params: Mapping) -> Setting | None:
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
        raise ConfigError(f"{source}: merge_method: missing (one of {', '.join(mergekit_methods())})")
    if method not in mergekit_methods():
        raise ConfigError(f"{source}: merge_method: {method!r} is not supported by cpift (supported: "
                          f"{', '.join(mergekit_methods())})")
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
    layer_range, stack = None, ()
    if has_models:
        raw_models = data["models"]
        if not isinstance(raw_models, list) or not raw_models:
            raise ConfigError(f"{source}: models: expected a non-empty list of {{model, parameters}}")
        models = tuple(_parse_model(m, f"models[{i}]", source, method, slice_form=False)[0]
                       for i, m in enumerate(raw_models))
    elif method == "passthrough":
        if not isinstance(data["slices"], list) or not data["slices"]:
            raise ConfigError(f"{located(source, 'slices')}: expected a non-empty list of slices")
        stack = parse_stack(data["slices"], source, model_ref=_model_ref, parse_params=lambda raw, fld:
                            _parse_params(raw, fld, source, method, ("scale",), per_model=False))
        models = tuple(ModelSpec(m, {}, f"slices[{i}].sources[0]") for m, i in
                       {sl.model: i for i, sl in reversed(list(enumerate(stack)))}.items())
    else:
        listed, layer_range, slice_base, slice_params = _parse_slices(data["slices"], source, method)
        models = tuple(listed)
        if slice_base is not None:
            if base is not None and slice_base != base:
                raise ConfigError(f"{source}: slices[0].base_model: '{slice_base}' differs from the "
                                  f"top-level base_model '{base}'")
            base = slice_base
    params = _parse_params(data.get("parameters"), "parameters", source, method,
                           _input_params(method) + _shared_params(method), per_model=False)
    _check_values(method, models, base, params, slice_params, source, slice_form=has_slices)
    return MergeConfig(method=method, models=models, base_model=base, parameters=params,
                       dtype=_dtype(data.get("dtype"), "dtype", source),
                       out_dtype=_dtype(data.get("out_dtype"), "out_dtype", source),
                       source=source, slice_parameters=slice_params, layer_range=layer_range,
                       tokenizer_source=_tokenizer_source(data, source), name=name, raw=data,
                       cpift=parse_cpift_block(data.get("cpift"), method, source), stack=stack)
