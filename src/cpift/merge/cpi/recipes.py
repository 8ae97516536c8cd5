"""Recipes of the CPI steps (``cores``, ``fuse``), which mergekit's YAML cannot express.

A step recipe is a YAML mapping with ``cpift_step: cores | fuse`` and that step's arguments, with
local paths relative to the step's output (``relative_to_recipe: true``: resolved from the recipe's
own directory; merge/card.py ``local_ref``) and Hub ids as given, recorded as ``cpift_recipe.yml`` in
the step's output; ``cpift-merge config cpift_recipe.yml -o OUT`` runs it again (merge/cpi/replay.py:
the same function, the same arguments). Unknown keys and missing fields are ConfigErrors naming the
file and the field. This module only builds and loads recipes; it imports none of the steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cpift.errors import ConfigError
from cpift.merge.io.safe_parse import load_yaml_file
from cpift.numbers import parse_number

STEP_KEY = "cpift_step"
_FIELDS = {
    "cores": {"required": ("base", "models", "p"),
              "optional": ("granularity", "include", "exclude", "relative_to_recipe")},
    "fuse": {"required": ("backbone", "tasks"),
             "optional": ("overlap", "base", "omega", "dtype", "out_dtype", "max_shard_size", "relative_to_recipe")},
}


_NUMBERS = {"p": False, "omega": False}  # numeric fields, and whether each is an integer


def _ref(p: str | os.PathLike, out: str | os.PathLike) -> str:
    from cpift.merge.card import local_ref
    from cpift.merge.hub import is_hub_ref

    return os.fspath(p) if not os.path.exists(p) and is_hub_ref(p) else local_ref(p, out)


def cores_recipe(base, tasks, *, p, granularity, include, exclude, out) -> dict[str, Any]:
    return {STEP_KEY: "cores", "relative_to_recipe": True, "base": _ref(base, out),
            "models": [{"name": n, "model": _ref(m, out)} for n, m in tasks],
            "p": p, "granularity": granularity, "include": list(include or []), "exclude": list(exclude or [])}


def fuse_recipe(backbone, tasks, *, out, overlap, base, omega, settings: dict[str, Any]) -> dict[str, Any]:
    recipe = {STEP_KEY: "fuse", "relative_to_recipe": True, "backbone": _ref(backbone, out),
              "tasks": [{"name": n, "model": _ref(m, out), "mask": _ref(k, out)} for n, m, k in tasks],
              "overlap": overlap}
    if base is not None:
        recipe["base"] = _ref(base, out)
    if omega is not None:
        recipe["omega"] = omega
    recipe.update({k: v for k, v in settings.items() if v is not None})
    return recipe


def is_step_recipe(path: str | os.PathLike) -> bool:
    """True when the YAML file is a step recipe (has a top-level cpift_step key).

    Raises:
        ConfigError: the file is missing or not YAML (the mergekit loader's message, before it imports)."""
    data = load_yaml_file(path, what="config")
    return isinstance(data, dict) and STEP_KEY in data


def load_step_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe's mapping, its fields checked (unknown keys and missing fields are ConfigErrors) and,
    with ``relative_to_recipe``, its local paths resolved from the recipe's directory."""
    path = Path(path)
    data = load_yaml_file(path, what="recipe")
    step = data.get(STEP_KEY)
    if step not in _FIELDS:
        raise ConfigError(f"{path}: {STEP_KEY}: {step!r} is not a step (use cores or fuse)")
    spec = _FIELDS[step]
    for key in data:
        if key != STEP_KEY and key not in spec["required"] + spec["optional"]:
            raise ConfigError(f"{path}: {key}: unknown field for {STEP_KEY} {step} (known: "
                              f"{', '.join(spec['required'] + spec['optional'])})")
    for key in spec["required"]:
        if key not in data:
            raise ConfigError(f"{path}: {key}: missing (required for {STEP_KEY} {step})")
    for key, integer in _NUMBERS.items():  # finite (int64); each step checks its own range
        if data.get(key) is not None:
            data[key] = parse_number(data[key], f"{path}: {key}", integer=integer)
    if data.get("relative_to_recipe") is True:
        data = _from_recipe_dir(data, path.parent)
    return data


def recipe_entries(data: dict, path: str | os.PathLike, field: str, keys: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The list ``field`` of a recipe as tuples of ``keys`` (models of cores, tasks of fuse)."""
    items = data[field]
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: {field}: expected a non-empty list of mappings with {', '.join(keys)}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != set(keys):
            raise ConfigError(f"{path}: {field}[{i}]: expected exactly the keys {', '.join(keys)}")
        out.append(tuple(str(item[k]) for k in keys))
    return out


def _from_recipe_dir(data: dict, here: Path) -> dict:
    """The recipe with each relative path that exists beside it made absolute (Hub ids stay)."""
    def fix(v: Any) -> Any:
        if isinstance(v, str) and not os.path.isabs(v) and os.path.exists(here / v):
            return os.path.abspath(here / v)
        return v

    out = dict(data)
    for key in ("base", "backbone"):
        if key in out:
            out[key] = fix(out[key])
    for key in ("models", "tasks"):
        if isinstance(out.get(key), list):
            out[key] = [{k: fix(v) if k in ("model", "mask") else v for k, v in item.items()}
                        if isinstance(item, dict) else item for item in out[key]]
    return out
