"""Running a mergekit config: model references resolved as mergekit does, the plan (plan.py) called,
the recipe recorded."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Mapping

from cpift.errors import ConfigError
from cpift.merge.io.model_files import read_model_json
from cpift.merge.mergekit.config import load_config
from cpift.merge.mergekit.plan import MethodCall, plan_call
from cpift.merge.mergekit.slices import check_no_remap, is_whole, plan_slices
from cpift.merge.mergekit.spec import MergeConfig
from cpift.merge.mergekit.values import located
from cpift.merge.methods.registry import METHODS
from cpift.merge.options import merge_options
from cpift.merge.precheck import check_models, model_refs
from cpift.merge.tokenizer.prepare import tokenizer_setup


def resolve_model(ref: str, fld: str, source: str | os.PathLike | None = None, *,
                  base_dir: str | os.PathLike | None = None) -> Path:
    """A model reference as mergekit reads it: an existing path relative to the *current directory* (not
    the config's), else a Hub repo id (``org/name[@revision]``) pulled into the cache (merge/hub.py). With
    ``base_dir`` (a recipe marked ``cpift.relative_to_recipe``: its directory), a relative path is looked for there.

    Raises:
        ConfigError: neither a path nor a Hub model that can be had; the message says why.
    """
    from cpift.errors import HubError
    from cpift.merge.hub import pull, split_ref

    ref = ref.split("+")[0] if "+" in ref and not os.path.exists(ref) else ref  # model+lora: the base
    if base_dir is not None and not os.path.isabs(ref) and os.path.exists(os.path.join(base_dir, ref)):
        return Path(os.path.abspath(os.path.join(base_dir, ref)))
    if os.path.exists(ref):
        return Path(os.path.abspath(ref))
    repo, _, rev = ref.partition("@")
    if os.path.exists(repo) and rev:
        raise ConfigError(f"{located(source, fld)}: '{ref}': a revision applies to Hub models only")
    hub = "nor a Hub model id (org/name[@revision])"
    if split_ref(ref) is not None:
        try:
            return pull(ref)
        except HubError as e:
            hub = f"and as a Hub model: {str(e).removeprefix(ref + ': ')}"
    raise ConfigError(f"{located(source, fld)}: '{ref}' is not a directory (relative paths are relative to "
                      f"the current directory, {os.getcwd()}, as in mergekit) {hub}")


def model_config(model_dir: Path) -> dict | None:
    f = model_dir / "config.json"
    conf = read_model_json(model_dir, "config.json", error=ConfigError)
    if conf is None:
        return None
    if not isinstance(conf, dict):
        raise ConfigError(f"{f}: not a model config (expected a JSON object)")
    return conf


def num_layers_of(conf: dict | None) -> int | None:
    if not conf:
        return None
    for c in (conf, conf.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer"):
            v = c.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def run_config(path: str | os.PathLike, out: str | os.PathLike, *, seed: int | None = None,
               **common) -> Any:
    """Run a mergekit YAML config with cpift.

    Model references resolve as in mergekit (resolve_model); ``num_hidden_layers`` is the first model's.
    The config's ``dtype`` / ``out_dtype`` apply unless given here; config.json and the tokenizer come
    from ``tokenizer_source``, else base_model, else the first model.

    Args:
        path: the YAML file.
        out: output directory.
        seed: seed of the DARE drop masks (mergekit's ``--random-seed``); default: the config's
            ``cpift.seed``, else 0; ignored by other methods.
        **common: keywords of every cpift merge function (``dtype``, ``out_dtype``, ``max_shard_size``,
            ``overwrite``, ``allow_nonfinite``, ``copy_tokenizer_from``, ``progress``); a value that is
            not None here overrides the config.

    Returns: MergeResult of the method run; its notes include the config's notes.

    Raises:
        ConfigError: the config, or a model it names, is unusable; and whatever the method raises.

    Example:
        >>> run_config("ties.yml", "merged", max_shard_size="2GB")
    """
    cfg = load_config(path)
    src = cfg.source
    here = os.path.dirname(os.path.abspath(src)) if cfg.cpift.get("relative_to_recipe") else None
    resolve = functools.partial(resolve_model, base_dir=here)
    paths = {m.model: resolve(m.model, f"{m.field}.model", src) for m in cfg.models}
    if cfg.base_model is not None and cfg.base_model not in paths:
        paths[cfg.base_model] = resolve(cfg.base_model, "base_model", src)
    num_layers = num_layers_of(model_config(paths[cfg.models[0].model]))
    layered = bool(cfg.slices) and not is_whole(cfg, paths)  # slices merged and stacked (slices.py)
    donor = _default_donor(cfg, paths, here)
    tok = tokenizer_setup(cfg, paths, donor, lambda ref, fld: resolve(ref, fld, src))  # merge/tokenizer/
    if "copy_tokenizer_from" in cfg.cpift:
        donor = resolve(cfg.cpift["copy_tokenizer_from"], "cpift.copy_tokenizer_from", src)
    call, layers, opened = _plan(cfg, paths, tok, resolve, layered=layered, num_layers=num_layers, seed=seed)
    settings = _settings(cfg, call, paths, donor, tok, common, path=path, out=out, here=here, layers=layers)
    if cfg.stack:
        from cpift.merge.mergekit.stack import run_stack

        return run_stack(cfg, out, paths, opened=opened, **settings)
    from cpift.merge.methods.runner import run_method  # the engine, imported once the config is known to be good

    result = run_method(METHODS[cfg.method], *call.args, out, options=merge_options(settings), **call.kwargs)
    result.notes.extend(call.notes)
    return result


def _plan(cfg: MergeConfig, paths: Mapping[str, Path], tok, resolve, *, layered: bool, num_layers: int | None,
          seed: int | None) -> tuple[MethodCall, int | None, dict[str, Any]]:
    """The method call a config makes (a stack's is run by stack.py), the stacked layer count of merged
    slices, and the references the inputs open as (a Hub model as org/name@<commit read>, so its card and
    recipe name it by id; BASE+ADAPTER as given)."""
    spec = METHODS[cfg.method]
    native = set(spec.native)
    cards = {ref: _card(ref, p, resolve, cfg.source) for ref, p in paths.items()}
    opened = {**paths, **{ref: c.recipe_ref for ref, c in cards.items() if c.hub_repo or c.adapter}}
    layers = None
    if cfg.stack:
        call = MethodCall(cfg.method, (), {})
    elif layered:
        check_no_remap(cfg, tok, paths)
        call, layers = plan_slices(cfg, paths, native, opened)
    else:
        models = tok.wrap(dict(opened)) if tok is not None else dict(opened)  # rows onto the output vocabulary
        call = plan_call(cfg, num_layers=num_layers, paths=models, native=native)
        if tok is None:
            check_models(model_refs(call.args))  # headers and shapes, before torch is imported
    if spec.param("seed") is not None:
        call.kwargs["seed"] = seed if seed is not None else cfg.cpift.get("seed", 0)
    if cfg.cpift.get("global_trim"):
        call.kwargs["global_trim"] = True
    return call, layers, opened


def _settings(cfg: MergeConfig, call: MethodCall, paths: Mapping[str, Path], donor: Path, tok,
              common: Mapping[str, Any], *, path, out, here: str | None, layers: int | None) -> dict[str, Any]:
    """The merge's output settings: the config's, overridden by the caller's, with the recipe to record,
    the files ``out`` may not touch, and the built tokenizer's side directory and config.json updates."""
    settings = {"dtype": cfg.dtype, "out_dtype": cfg.out_dtype or cfg.dtype, "copy_tokenizer_from": donor,
                **{k: cfg.cpift[k] for k in ("max_shard_size",) if k in cfg.cpift}}
    settings.update({k: v for k, v in common.items() if v is not None})
    settings["recipe"] = _recipe(cfg, call, paths, settings, out, here, layers is not None)
    settings["inputs"] = [path, *settings.get("inputs", ())]  # -o may not be or hold the config file
    if tok is not None:  # the built tokenizer and config.json go to the output (merge/tokenizer/prepare.py)
        if "copy_tokenizer_from" not in cfg.cpift:
            settings["copy_tokenizer_from"] = tok.side_dir
        settings["config_updates"] = {**tok.config_updates, **(settings.get("config_updates") or {})}
        call.notes.extend(tok.notes)
    if layers is not None:  # slices merged and stacked
        settings["config_updates"] = {**(settings.get("config_updates") or {}), "num_hidden_layers": layers}
        settings["inputs"] = [*settings["inputs"], *paths.values()]
    return settings


def _recipe(cfg: MergeConfig, call: MethodCall, paths: Mapping[str, Path], settings: Mapping[str, Any],
            out, here: str | None, layered: bool = False):
    """The recorded recipe: None when the engine makes one from constant parameters (merge/card.py), else
    this config, paths relative to ``out`` and so marked (gradients and filters kept)."""
    from cpift.merge.card import rewrite_config
    from cpift.merge.engine import parse_dtype
    from cpift.merge.io.sizes import parse_size
    from cpift.merge.recipe import is_per_tensor, local_ref

    if not cfg.stack and not layered and not any(is_per_tensor(v) for v in call.kwargs.values()) and not (
            cfg.tokenizer_source or cfg.raw.get("chat_template")):
        return None
    refs = {ref: _card(ref, p, functools.partial(resolve_model, base_dir=here), cfg.source).shown(out)
            for ref, p in paths.items()}
    tok = cfg.tokenizer_source
    if tok not in (None, "base", "union") and tok not in refs:
        refs[tok] = local_ref(resolve_model(tok, "tokenizer_source", cfg.source, base_dir=here), out)
    # The dtypes in effect (the command line may override the config's), spelled as a config does.
    top = {k: str(parse_dtype(settings[k], k)).removeprefix("torch.") for k in ("dtype", "out_dtype")
           if settings.get(k) is not None}
    cpift = {"seed": call.kwargs["seed"]} if "seed" in call.kwargs else {}
    cpift["max_shard_size"] = parse_size(settings.get("max_shard_size", "5GB"))
    if "copy_tokenizer_from" in cfg.cpift or settings["copy_tokenizer_from"] != _default_donor(cfg, paths, here):
        donor = os.path.abspath(settings["copy_tokenizer_from"])
        cpift["copy_tokenizer_from"] = next((refs[r] for r, p in paths.items()
                                             if os.path.abspath(p) == donor), local_ref(donor, out))
    cpift["relative_to_recipe"] = True
    return rewrite_config(cfg.raw, refs, top=top, cpift=cpift)


def _card(ref: str, base: Path, resolve, src):
    """The card's record of a config's model reference; ``model+lora`` names its adapter too."""
    from cpift.merge.card import CardInput
    lora = ref.split("+")[1] if "+" in ref and not os.path.exists(ref) else None
    return CardInput(ref.split("+")[0] if lora else ref, base, adapter=lora and resolve(lora, "model", src))


def _default_donor(cfg: MergeConfig, paths: Mapping[str, Path], here: str | None) -> Path:
    # config.json comes from base_model, else the first model, whatever tokenizer_source says (mergekit's
    # output config); the tokenizer files are built into a side directory (merge/tokenizer/prepare.py).
    return paths[cfg.base_model] if cfg.base_model is not None else paths[cfg.models[0].model]
