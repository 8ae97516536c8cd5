"""mergekit parameter values for YAML configs: numbers, gradients and filters, evaluated per tensor.

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
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

from cpift.errors import ConfigError
from cpift.merge.methods.registry import METHODS, mergekit_flags
from cpift.numbers import F32_MAX, parse_number, shown

Param = Union[float, Callable[[str], float]]

_BOOL_PARAMS = ("normalize", "rescale", "int8_mask")  # and the registry's flags (mergekit_flags)
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
# or a bool (normalize / rescale / int8_mask / filter_wise, which take plain true/false only).
Setting = Union[float, bool, tuple]


def located(source: str | os.PathLike | None, fld: str) -> str:
    return f"{source}: {fld}" if source else fld


def _number(raw: Any, fld: str, source, what: str = "a number or a list of numbers") -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ConfigError(f"{located(source, fld)}: expected {what}, got {shown(raw)}")
    v = parse_number(raw, located(source, fld), what=what)
    if abs(v) > F32_MAX:
        raise ConfigError(f"{located(source, fld)}: {v:g} overflows float32, in which the merge computes "
                          f"(|value| must be at most {F32_MAX:.7g})")
    return v


def _boolean(raw: Any, fld: str, source) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in _TRUE + _FALSE:
        return raw.strip().lower() in _TRUE
    extra = " (per-tensor values are not supported for it)" if isinstance(raw, (list, dict)) else ""
    raise ConfigError(f"{located(source, fld)}: expected true or false, got {raw!r}{extra}")


def _check_range(name: str, v: float, fld: str, source) -> float:
    if name == "t" and not 0.0 <= v <= 1.0:
        raise ConfigError(f"{located(source, fld)}: {v:g} is outside [0, 1] (t = 0 gives base_model, "
                          f"1 the other model)")
    if name == "distance" and not v >= 0.0:  # nearswap's t
        raise ConfigError(f"{located(source, fld)}: {v:g} is negative (nearswap's t is a distance ≥ 0)")
    if name == "density" and not 0.0 < v <= 1.0:
        raise ConfigError(f"{located(source, fld)}: {v:g} is outside (0, 1] (the share of each delta "
                          f"that is kept)")
    return v


def _scalar_or_gradient(raw: Any, name: str, fld: str, source) -> float | tuple[float, ...]:
    if isinstance(raw, list):
        if any(isinstance(e, (list, dict)) for e in raw):
            bad = next(i for i, e in enumerate(raw) if isinstance(e, (list, dict)))
            raise ConfigError(f"{located(source, f'{fld}[{bad}]')}: expected a number, got {raw[bad]!r}")
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
    if name in _BOOL_PARAMS or name in mergekit_flags():
        return _boolean(raw, fld, source)
    if isinstance(raw, dict) or (isinstance(raw, list) and raw and isinstance(raw[0], dict)):
        entries = [raw] if isinstance(raw, dict) else raw
        conds = []
        for i, e in enumerate(entries):
            efld = fld if isinstance(raw, dict) else f"{fld}[{i}]"
            if not isinstance(e, dict):
                raise ConfigError(f"{located(source, efld)}: expected a {{filter, value}} mapping like the "
                                  f"first entry, got {e!r}")
            unknown = sorted(set(e) - {"filter", "value"})
            if unknown:
                raise ConfigError(f"{located(source, f'{efld}.{unknown[0]}')}: unknown key (a conditional "
                                  f"value has only 'filter' and 'value')")
            if "value" not in e:
                raise ConfigError(f"{located(source, f'{efld}.value')}: missing (each conditional needs a "
                                  f"value; leave out 'filter' for the default)")
            flt = e.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise ConfigError(f"{located(source, f'{efld}.filter')}: expected a substring of tensor "
                                  f"names, got {flt!r}")
            val = e["value"]
            if isinstance(val, dict) or (isinstance(val, list) and any(isinstance(v, dict) for v in val)):
                raise ConfigError(f"{located(source, f'{efld}.value')}: expected a number or a list of "
                                  f"numbers (conditionals do not nest), got {val!r}")
            conds.append(Conditional(flt, _scalar_or_gradient(val, name, f"{efld}.value", source)))
        return tuple(conds)
    return _scalar_or_gradient(raw, name, fld, source)


def split_layer(name: str) -> tuple[str, int, str] | None:
    """``(prefix, i, suffix)`` of a tensor of layer i (``model.layers.3.mlp.up_proj.weight`` →
    ``("model.layers.", 3, ".mlp.up_proj.weight")``), None outside the layers."""
    m = _LAYER_RE.search(name)
    if m is None:
        return None
    return name[:m.start(1)], int(m.group(1)), name[m.end(1):]


def tensor_position(name: str, num_layers: int | None) -> float:
    """mergekit's gradient position of a tensor: i / (L − 1) in layer i of L, 0 outside the layers.

    Raises:
        ConfigError: the name holds a layer index but L is unknown or not above it.
    """
    parts = split_layer(name)
    if parts is None:
        return 0.0
    i = parts[1]
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


def is_constant(s: Setting) -> bool:
    return isinstance(s, (bool, float, int))


def uses_position(s: Setting) -> bool:
    if is_constant(s):
        return False
    if s and isinstance(s[0], Conditional):
        return any(not is_constant(c.value) for c in s)
    return True


def chain_param(chain: list[Setting], num_layers: int | None, *, default: float | None, fld: str,
                 source, position: Callable[[str], float] | None = None) -> Param:
    """One Param from settings in precedence order: a constant when the first one is, else a function.
    ``position``: a tensor's gradient position (default: from its layer index, ``tensor_position``)."""
    if chain and is_constant(chain[0]):
        return float(chain[0])
    if not chain:
        if default is None:
            raise ConfigError(f"{located(source, fld)}: missing")
        return default
    chain = tuple(chain)

    def value(tensor: str) -> float:
        t = None
        for s in chain:
            if t is None and uses_position(s):
                try:
                    t = position(tensor) if position is not None else tensor_position(tensor, num_layers)
                except ConfigError as e:
                    raise ConfigError(f"{located(source, fld)}: {e}") from None
            v = evaluate(s, tensor, t if t is not None else 0.0)
            if v is not None:
                return v
        if default is None:
            raise ConfigError(f"{located(source, fld)}: no value for tensor '{tensor}' (no filter matches "
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
    return chain_param([value], num_layers, default=None, fld=name, source=source)


# --------------------------------------------------------------------------------------------------
# The ``cpift:`` block: settings a mergekit config has no spelling for (recipes write them)

CPIFT_KEYS = {
    "seed": "seed of the random drop masks (dare_linear, dare_ties, della, della_linear)",
    "global_trim": "TIES trim with one magnitude threshold over the whole model (ties)",
    "max_shard_size": "largest output shard, bytes or 500M / 1B (10^9) / 2GB / 1GiB",
    "copy_tokenizer_from": "model directory or Hub id to copy config.json and the tokenizer from",
    "relative_to_recipe": "true: relative paths are relative to this file's directory (recipes cpift writes)",
}


def parse_cpift_block(raw: Any, method: str, source: str | os.PathLike | None = None) -> dict[str, Any]:
    """Validate the top-level ``cpift:`` mapping of a config; return its settings (absent keys left out).

    Raises:
        ConfigError: naming ``cpift.KEY``: an unknown key, a wrong type, or a key the method does not use.
    """
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{located(source, 'cpift')}: expected a mapping of cpift settings "
                          f"({', '.join(CPIFT_KEYS)}), got {raw!r}")
    out: dict[str, Any] = {}
    for key, val in raw.items():
        fld = f"cpift.{key}"
        if key not in CPIFT_KEYS:
            known = "; ".join(f"{k}: {v}" for k, v in CPIFT_KEYS.items())
            raise ConfigError(f"{located(source, fld)}: unknown key (known: {known})")
        if key == "seed":
            seeded = [n for n, spec in METHODS.items() if spec.param("seed") is not None]
            if method not in seeded:
                raise ConfigError(f"{located(source, fld)}: only {', '.join(seeded)} draw random "
                                  f"masks; remove it for {method}")
            if isinstance(val, bool) or not isinstance(val, int):
                raise ConfigError(f"{located(source, fld)}: expected a non-negative integer, got {val!r}")
            val = parse_number(val, located(source, fld), integer=True, lo=0)
        elif key == "global_trim":
            if method != "ties":
                raise ConfigError(f"{located(source, fld)}: only ties trims by magnitude; remove it for "
                                  f"{method}")
            val = _boolean(val, fld, source)
        elif key == "relative_to_recipe":
            val = _boolean(val, fld, source)
        elif key == "max_shard_size":
            from cpift.merge.io.sizes import parse_size, size_bytes

            try:
                if isinstance(val, bool) or not isinstance(val, (int, float, str)):
                    raise ValueError
                size_bytes(val)
            except ValueError:  # ParameterError included
                raise ConfigError(f"{located(source, fld)}: expected a positive size in bytes or like 500M, "
                                  f"1B, 2GB, 1GiB; got {val!r}") from None
            try:
                val = parse_size(val)
            except ValueError as e:  # under 1 MB with a suffix
                raise ConfigError(f"{located(source, fld)}: {str(e).split(': ', 1)[1]}") from None
        elif not isinstance(val, str) or not val.strip():
            raise ConfigError(f"{located(source, fld)}: expected a model directory or Hub id, got {val!r}")
        out[key] = val
    return out


