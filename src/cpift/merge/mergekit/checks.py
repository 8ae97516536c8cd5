"""Checks of a mergekit config that need no files: model counts, duplicates, required values."""

from __future__ import annotations

from cpift.errors import ConfigError
from cpift.merge.mergekit.spec import ModelSpec, first_setting
from cpift.merge.mergekit.values import is_constant, located
from cpift.merge.methods.registry import METHODS as REGISTRY


def _input_params(method: str) -> tuple[str, ...]:
    return REGISTRY[method].mergekit.inputs


def _check_count(spec, models: int, source, has_base: bool, listing: str = "models") -> None:
    """nuslerp (2 models), multislerp, karcher (1 or more): base_model aside where it is the origin."""
    lo, hi = spec.min_models, spec.max_models
    if models < lo or (hi is not None and models > hi):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}"
        besides = (" besides base_model" if spec.optional_base else " (base_model, if not listed, counted)"
                   ) if has_base else ""
        raise ConfigError(f"{located(source, listing)}: {spec.name} merges {want} model"
                          f"{'s' if lo > 1 else ''}{besides}, got {models}")


def check_values(method: str, models: tuple[ModelSpec, ...], base: str | None,
                  params: dict, slice_params: dict, source, slice_form: bool, where: str = "slices[0]") -> None:
    """Checks that need no files: model counts, duplicates, required values, a linear weight sum of 0.
    ``where``: the slice (slices form), named in messages."""
    listing = f"{where}.sources" if slice_form else "models"
    names = [m.model for m in models]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"{located(source, models[i].field + '.model')}: '{n}' is listed twice")
    listed_base = base is not None and base in names
    if slice_form and base is not None and not listed_base and method != "linear":
        raise ConfigError(f"{located(source, listing)}: base_model '{base}' must be one of the "
                          f"sources (in slices form mergekit does not add it)")
    # In models form mergekit adds an unlisted base_model as one more input (linear too).
    inputs = len(models) + (0 if listed_base or base is None or slice_form else 1)
    if REGISTRY[method].roles == ("model",):
        if inputs != 1 and not slice_form:  # a stack's slices are checked in stack.py
            raise ConfigError(f"{located(source, listing)}: {method} takes one model (with base_model, if "
                              f"not listed, counted), got {inputs}; stack layer ranges with slices:")
    elif REGISTRY[method].roles == ("model_a", "model_b"):
        if base is None:
            raise ConfigError(f"{located(source, 'base_model')}: missing; {method} needs it (t = 0 gives it)")
        if inputs != 2:
            raise ConfigError(f"{located(source, listing)}: {method} merges exactly two models, base_model and "
                              f"one other; got {inputs}")
    elif REGISTRY[method].optional_base or (REGISTRY[method].roles == ("models",) and method != "linear"):
        _check_count(REGISTRY[method], inputs - (base is not None and REGISTRY[method].optional_base), source,
                     base is not None, listing)
    elif REGISTRY[method].has_base:
        if base is None:
            raise ConfigError(f"{located(source, 'base_model')}: missing; {method} merges deltas from it")
        if inputs - 1 < (need := REGISTRY[method].min_models):
            what = "one model" if need == 1 else f"{need} models"
            raise ConfigError(f"{located(source, listing)}: {method} needs at least {what} besides base_model, "
                              f"got {inputs - 1}")
    elif inputs < 2:
        raise ConfigError(f"{located(source, listing)}: linear needs at least two models, got {inputs}")

    # Required parameters must have a value in some scope.
    # (A value that covers only some tensors is caught per tensor when the merge validates its inputs.)
    def covered(spec: ModelSpec | None, key: str) -> bool:
        return first_setting(spec, key, slice_params, params) is not None

    if method == "slerp" and not covered(None, "t"):
        raise ConfigError(f"{located(source, 'parameters.t')}: missing; slerp needs t in [0, 1] "
                          f"(0 gives base_model)")
    if method == "nearswap" and not covered(None, "t"):
        raise ConfigError(f"{located(source, 'parameters.t')}: missing; nearswap needs a distance t ≥ 0 "
                          f"(mergekit has no default; its reference model uses 0.0001)")
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
            raise ConfigError(f"{located(source, listing)}: the weights sum to 0 (a linear merge divides "
                              f"by their sum)")
