"""The model card (README.md) and the recipe (cpift_recipe.yml) that every merge output carries.

``card_files(method=, params=, inputs=, settings=)`` returns both texts before the first byte is written;
the writer puts them into the hidden partial directory, so they appear with the model or not at all
(a step with its own streaming loop, e.g. ``fuse``, passes them to ``ShardWriter.finish`` itself).

Recipe: a mergekit-style YAML that ``cpift-merge config cpift_recipe.yml -o OUT2`` runs to write the
same bytes. For the registered mergekit methods it is generated from the call's parameters; what
mergekit has no spelling for (DARE seed, TIES global trim, shard size, tokenizer donor) goes under
``cpift:`` (validated by values.parse_cpift_block). Local inputs are written as absolute paths and Hub
inputs as ``org/name@<commit>`` of the snapshot that was read, so the recipe means the same from any
directory. A parameter that is a Python function of the tensor name (a gradient or filter from a
config, or a library caller's) has no generated form: a config run passes its own config, rewritten
by ``rewrite_config``; otherwise the card says why there is no recipe. A method other than those
passes ``recipe=`` itself or gets none.

Fingerprint of an input (the card's sha256): SHA-256 over model.safetensors.index.json (sharded) or the
single file's header (8-byte length and JSON), then the first 64 KiB of tensor data of each shard in name
order: the layout pins names (and shapes, dtypes, offsets), the samples tell fine-tunes of one base apart.
It reads a few KiB per shard, so it pins no weights beyond them; a Hub input's card also records the commit.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from cpift.errors import CheckpointError
from cpift.merge.hub import snapshot_commit, split_ref
from cpift.merge.io.checkpoint import BIN_INDEX_NAME, BIN_SINGLE_NAME, INDEX_NAME, SINGLE_NAME
from cpift.merge.methods.registry import METHODS, declared_recipe, mergekit_methods

SAMPLE_BYTES = 65536
CARD_NAME = "README.md"
RECIPE_NAME = "cpift_recipe.yml"
MERGEKIT_NAME = "mergekit_config.yml"  # the name mergekit gives the config it writes into an output
MERGEKIT_METHODS = mergekit_methods()  # as registered at import (merge/methods/registry.py)


@dataclass(frozen=True)
class CardInput:
    """One input of a merge as the card and the recipe record it.

    ``ref`` is the model argument as given (a path, or a Hub id ``org/name[@revision]``), ``path`` the
    local directory or .safetensors file that was read, ``role`` what the method used it as
    ("base", "model", or a step's own: "backbone", "task math", ...).
    """

    ref: str
    path: Path
    role: str = "model"
    adapter: Path | None = None  # a LoRA adapter merged into ``path`` on read (``BASE+ADAPTER``)

    @property
    def commit(self) -> str | None:
        """The Hub commit read, when the input came from the Hub."""
        return snapshot_commit(self.path) if split_ref(self.ref) is not None else None

    @property
    def hub_repo(self) -> str | None:
        return split_ref(self.ref)[0] if self.commit else None

    @property
    def recipe_ref(self) -> str:
        """Its identity anywhere on this machine: the Hub id pinned to the commit read, else the
        absolute path (core-mask metadata records this)."""
        base = f"{self.hub_repo}@{self.commit}" if self.hub_repo else os.path.abspath(self.path)
        return base + (f"+{os.path.abspath(self.adapter)}" if self.adapter is not None else "")

    def shown(self, out: str | os.PathLike | None) -> str:
        """How the card and the recipe of output ``out`` name it: the Hub id pinned to the commit read,
        else its path relative to ``out`` (``local_ref``)."""
        base = f"{self.hub_repo}@{self.commit}" if self.hub_repo else local_ref(self.path, out)
        return base + (f"+{local_ref(self.adapter, out)}" if self.adapter is not None else "")


def model_inputs(model: Any, role: str = "model") -> list[CardInput]:
    """The card's records of an opened model; a layer view (mergekit slices) lists each of its sources."""
    sources = getattr(model, "sources", None)
    return [model_input(s, role) for s in sources()] if callable(sources) else [model_input(model, role)]


def model_input(model: Any, role: str = "model") -> CardInput:
    """The card's record of an opened model (a Checkpoint; an AdaptedCheckpoint names its adapter)."""
    adapter = getattr(model, "adapter_dir", None)
    return CardInput(os.fspath(model.base_ref if adapter is not None else model.ref), model.path, role, adapter)


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


def roles_for(method: str, n: int) -> list[str]:
    """Input roles of the registered methods: those with a base take it first."""
    spec = METHODS.get(method)
    return ["base" if i == 0 and spec is not None and spec.has_base else "model" for i in range(n)]


def input_hash(path: str | os.PathLike) -> str:
    """The fingerprint of an input (module docstring): its index JSON or single-file header, then the
    first ``SAMPLE_BYTES`` of tensor data of each shard. A ``.bin`` input (read when no safetensors
    file is there): its index JSON, if sharded, then the first and the last ``SAMPLE_BYTES`` of each
    shard (a zip's end is its central directory, which holds the CRC-32 of every tensor's data)."""
    p = Path(path)
    h = hashlib.sha256()
    pickled = p.suffix == ".bin" if p.is_file() else not any((p / n).is_file() for n in (SINGLE_NAME, INDEX_NAME))
    single_name, index_name = (BIN_SINGLE_NAME, BIN_INDEX_NAME) if pickled else (SINGLE_NAME, INDEX_NAME)
    try:
        # Read what the checkpoint reader reads; for safetensors the index wins, as fingerprints always had it.
        sharded = p.is_dir() and (p / index_name).is_file() and not (pickled and (p / single_name).is_file())
        if sharded:
            raw = (p / index_name).read_bytes()
            h.update(raw)
            files = [p / f for f in sorted(set(json.loads(raw)["weight_map"].values()))]
        else:
            files = [p if p.is_file() else p / single_name]
        for file in files:
            with open(file, "rb") as f:
                if pickled:
                    h.update(f.read(SAMPLE_BYTES))
                    f.seek(max(SAMPLE_BYTES, os.fstat(f.fileno()).st_size - SAMPLE_BYTES))
                    h.update(f.read(SAMPLE_BYTES))
                    continue
                head = f.read(8)
                header = f.read(int.from_bytes(head, "little")) if len(head) == 8 else b""
                if not sharded:
                    h.update(head + header)
                h.update(f.read(SAMPLE_BYTES))  # the file position is now at the tensor data
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p}: cannot read its index or shards for the model card's fingerprint: "
                              f"{getattr(e, 'strerror', None) or e}") from None
    return h.hexdigest()


