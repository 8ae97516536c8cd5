"""Checks of a mergekit config that need no files: model counts, duplicates, required values."""

from __future__ import annotations

from cpift.errors import ConfigError
from cpift.merge.mergekit.spec import ModelSpec, first_setting
from cpift.merge.mergekit.values import is_constant, located
from cpift.merge.methods.registry import METHODS as REGISTRY


def check_values(method: str, models: tuple[ModelSpec, ...], base: str | None,
                 params: dict, slice_params: dict, source, slice_form: bool, where: str = "slices[0]") -> None:
    """Checks that need no files: model counts, duplicates, required values, a linear weight sum of 0.
    ``where``: the slice (slices form), named in messages."""
    listing = f"{where}.sources" if slice_form else "models"
    spec = REGISTRY[method]
    _refuse_twice(models, source)
    listed_base = base is not None and base in [m.model for m in models]
    _check_inputs(spec, models, base, listed_base, source, listing, slice_form)
    _check_required(method, slice_params, params, source)
    weighted = _weighted(spec, models, base, listed_base, slice_form)
    for m in weighted:
        if first_setting(m, "weight", slice_params, params) is None:
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


def _refuse_twice(models: tuple[ModelSpec, ...], source) -> None:
    names = [m.model for m in models]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"{located(source, models[i].field + '.model')}: '{n}' is listed twice")


def _check_inputs(spec, models: tuple[ModelSpec, ...], base: str | None, listed_base: bool, source,
                  listing: str, slice_form: bool) -> None:
    """base_model and the number of models, as the method's Inputs want them."""
    if slice_form and base is not None and not listed_base and spec.inputs.base_model_in_sources:
        raise ConfigError(f"{located(source, listing)}: base_model '{base}' must be one of the "
                          f"sources (in slices form mergekit does not add it)")
    missing = spec.inputs.missing_base(spec.name) if base is None else None
    if missing is not None:
        raise ConfigError(f"{located(source, 'base_model')}: {missing}")
    # In models form mergekit adds an unlisted base_model as one more input (linear too).
    inputs = len(models) + (0 if listed_base or base is None or slice_form else 1)
    wrong = spec.inputs.config_count_error(spec.name, inputs, base_given=base is not None, slice_form=slice_form)
    if wrong is not None:
        raise ConfigError(f"{located(source, listing)}: {wrong}")


def _check_required(method: str, slice_params: dict, params: dict, source) -> None:
    """Required parameters must have a value in some scope. (A value that covers only some tensors is
    caught per tensor when the merge validates its inputs.)"""
    if method == "slerp" and first_setting(None, "t", slice_params, params) is None:
        raise ConfigError(f"{located(source, 'parameters.t')}: missing; slerp needs t in [0, 1] "
                          f"(0 gives base_model)")
    if method == "nearswap" and first_setting(None, "t", slice_params, params) is None:
        raise ConfigError(f"{located(source, 'parameters.t')}: missing; nearswap needs a distance t ≥ 0 "
                          f"(mergekit has no default; its reference model uses 0.0001)")


def _weighted(spec, models: tuple[ModelSpec, ...], base: str | None, listed_base: bool,
              slice_form: bool) -> list[ModelSpec]:
    """The models that need a weight: those besides base_model, or, where base_model is counted as a
    model (linear), every model and an unlisted base_model too."""
    if "weight" not in spec.mergekit.inputs:
        return []
    counted = spec.inputs.counts_base_model
    weighted = [m for m in models if counted or m.model != base]
    if counted and base is not None and not listed_base and not slice_form:
        weighted.append(ModelSpec(base, {}, "base_model"))
    return weighted
