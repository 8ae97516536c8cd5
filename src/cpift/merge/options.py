"""The options every merge takes (the CLI's common options), typed: ``MergeOptions``, keyword-only.

A public merge function takes them as keywords, ``slerp(..., dry_run=True, device="cuda")``, declared in
its signature from the fields (``option_parameters``), so ``inspect.signature`` lists them and a misspelt
one is a TypeError naming it; ``options_from`` makes them the one object that the runner and
``stream_merge`` (merge/engine.py) receive. Internal callers build the object and pass it on. A field's ``cli``
metadata is its command-line option (flag, help, kind); cli/_options.py builds the click options from it,
in field order (mergekit's options.py::add_merge_options does the same from its options model).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

from cpift.errors import ParameterError
from cpift.merge.io.sizes import HELP as SIZE_HELP


def _cli(flag: str, help: str, kind: str = "text", **extra: Any) -> dict[str, Any]:
    """A field's command-line option: ``kind`` text, flag (--name), dir (a directory path) or backend."""
    return {"cli": {"flag": flag, "help": help, "kind": kind, **extra}}


OVERWRITE_HELP = ("Replace an earlier cpift output (a directory whose .cpift-output marker lists every file in it) "
                  "or an empty directory, atomically, once the new one is complete; any other existing path, or a "
                  "file added to a cpift output, is refused.")
ALLOW_CRIMES_HELP = ("Merge anyway when the inputs' config.json name different architectures (model_type, "
                     "architectures) or an integer tensor differs between them (mergekit's flag; default: stop with "
                     "an error).")


@dataclass(frozen=True, kw_only=True)
class MergeOptions:
    """How a merge reads, computes and writes; see ``stream_merge`` for each field.

    Example:
        >>> plan = slerp("a", "b", "out", t=0.3, dry_run=True)  # the keywords make a MergeOptions
    """

    dtype: Any = field(default=None, metadata=_cli(  # str or torch.dtype: cast the inputs for the math
        "--dtype", "Cast inputs to this dtype before merging (float32, bfloat16, float16, float64); "
        "default: keep each input's dtype. Math is float32 either way (float64 for float64)."))
    out_dtype: Any = field(default=None, metadata=_cli(  # str or torch.dtype of the output tensors
        "--out-dtype", "Dtype of the output tensors; default: --dtype, else the first model's dtype."))
    max_shard_size: int | str = field(default="5GB", metadata=_cli("--max-shard-size", SIZE_HELP, show_default=True))
    overwrite: bool = field(default=False, metadata=_cli("--overwrite", OVERWRITE_HELP, "flag"))
    allow_nonfinite: bool = field(default=False, metadata=_cli(
        "--allow-nonfinite", "Merge even if an input tensor holds NaN or Inf (default: stop with an error).", "flag"))
    # merge different architectures / disagreeing integer tensors (consistency.py)
    allow_crimes: bool = field(default=False, metadata=_cli("--allow-crimes", ALLOW_CRIMES_HELP, "flag"))
    copy_tokenizer_from: str | os.PathLike | None = field(default=None, metadata=_cli(
        "--copy-tokenizer-from", "Directory to copy config.json, tokenizer and chat-template files from "
        "(default: the first model).", "dir"))
    backend: str | None = field(default=None, metadata=_cli(
        "--backend", "Kernel implementation: triton (CUDA; on the CPU only under TRITON_INTERPRET=1, "
        "for testing), cpu (the fused CPU kernels), torch (the reference), or auto = triton for CUDA "
        "tensors, else cpu. Default: $CPIFT_BACKEND, else auto.", "backend"))
    device: Any = field(default=None, metadata=_cli(  # str or torch.device: where the math runs
        "--device", "Where the math runs: cpu (straight from the memory-mapped files), or cuda / cuda:N "
        "(tensors are streamed through pinned host buffers, copy and compute overlapped).", default="cpu",
        show_default=True))
    progress: bool = True  # the CLI's -q/--quiet turns it off
    dry_run: bool = field(default=False, metadata=_cli(
        "--dry-run", "Validate every input and print the plan (tensors, bytes to read and write, output "
        "shards, expected peak memory); write nothing.", "flag"))
    resume: bool = field(default=False, metadata=_cli(
        "--resume", "Continue an interrupted merge into the same -o with the same inputs and options: "
        "the output shards it finished (SHA-256 checked) are kept, the rest computed.", "flag"))
    inputs: tuple[str | os.PathLike, ...] = ()  # files read besides the models (-o may not hold them)
    recipe: Mapping[str, Any] | None = None  # the config that asked for this merge, recorded as is
    config_updates: Mapping[str, Any] | None = None  # keys set in the output config.json (num_hidden_layers)

    def replace(self, **changes: Any) -> MergeOptions:
        return dataclasses.replace(self, **changes)

    def pick(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The named fields (``CARD_FIELDS``, ``RESUME_FIELDS``), in that order."""
        return {name: getattr(self, name) for name in names}

    def changed(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The named fields whose value is not the default (what a recipe records)."""
        return {name: v for name in names if (v := getattr(self, name)) != _DEFAULTS[name]}


FIELDS = tuple(f.name for f in dataclasses.fields(MergeOptions))
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MergeOptions)}
CARD_FIELDS = ("dtype", "out_dtype", "max_shard_size", "copy_tokenizer_from", "backend")  # a card's and recipe's
RESUME_FIELDS = ("dtype", "out_dtype", "max_shard_size", "allow_nonfinite", "backend", "device")  # a resume compares
CLI_FIELDS = {f.name: f for f in dataclasses.fields(MergeOptions) if "cli" in f.metadata}  # in option order


def option_parameters() -> list[inspect.Parameter]:
    """Every field as a keyword-only parameter of a public merge function, with its default and type."""
    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
            for f in dataclasses.fields(MergeOptions)]


R = TypeVar("R")


def with_options(fn: Callable[..., R], name: str) -> Callable[..., R]:
    """The public form of ``fn(..., *, options: MergeOptions)``, called ``name``: the options as keywords
    instead, each listed in its signature (``option_parameters``); an unknown keyword is a TypeError naming it."""
    inner = inspect.signature(fn)
    sig = inner.replace(parameters=[*(q for q in inner.parameters.values() if q.name != "options"),
                                    *option_parameters()])

    @functools.wraps(fn)
    def public(*args: Any, **kwargs: Any) -> R:
        bound = sig.bind(*args, **kwargs)
        options = options_from(bound.arguments)
        return fn(*bound.args, **bound.kwargs, options=options)

    public.__signature__ = sig  # type: ignore[attr-defined]
    public.__name__ = public.__qualname__ = name
    return public


def options_from(arguments: dict[str, Any]) -> MergeOptions:
    """Take the option keywords out of a public function's bound ``arguments`` (the rest stay) as the object."""
    return merge_options({name: arguments.pop(name) for name in FIELDS if name in arguments})


def merge_options(values: Mapping[str, Any]) -> MergeOptions:
    """The object from option keywords (the CLI's options, a config's settings, a public function's
    keywords); the fields not given keep their defaults.

    Raises:
        ParameterError: a keyword that is no merge option (the message lists them).
    """
    overrides = dict(values)
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ParameterError(f"{unknown[0]}: not an option of a merge (options: {', '.join(FIELDS)})")
    if "inputs" in overrides:
        overrides["inputs"] = tuple(overrides["inputs"] or ())
    return MergeOptions().replace(**overrides)