def is_per_tensor(v: Any) -> bool:
    """A parameter given as a function of the tensor name (or a list holding one)."""
    return callable(v) or (isinstance(v, (list, tuple)) and any(callable(x) for x in v))


def _dtype_name(d: Any) -> str | None:
    return None if d is None else str(d).removeprefix("torch.")


def mergekit_recipe(*, method: str, params: Mapping[str, Any], inputs: Sequence[CardInput],
                    settings: Mapping[str, Any], out: str | os.PathLike | None = None
                    ) -> tuple[dict | None, str | None]:
    """The config that reproduces a merge of one of the registered methods, or (None, why not).

    ``params`` as the methods pass them: ``t``; ``weights`` (one per non-base input); ``density`` (one
    per non-base input); ``lambda``; ``normalize``; ``global_trim``; ``seed``; ``filter_wise``. ``settings``: ``dtype``,
    ``out_dtype``, ``max_shard_size`` (bytes), ``copy_tokenizer_from`` (None: the first input).
    ``out``: the output directory local paths are written relative to (``local_ref``).
    """
    if method not in mergekit_methods():
        return None, f"cpift has no generated recipe for '{method}'"
    fns = [k for k, v in params.items() if is_per_tensor(v)]
    if fns:
        return None, f"'{fns[0]}' is a per-tensor Python function, which a recipe cannot spell"
    if len({i.recipe_ref for i in inputs}) < len(inputs):
        return None, "the same model is given twice, which a mergekit config cannot express"
    refs = [i.shown(out) for i in inputs]
    cfg: dict[str, Any] = {"merge_method": method}
    spec = METHODS[method]
    if spec.tensor is not None:
        cfg.update(declared_recipe(spec, params, refs))
    elif spec.roles == ("model_a", "model_b"):
        cfg["base_model"] = refs[0]
        cfg["models"] = [{"model": r} for r in refs]
        cfg["parameters"] = {p.mergekit: float(params[p.name]) for p in spec.params if p.mergekit}
    elif spec.roles == ("model",):  # passthrough
        cfg["models"] = [{"model": refs[0]}]
        cfg["parameters"] = {p.mergekit: float(params[p.name]) for p in spec.params
                             if p.mergekit and params.get(p.name) is not None}
    elif spec.optional_base or (spec.roles == ("models",) and "weights" not in params):
        cfg.update(_sphere_recipe(spec, params, inputs, refs))  # nuslerp, multislerp, karcher
    elif spec.roles == ("models",):
        cfg["models"] = [{"model": r, "parameters": {"weight": float(w)}}
                         for r, w in zip(refs, params["weights"])]
    elif "weights" not in params:  # model_stock, sce: the fine-tunes and the method's shared settings
        cfg["base_model"] = refs[0]
        cfg["models"] = [{"model": r} for r in refs[1:]]
        cfg["parameters"] = {p.mergekit: bool(params[p.name]) if p.kind == "flag" else float(params[p.name])
                             for p in spec.params if p.mergekit}
    for key in ("dtype", "out_dtype"):
        if settings.get(key) is not None:
            cfg[key] = _dtype_name(settings[key])
    cfg["cpift"] = _cpift_block(params, inputs, settings, out)
    return cfg, None


