"""mergekit-compatible YAML configs: ``cpift-merge config FILE.yml -o OUT`` runs a mergekit user's
config unchanged for every method the registry gives a mergekit name (merge/methods/registry.py; the list:
docs/methods.md), with mergekit 0.1.5's semantics; anything cpift cannot
compute so is refused with a ConfigError naming the file and the field, before any tensor is read.

Pipeline: ``load_config`` (YAML → MergeConfig, here; spec.py, checks.py) → ``plan_call`` (plan.py) →
``run_config`` (run.py); values in values.py, tokenizer fields in tokenizers.py, passthrough layer stacks
in stack.py, ``slices`` merged by a method (several slices, partial or shifted ``layer_range``s, per-slice
``base_model`` and parameters) in slices.py; one slice spanning every layer is the ``models:`` form.

Defaults (mergekit 0.1.5's; the registry's MergekitSpec): none for ``weight`` and slerp's ``t`` (a
model without one is an error), ``density`` 1, ``lambda`` 1.

Mapping onto cpift (``base`` = ``base_model``; it may also be listed in ``models``)
    linear           linear(models, weights) — a base_model missing from ``models`` is added as the last
                     input, as mergekit does (it then needs the top-level weight).
    slerp            slerp(base, other, t) — exactly two models, one of them base_model (t = 0 gives it).
    task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear
                     fn(base, others, weights, density, lam, ...) — the base's own delta is zero, so it is
                     dropped from ``models`` (its per-model parameters have no effect; a note says so);
                     breadcrumbs' ``gamma`` and della's ``epsilon`` per model, as ``density``.
    model_stock      model_stock(base, others, filter_wise) — base_model and ≥ 2 others, no per-model keys.
    nuslerp, multislerp
                     fn(others, weights, base=base_model or None, ...) — base_model optional (mergekit's
                     BasePolicy.OPTIONAL: the origin of the deltas), dropped from ``models`` when listed;
                     nuslerp exactly two others; ``nuslerp_flatten``, ``nuslerp_row_wise`` / ``normalize_weights``,
                     ``eps`` shared.
    karcher          karcher(models, max_iter, tol) — every model an input; an unlisted base_model is added
                     as the last, as mergekit does; no per-model keys.
    sce              sce(base, others, select_topk) — base_model and ≥ 1 other, no per-model keys (mergekit's
                     sce has no weight); select_topk may vary per tensor; int8_mask has no effect.
    nearswap         nearswap(base, other, t) — exactly two models, one of them base_model; t is a distance
                     ≥ 0 (no upper bound, unlike slerp's), required.
    passthrough      passthrough(model, scale) — one model (or base_model alone); several ``slices`` stack
                     layers (stack.py).

Refused, with the reason in the message
    * other merge methods, ``modules``, ``residual_weight`` (``model+lora`` runs: merge/io/lora.py);
    * in ``slices``: unequal range lengths within a slice, slices with different numbers of sources,
      a whole-merge value (``lambda``, ``normalize``) that differs between slices (slices.py);
    * a passthrough stack, or slices stacked by a method, whose tokenizer field would remap embedding
      rows (vocabularies that differ);
    * ``tokenizer.tokens`` sources that are no merged model, or a token missing from its source model
      (``tokenizer_source``, ``tokenizer:`` and ``chat_template`` run: merge/tokenizer/, tokenizers.py);
    * ``normalize`` / ``rescale`` values whose arithmetic cpift's function does not perform (``rescale:
      false`` for dare_linear / dare_ties, whose kept entries cpift always scales by 1/density);
      ``normalize: true`` for task_arithmetic / dare_linear divides the weights by their sum (mergekit the
      summed delta: equal up to rounding), or sets the function's own keyword (ties: ``normalize`` and
      ``rescale``, mergekit's L1 rescale of the trimmed deltas; dare_ties, breadcrumbs, della: theirs);
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
from typing import Any

from cpift.errors import ConfigError
from cpift.merge.io.safe_parse import load_yaml_file
from cpift.merge.mergekit.checks import check_values
from cpift.merge.mergekit.slices import parse_slices, slice_models
from cpift.merge.mergekit.spec import MergeConfig, ModelSpec
from cpift.merge.mergekit.stack import parse_stack
from cpift.merge.mergekit.tokenizers import parse_chat_template, parse_tokenizer_source
from cpift.merge.mergekit.values import Setting, located, parse_cpift_block, parse_setting
from cpift.merge.methods.registry import METHODS as REGISTRY
from cpift.merge.methods.registry import mergekit_methods

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
        # t is slerp's factor in [0, 1], but a distance ≥ 0 for a method whose t has no upper bound (nearswap)
        t_spec = REGISTRY[method].param("t") if key == "t" else None
        out[key] = parse_setting(val, "distance" if t_spec and t_spec.hi > 1 else key, kfld, source)
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


def _dtype(raw: Any, fld: str, source) -> str | None:
    if raw is None:
        return None
    name = raw.removeprefix("torch.") if isinstance(raw, str) else raw
    if name not in _DTYPES:
        raise ConfigError(f"{located(source, fld)}: expected one of {', '.join(_DTYPES)}, got {raw!r}")
    return name


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
    data = load_yaml_file(source, what="config")
    method, name = _check_top(data, source)
    base = data.get("base_model")
    if base is not None:
        base = _model_ref(base, "base_model", source)
    params = _parse_params(data.get("parameters"), "parameters", source, method,
                           _input_params(method) + _shared_params(method), per_model=False)
    if data.get("models") is not None:
        form = _Form(_parse_models(data["models"], source, method))
    elif method == "passthrough":
        form = _stack_form(data["slices"], source)
    else:
        form = _slices_form(data["slices"], source, method, base, params)
        base = base if base is not None else form.slices[0].base_model
    if not form.slices:  # each slice is checked by parse_slices
        check_values(method, form.models, base, params, form.slice_params, source,
                     slice_form=data.get("slices") is not None)
    return MergeConfig(method=method, models=form.models, base_model=base, parameters=params,
                       dtype=_dtype(data.get("dtype"), "dtype", source),
                       out_dtype=_dtype(data.get("out_dtype"), "out_dtype", source),
                       source=source, slice_parameters=form.slice_params, layer_range=form.layer_range,
                       tokenizer_source=parse_tokenizer_source(data, source, _model_ref), name=name, raw=data,
                       cpift=parse_cpift_block(data.get("cpift"), method, source), stack=form.stack,
                       slices=form.slices)


def _check_top(data: Any, source: Path) -> tuple[str, str | None]:
    """The top level's keys, merge_method, modules, chat_template and name checked; (method, name)."""
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
    parse_chat_template(data.get("chat_template"), source)  # tokenizers.py; written by merge/tokenizer/
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{source}: name: expected a string, got {name!r}")
    if (data.get("models") is not None) == (data.get("slices") is not None):
        raise ConfigError(f"{source}: models: give exactly one of 'models' and 'slices'")
    return method, name