def layer_range(lr: Any, fld: str, source) -> tuple[int, int]:
    """A source's ``layer_range: [start, end]`` (end excluded): integers (cpift.numbers), 0 <= start < end."""
    if lr is None:
        raise ConfigError(f"{located(source, fld)}: missing")
    if (not isinstance(lr, list) or len(lr) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)):
        raise ConfigError(f"{located(source, fld)}: expected [start, end] integers, got {shown(lr)}")
    start, end = (parse_number(x, located(source, fld), integer=True, lo=0, hi=2**31) for x in lr)
    if not start < end:
        raise ConfigError(f"{located(source, fld)}: {lr} is empty or reversed (need 0 <= start < end; end "
                          f"is excluded)")
    return start, end


def slice_sources(sl: Mapping, fld: str, source) -> list:
    """Check one mergekit slice's keys (``fld``: e.g. "slices[0]"); returns its non-empty ``sources``."""
    for key in sl:
        if key not in ("sources", "base_model", "parameters", "residual_weight"):
            raise ConfigError(f"{located(source, f'{fld}.{key}')}: unknown key")
    if sl.get("residual_weight") is not None:
        raise ConfigError(f"{located(source, f'{fld}.residual_weight')}: not supported by cpift")
    sources = sl.get("sources")
    if not isinstance(sources, list) or not sources:
        raise ConfigError(f"{located(source, f'{fld}.sources')}: expected a non-empty list of {{model, layer_range}}")
    return sources