def _sphere_recipe(spec, params: Mapping[str, Any], inputs: Sequence[CardInput], refs: list[str]) -> dict[str, Any]:
    """The models (weights if the method has them), the base if one was given, the shared settings."""
    cfg: dict[str, Any] = {}
    if inputs and inputs[0].role == "base":
        cfg["base_model"], refs = refs[0], refs[1:]
    ws = params.get("weights")
    cfg["models"] = [{"model": r, **({"parameters": {"weight": float(ws[i])}} if ws is not None else {})}
                     for i, r in enumerate(refs)]
    shared = {}
    for p in spec.params:
        if p.mergekit and not p.per_model:
            v = params[p.name]
            shared[p.mergekit] = v if isinstance(v, bool) else (int(v) if p.name == "max_iter" else float(v))
    cfg["parameters"] = shared
    return cfg


def _cpift_block(params: Mapping[str, Any], inputs: Sequence[CardInput],
                 settings: Mapping[str, Any], out: str | os.PathLike | None) -> dict[str, Any]:
    block: dict[str, Any] = {}
    if "seed" in params:
        block["seed"] = int(params["seed"])
    if params.get("global_trim"):
        block["global_trim"] = True
    if settings.get("max_shard_size") is not None:
        block["max_shard_size"] = int(settings["max_shard_size"])
    donor = _donor(inputs, settings, out)
    if donor is not None:
        block["copy_tokenizer_from"] = donor
    if out is not None and (donor is not None or not all(i.hub_repo for i in inputs)):
        block["relative_to_recipe"] = True
    return block


def _donor(inputs: Sequence[CardInput], settings: Mapping[str, Any], out: str | os.PathLike | None) -> str | None:
    """The tokenizer donor as a recipe names it, or None when it is the first input (a config run's
    default: base_model, else the first model, which is inputs[0] in a generated recipe)."""
    donor = settings.get("copy_tokenizer_from")
    if donor is None or os.path.abspath(donor) == os.path.abspath(inputs[0].path):
        return None
    if os.path.isfile(os.path.join(donor, ".cpift-tokenizer")):  # merge/tokenizer/prepare.py's side directory
        return "built from the config's tokenizer fields"
    same = [i for i in inputs if os.path.abspath(i.path) == os.path.abspath(donor)]
    return same[0].shown(out) if same else local_ref(donor, out)


def rewrite_config(raw: Mapping[str, Any], refs: Mapping[str, str], *, top: Mapping[str, Any] = {},
                   cpift: Mapping[str, Any] = {}) -> dict[str, Any]:
    """A user's mergekit config made into a recipe: every model reference replaced through ``refs``
    (absolute paths, pinned Hub commits), ``top`` keys (dtype overrides) set, ``cpift`` settings merged.
    """
    cfg = copy.deepcopy(dict(raw))

    def fix(holder: Any, key: str) -> None:
        if isinstance(holder, dict) and isinstance(holder.get(key), str) and holder[key] in refs:
            holder[key] = refs[holder[key]]

    fix(cfg, "base_model")
    fix(cfg, "tokenizer_source")
    fix(cfg.get("tokenizer"), "source")
    for rule in (((cfg.get("tokenizer") or {}).get("tokens") or {}).values()
                 if isinstance(cfg.get("tokenizer"), dict) else ()):
        fix(rule, "source")  # tokenizer.tokens.<t>.source: a model, or {kind: model_token, model: ...}
        fix(rule.get("source") if isinstance(rule, dict) else None, "model")
    for m in cfg.get("models") or []:
        fix(m, "model")
    for sl in cfg.get("slices") or []:
        fix(sl, "base_model")
        for s in (sl.get("sources") or []) if isinstance(sl, dict) else []:
            fix(s, "model")
    cfg.update(top)
    merged = {**(cfg.get("cpift") or {}), **cpift}
    if merged:
        cfg["cpift"] = merged
    return cfg


def _value(v: Any) -> str:
    if callable(v):
        return "per tensor (a function of the tensor name)"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    if isinstance(v, bool):
        return str(v).lower()
    return "default" if v is None else str(v)