@dataclass(frozen=True)
class _Form:
    """The inputs of a config, from its ``models:`` or its ``slices:``."""

    models: tuple[ModelSpec, ...]
    slice_params: dict = field(default_factory=dict)
    layer_range: Any = None
    stack: tuple = ()
    slices: tuple = ()


def _parse_models(raw_models: Any, source: Path, method: str) -> tuple[ModelSpec, ...]:
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError(f"{source}: models: expected a non-empty list of {{model, parameters}}")
    return tuple(_parse_model(m, f"models[{i}]", source, method, slice_form=False)[0]
                 for i, m in enumerate(raw_models))


def _stack_form(raw_slices: Any, source: Path) -> _Form:
    """A passthrough layer stack (stack.py); its models are each slice's source, in first-use order."""
    if not isinstance(raw_slices, list) or not raw_slices:
        raise ConfigError(f"{located(source, 'slices')}: expected a non-empty list of slices")
    stack = parse_stack(raw_slices, source, model_ref=_model_ref, parse_params=lambda raw, fld:
                        _parse_params(raw, fld, source, "passthrough", ("scale",), per_model=False))
    models = tuple(ModelSpec(m, {}, f"slices[{i}].sources[0]") for m, i in
                   {sl.model: i for i, sl in reversed(list(enumerate(stack)))}.items())
    return _Form(models, stack=stack)


def _slices_form(raw_slices: Any, source: Path, method: str, base: str | None, params: dict) -> _Form:
    """Slices merged by the method (slices.py); one slice spanning every layer is the models: form."""
    allowed = _input_params(method) + _shared_params(method)
    slices = parse_slices(raw_slices, source, method, base, params, model_ref=_model_ref,
                          parse_model=lambda raw, fld: _parse_model(raw, fld, source, method, slice_form=True),
                          parse_params=lambda raw, fld: _parse_params(raw, fld, source, method, allowed,
                                                                      per_model=False))
    models = slices[0].sources if len(slices) == 1 else slice_models(slices)
    slice_params = dict(slices[0].parameters) if len(slices) == 1 else {}
    return _Form(models, slice_params, slices[0].ranges[0], slices=slices)
