"""Run a step recipe again (``cpift-merge config cpift_recipe.yml -o OUT``): the recipe's step, its
arguments, and every option of the command passed through, or refused when the step has no use for it.

``fuse`` is a merge: it takes every merge option (dry run, resume, device, backend, dtype, ...).
``cores`` writes masks, not a model: it takes overwrite, progress, backend and device, and refuses
the others with a one-line error (a dry run of cores would still have to read every input three
times, and silently running it for real would write).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cpift.errors import ParameterError
from cpift.merge.cpi.recipes import STEP_KEY, load_step_recipe, recipe_entries

# and "inputs", read files -o may not hold
CORES_OPTIONS = ("overwrite", "allow_crimes", "progress", "backend", "device")
# The command-line spelling of each option, for the refusal.
FLAGS = {"dry_run": "--dry-run", "resume": "--resume", "allow_nonfinite": "--allow-nonfinite",
         "dtype": "--dtype", "out_dtype": "--out-dtype", "max_shard_size": "--max-shard-size",
         "copy_tokenizer_from": "--copy-tokenizer-from"}


def _refuse_unused(options: dict[str, Any], path: Path) -> None:
    for key, value in options.items():
        if key not in (*CORES_OPTIONS, "inputs") and value not in (None, False):
            flag = FLAGS.get(key, key)
            raise ParameterError(f"{flag}: {path} is a cores recipe, which writes masks, not a model; "
                                 f"{flag} does not apply to it (drop {flag})")


def run_step_recipe(path: str | os.PathLike, out: str | os.PathLike, **options: Any):
    """Run the step a recipe describes into ``out``; ``options`` as for any merge command."""
    path = Path(path)
    data = load_step_recipe(path)
    if data[STEP_KEY] == "cores":
        from cpift.merge.cpi.cores import compute_cores

        _refuse_unused(options, path)
        return compute_cores(data["base"], recipe_entries(data, path, "models", ("name", "model")), out,
                             p=data["p"], granularity=data.get("granularity", "element"),
                             include=data.get("include") or None, exclude=data.get("exclude") or None,
                             inputs=[path, *options.get("inputs", ())],
                             **{k: v for k, v in options.items() if k in CORES_OPTIONS})
    from cpift.merge.cpi.fuse import fuse

    settings = {k: data[k] for k in ("dtype", "out_dtype", "max_shard_size") if k in data}
    merged = {**settings, **{k: v for k, v in options.items() if v is not None or k not in settings}}
    merged["inputs"] = [path, *merged.get("inputs", ())]  # -o may not be or hold the recipe file
    return fuse(data["backbone"], recipe_entries(data, path, "tasks", ("name", "model", "mask")), out,
                overlap=data.get("overlap", "last"), base=data.get("base"), omega=data.get("omega"), **merged)