def _dump(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


def card_files(*, method: str, params: Mapping[str, Any], inputs: Sequence[CardInput],
               settings: Mapping[str, Any] | None = None, recipe: Mapping[str, Any] | None = None,
               definition: str | None = None, out: str | os.PathLike | None = None,
               relation: str | None = "merge") -> dict[str, str]:
    """README.md and, when the merge can be reproduced, cpift_recipe.yml for one merge output; for a
    merge mergekit can express, also mergekit_config.yml (mergekit's own record, which Hub tools read).

    The front matter lists under ``base_model`` only the inputs pulled from the Hub (their commits are
    in the body and the recipe), with ``base_model_relation`` (the Hub's spelling: ``merge``); with no
    Hub input it has no ``base_model``. Its tags are ``cpift`` and ``merge``, and ``mergekit`` whenever
    mergekit_config.yml is written. Local inputs appear in the body and the recipe only, relative
    to ``out`` (``local_ref``): no absolute path or home directory name is published.

    Args:
        method: the method or step name (``ties``, ``fuse``, ...).
        params: its parameters, shown in the card; for the registered mergekit methods they also make
            the recipe (see ``mergekit_recipe``). Values may be numbers, strings, booleans, lists, or
            callables (shown as per-tensor).
        inputs: every input, in the order the method read them.
        settings: output settings: ``dtype``, ``out_dtype``, ``max_shard_size``, ``copy_tokenizer_from``.
        recipe: a reproducing config to record as is (a config run, or a step of its own); default:
            generated for the registered mergekit methods.
        definition: one line saying what the method computes (default: the registry's).
        out: the output directory (local inputs are named relative to it).
        relation: the front matter's ``base_model_relation`` (None: left out, e.g. for core masks).

    Returns:
        ``{file name: text}`` for ``ShardWriter.finish``.

    Raises:
        CheckpointError: an input's index or header cannot be read for its hash.

    Example:
        >>> files = card_files(method="slerp", params={"t": 0.3},
        ...                    inputs=[CardInput("a", Path("a")), CardInput("b", Path("b"))],
        ...                    settings={"max_shard_size": 5 * 10**9})
        >>> sorted(files)
        ['README.md', 'cpift_recipe.yml']
    """
    settings = dict(settings or {})
    why = None
    if recipe is None:
        recipe, why = mergekit_recipe(method=method, params=params, inputs=inputs, settings=settings, out=out)
    as_mergekit = recipe is not None and "merge_method" in recipe  # a mergekit config, not a cpift step
    hub = list(dict.fromkeys(i.hub_repo for i in inputs if i.hub_repo))
    front: dict[str, Any] = {"base_model": hub} if hub else {}
    if hub and relation is not None:
        front["base_model_relation"] = relation
    front.update({"tags": ["cpift", "merge", *(["mergekit"] if as_mergekit else [])], "library_name": "transformers"})
    lines = ["---", _dump(front).rstrip("\n"), "---", "",
             f"# {method} merge of {len(inputs)} models", "",
             f"Made with cpift (`cpift-merge`), method **{method}**"
             + (f": {definition or METHODS[method].definition}." if definition or method in METHODS else "."),
             "", "## Parameters", "", "| parameter | value |", "|---|---|"]
    lines += [f"| {k} | {_value(v)} |" for k, v in params.items()]
    shown = {k: _dtype_name(v) if "dtype" in k else _value(v) for k, v in settings.items()
             if v is not None and k != "copy_tokenizer_from"}
    if _donor(inputs, settings, out) is not None:
        shown["copy_tokenizer_from"] = _donor(inputs, settings, out)
    lines += [f"| {k} | {v} |" for k, v in shown.items()]
    lines += ["", "## Inputs", "", "| role | model | Hub commit | fingerprint (sha256) |", "|---|---|---|---|"]
    lines += [f"| {i.role} | `{i.hub_repo or local_ref(i.path, out)}"
              f"{'+' + local_ref(i.adapter, out) if i.adapter else ''}` | {i.commit or '–'} | `{input_hash(i.path)}` |"
              for i in inputs]
    lines += ["", "Fingerprint: SHA-256 of the index JSON (or the single file's safetensors header) and the "
                  f"first {SAMPLE_BYTES // 1024} KiB of tensor data of each shard; a Hub commit pins all "
                  "the weights.", "", "## Reproduce", ""]
    files: dict[str, str] = {}
    if recipe is not None:
        text = f"# Reproduce with: cpift-merge config {RECIPE_NAME} -o OUT\n" + _dump(dict(recipe))
        files[RECIPE_NAME] = text
        if as_mergekit:  # the card's tags say so too: Hub tools filter on "mergekit"
            files[MERGEKIT_NAME] = (f"# mergekit's record of this merge (cpift adds {RECIPE_NAME}); local paths "
                                    f"are relative to this directory\n"
                                    + _dump({k: v for k, v in recipe.items() if k != "cpift"}))
        lines += [f"```bash\ncpift-merge config {RECIPE_NAME} -o OUT\n```", "",
                  f"with `{RECIPE_NAME}` (in this directory):", "", "```yaml", text.rstrip("\n"), "```"]
    else:
        lines += [f"No recipe: {why}."]
    files[CARD_NAME] = "\n".join(lines) + "\n"
    return files
