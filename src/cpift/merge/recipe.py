"""The generated recipe of a merge output: the mergekit config that ``cpift-merge config`` runs to write
the same bytes (merge/card.py writes it as cpift_recipe.yml beside the card).

For the registered mergekit methods it is generated from the call's parameters, the inputs' places
coming from the method's ``Inputs``; what mergekit has no spelling for (DARE seed, TIES global trim,
shard size, tokenizer donor) goes under ``cpift:`` (validated by values.parse_cpift_block). Local inputs
are written relative to the output (``local_ref``) and Hub inputs as ``org/name@<commit>`` of the
snapshot that was read. A parameter that is a Python function of the tensor name has no generated form.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from cpift.merge.methods.registry import METHODS, MethodSpec, declared_recipe, mergekit_methods


def local_ref(path: str | os.PathLike, out: str | os.PathLike | None) -> str:
    """A local path as an output's card and recipe record it: relative to the output directory ``out``
    (a recipe marked ``relative_to_recipe`` resolves it from its own directory), so no absolute path
    or home directory name is published. Where the relative path would spell the home directory's name
    (the input under it, the output outside it) or there is no ``out``, the base name only."""
    src = os.path.abspath(path)
    if out is None:
        return os.path.basename(src)
    dst = os.path.abspath(out)
    home = os.path.expanduser("~")

    def under(p: str) -> bool:
        return home not in ("", "/") and (p == home or p.startswith(home.rstrip(os.sep) + os.sep))

    if under(src) and not under(dst):
        return os.path.basename(src)
    try:
        return os.path.relpath(src, dst)
    except ValueError:  # another drive (Windows)
        return os.path.basename(src)


def is_per_tensor(v: Any) -> bool:
    """A parameter given as a function of the tensor name (or a list holding one)."""
    return callable(v) or (isinstance(v, (list, tuple)) and any(callable(x) for x in v))


def dtype_name(d: Any) -> str | None:
    return None if d is None else str(d).removeprefix("torch.")


def mergekit_recipe(*, method: str, params: Mapping[str, Any], inputs: Sequence[Any],
                    settings: Mapping[str, Any], out: str | os.PathLike | None = None
                    ) -> tuple[dict | None, str | None]:
    """The config that reproduces a merge of one of the registered methods, or (None, why not).

    ``params`` as the methods pass them: ``t``; ``weights`` (one per non-base input); ``density`` (one
    per non-base input); ``lambda``; ``normalize``; ``global_trim``; ``seed``; ``filter_wise``. ``inputs``:
    the card's CardInputs in stream order. ``settings``: ``dtype``, ``out_dtype``, ``max_shard_size``
    (bytes), ``copy_tokenizer_from`` (None: the first input). ``out``: the output directory local paths
    are written relative to (``local_ref``).
    """
    why = _no_recipe(method, params, inputs)
    if why is not None:
        return None, why
    refs = [i.shown(out) for i in inputs]
    cfg: dict[str, Any] = {"merge_method": method, **_method_recipe(METHODS[method], params, inputs, refs)}
    for key in ("dtype", "out_dtype"):
        if settings.get(key) is not None:
            cfg[key] = dtype_name(settings[key])
    cfg["cpift"] = _cpift_block(params, inputs, settings, out)
    return cfg, None


def _no_recipe(method: str, params: Mapping[str, Any], inputs: Sequence[Any]) -> str | None:
    """Why a merge has no generated recipe, or None."""
    if method not in mergekit_methods():
        return f"cpift has no generated recipe for '{method}'"
    fns = [k for k, v in params.items() if is_per_tensor(v)]
    if fns:
        return f"'{fns[0]}' is a per-tensor Python function, which a recipe cannot spell"
    if len({i.recipe_ref for i in inputs}) < len(inputs):
        return "the same model is given twice, which a mergekit config cannot express"
    return None


def _method_recipe(spec: MethodSpec, params: Mapping[str, Any], inputs: Sequence[Any],
                   refs: list[str]) -> dict[str, Any]:
    """base_model, models and parameters, as the registry's declaration spells them (declared_recipe)."""
    return declared_recipe(spec, params, refs, base=bool(inputs) and inputs[0].role == "base")


def _cpift_block(params: Mapping[str, Any], inputs: Sequence[Any],
                 settings: Mapping[str, Any], out: str | os.PathLike | None) -> dict[str, Any]:
    block: dict[str, Any] = {}
    if "seed" in params:
        block["seed"] = int(params["seed"])
    if params.get("global_trim"):
        block["global_trim"] = True
    if settings.get("max_shard_size") is not None:
        block["max_shard_size"] = int(settings["max_shard_size"])
    donor = tokenizer_donor(inputs, settings, out)
    if donor is not None:
        block["copy_tokenizer_from"] = donor
    if out is not None and (donor is not None or not all(i.hub_repo for i in inputs)):
        block["relative_to_recipe"] = True
    return block


def tokenizer_donor(inputs: Sequence[Any], settings: Mapping[str, Any], out: str | os.PathLike | None) -> str | None:
    """The tokenizer donor as a recipe names it, or None when it is the first input (a config run's
    default: base_model, else the first model, which is inputs[0] in a generated recipe)."""
    donor = settings.get("copy_tokenizer_from")
    if donor is None or os.path.abspath(donor) == os.path.abspath(inputs[0].path):
        return None
    if os.path.isfile(os.path.join(donor, ".cpift-tokenizer")):  # merge/tokenizer/prepare.py's side directory
        return "built from the config's tokenizer fields"
    same = [i for i in inputs if os.path.abspath(i.path) == os.path.abspath(donor)]
    return same[0].shown(out) if same else local_ref(donor, out)
