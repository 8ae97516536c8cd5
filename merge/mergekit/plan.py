"""From a validated MergeConfig to one call of a ``cpift.merge.methods`` function, and running it."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

from cpift.errors import ConfigError
from cpift.merge.io.safe_parse import load_json_bounded
from cpift.merge.mergekit.config import MergeConfig, ModelSpec, first_setting, load_config
from cpift.merge.mergekit.values import Param, Setting, chain_param, located, uses_position
from cpift.merge.methods.registry import METHODS

# What mergekit 0.1.5 does by default, and what cpift's functions compute: each method's MergekitSpec
# (merge/methods/registry.py); e.g. linear and ties divide by the weights, task_arithmetic does not.


@dataclass
class MethodCall:
    """``METHODS[function].function(*args, out, **kwargs, **common)`` (the registry's), plus notes."""

    function: str
    args: tuple
    kwargs: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _shared(cfg: MergeConfig, key: str, default: Any) -> Any:
    return default if (s := first_setting(None, key, cfg.slice_parameters, cfg.parameters)) is None else s


def _normalize_weights(ws: list[Param]) -> list[Param]:
    """w_i / Σ_j w_j per tensor (a sum below 1e-8 in magnitude counts as 1, as mergekit's divisor does)."""
    def divisor(vals: list[float]) -> float:
        d = sum(vals)
        return 1.0 if abs(d) < 1e-8 else d

    if not any(callable(w) for w in ws):
        d = divisor(ws)
        return [w / d for w in ws]
    funcs = [w if callable(w) else (lambda _n, c=w: c) for w in ws]

    def scaled(i: int) -> Callable[[str], float]:
        return lambda name: funcs[i](name) / divisor([f(name) for f in funcs])

    return [scaled(i) for i in range(len(ws))]


def plan_call(cfg: MergeConfig, *, num_layers: int | None = None, paths: Mapping[str, Any] | None = None,
              native: Collection[str] = ()) -> MethodCall:
    """The cpift function call a config stands for.

    Args:
        cfg: a loaded config.
        num_layers: ``num_hidden_layers`` of the models (needed when a value is a gradient).
        paths: reference as written → resolved path (default: itself); one path is one model.
        native: keywords the function takes beyond the contract (``normalize``, ``rescale``): passed on.

    Returns: MethodCall with the positional model arguments and the method keywords.

    Raises:
        ConfigError: a normalize/rescale value cpift cannot compute; a gradient without ``num_layers``;
            two entries naming one model.
    """
    src = cfg.source
    paths = dict(paths or {})
    path = lambda ref: paths.get(ref, ref)  # noqa: E731
    notes: list[str] = []
    method = cfg.method

    seen: dict[Any, str] = {}
    for m in cfg.models:
        key = path(m.model)
        if key in seen:
            raise ConfigError(f"{src}: {m.field}.model: '{m.model}' is the same model as {seen[key]}")
        seen[key] = f"{m.field} ('{m.model}')"
    base_key = path(cfg.base_model) if cfg.base_model is not None else None
    base_listed = base_key is not None and base_key in seen

    if num_layers is None:
        settings = [*cfg.parameters.values(), *cfg.slice_parameters.values(),
                    *(s for m in cfg.models for s in m.parameters.values())]
        if any(not isinstance(s, bool) and uses_position(s) for s in settings):
            raise ConfigError(f"{src}: a gradient (list of values) needs the models' num_hidden_layers, "
                              f"which was not found in the first model's config.json")

    def chain(spec: ModelSpec | None, key: str) -> list[Setting]:
        scopes = ((spec.parameters if spec else {}), cfg.slice_parameters, cfg.parameters)
        return [s[key] for s in scopes if key in s]

    def param(spec: ModelSpec | None, key: str, default: float | None, fld: str) -> Param:
        return chain_param(chain(spec, key), num_layers, default=default, fld=fld, source=src)

    def fld_of(spec: ModelSpec, key: str) -> str:
        if key in spec.parameters:
            return f"{spec.field}.parameters.{key}"
        return f"slices[0].parameters.{key}" if key in cfg.slice_parameters else f"parameters.{key}"

    mk = METHODS[method].mergekit
    normalize = _shared(cfg, "normalize", mk.normalize)
    # int8_mask needs nothing: mergekit uses it only as the dtype of the TIES sign mask.

    if METHODS[method].roles == ("model_a", "model_b"):
        others = [m for m in cfg.models if path(m.model) != base_key]
        t = param(None, "t", None, "parameters.t")
        return MethodCall(method, (path(cfg.base_model), path(others[0].model)), {"t": t}, notes)

    if METHODS[method].roles == ("model",):  # passthrough of one whole model
        spec = cfg.models[0] if cfg.models else ModelSpec(cfg.base_model, {}, "base_model")
        scale = chain(spec, "scale")
        kw = {"scale": param(spec, "scale", 1.0, fld_of(spec, "scale"))} if scale else {}
        return MethodCall(method, (path(spec.model),), kw, notes)

    if METHODS[method].roles == ("models",):
        specs = list(cfg.models)
        if cfg.base_model is not None and not base_listed and cfg.layer_range is None:
            specs.append(ModelSpec(cfg.base_model, {}, "base_model"))
            notes.append(f"note: base_model '{cfg.base_model}' is not listed in models; as in mergekit, "
                         f"the linear merge includes it as its last input, with the top-level weight")
        ws = [param(m, "weight", None, fld_of(m, "weight")) for m in specs]
        kwargs: dict[str, Any] = {"weights": ws}
        if "normalize" in native:
            kwargs["normalize"] = normalize
        elif not normalize:
            total = sum(ws) if not any(callable(w) for w in ws) else None
            if total is None or abs(total - 1.0) > 1e-6:
                raise ConfigError(f"{src}: parameters.normalize: false is only supported for linear when "
                                  f"the weights are constants summing to 1 (cpift's linear always divides "
                                  f"by the sum of the weights); got "
                                  f"{'per-tensor weights' if total is None else f'a sum of {total:g}'}")
        return MethodCall(method, (tuple(path(m.model) for m in specs),), kwargs, notes)

    specs = [m for m in cfg.models if path(m.model) != base_key]
    if "weight" not in mk.inputs:  # model_stock: the fine-tunes and the shared settings, nothing per model
        kwargs = {p.name: _shared(cfg, p.mergekit, p.mergekit_default) for p in METHODS[method].params
                  if p.mergekit}
        return MethodCall(method, (path(cfg.base_model), tuple(path(m.model) for m in specs)), kwargs, notes)

    # task_arithmetic, ties, dare_linear, dare_ties
    for m in cfg.models:
        if path(m.model) == base_key and m.parameters:
            notes.append(f"note: {m.field}.parameters ({', '.join(m.parameters)}) have no effect: "
                         f"{m.model} is base_model, whose delta is zero (mergekit ignores them too)")
    ws = [param(m, "weight", None, fld_of(m, "weight")) for m in specs]
    lam = _shared(cfg, "lambda", 1.0)
    kwargs = {"lam": float(lam)}
    if method == "task_arithmetic":
        scopes = [("parameters", cfg.parameters), ("slices[0].parameters", cfg.slice_parameters),
                  *((f"{m.field}.parameters", m.parameters) for m in specs)]
        for fld, key in ((f, k) for f, scope in scopes for k in ("density", "rescale") if k in scope):
            notes.append(f"note: {fld}.{key} has no effect in task_arithmetic (mergekit ignores it too); "
                         f"ties and dare_linear sparsify")
    else:
        kwargs["density"] = [param(m, "density", 1.0, fld_of(m, "density")) for m in specs]
        for p in METHODS[method].params:  # breadcrumbs' gamma, della's epsilon
            if p.per_model and p.mergekit not in (None, "weight", "density"):
                kwargs[p.name] = [param(m, p.mergekit, p.mergekit_default, fld_of(m, p.mergekit)) for m in specs]
        rescale = _shared(cfg, "rescale", mk.rescale)
        if "rescale" in native:
            kwargs["rescale"] = rescale
        elif rescale != mk.cpift_rescale:
            what = ("rescales kept delta entries by 1/density" if mk.cpift_rescale
                    else "does not rescale the trimmed deltas")
            raise ConfigError(f"{src}: parameters.rescale: {str(rescale).lower()} is not supported for "
                              f"{method} (cpift's {method} always {what})")
    if "normalize" in native:
        kwargs["normalize"] = normalize
    elif normalize != mk.cpift_normalize:
        if normalize and not mk.cpift_normalize:
            ws = _normalize_weights(ws)
            notes.append("note: normalize: true: the weights are divided by their sum (mergekit divides the "
                         "summed delta instead; equal up to rounding)")
        else:
            default = f" (mergekit's default for {method})" if normalize == mk.normalize else ""
            does = ("divides by the sum of the agreeing weights (TIES disjoint mean)" if normalize is False
                    else "does not divide")
            raise ConfigError(f"{src}: parameters.normalize: {str(normalize).lower()}{default} is not "
                              f"supported for {method}: cpift's {method} always {does}; set normalize: "
                              f"{str(not normalize).lower()} to get that")
    kwargs = {"weights": ws, **kwargs}
    return MethodCall(method, (path(cfg.base_model), tuple(path(m.model) for m in specs)), kwargs, notes)

# Running it


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


def _model_config(model_dir: Path) -> dict | None:
    f = model_dir / "config.json"
    if not f.is_file():
        return None
    conf = load_json_bounded(f.read_bytes(), source=f)
    if not isinstance(conf, dict):
        raise ConfigError(f"{f}: not a model config (expected a JSON object)")
    return conf


def _num_layers(conf: dict | None) -> int | None:
    if not conf:
        return None
    for c in (conf, conf.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer"):
            v = c.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _vocabulary(model_dir: Path) -> dict[str, int] | None:
    """token → id of a fast tokenizer (tokenizer.json: model vocab plus added tokens), None if absent."""
    f = model_dir / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        data = load_json_bounded(f.read_bytes(), source=f)
        vocab = data["model"]["vocab"]
        out = (dict(vocab) if isinstance(vocab, dict)
               else {entry[0]: i for i, entry in enumerate(vocab)})
        for tok in data.get("added_tokens") or []:
            out[tok["content"]] = tok["id"]
        return out
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        raise ConfigError(f"{f}: not a readable tokenizer.json") from None


def _check_tokenizer(cfg: MergeConfig, tok_dir: Path, dirs: list[Path], first: Path) -> None:
    """tokenizer_source is exact in cpift only when mergekit's vocabulary remapping is the identity."""
    fld = f"{cfg.source}: tokenizer_source"
    ref = _vocabulary(tok_dir)
    if ref is None:
        raise ConfigError(f"{fld}: {tok_dir} has no tokenizer.json, so cpift cannot check that every model "
                          f"shares its vocabulary (mergekit would remap embeddings); leave tokenizer_source "
                          f"out to copy the tokenizer of base_model")
    for d in dirs:
        voc = _vocabulary(d)
        if voc is None:
            raise ConfigError(f"{fld}: {d} has no tokenizer.json, so cpift cannot check its vocabulary "
                              f"against {tok_dir}'s; leave tokenizer_source out")
        if voc != ref:
            raise ConfigError(f"{fld}: {d} and {tok_dir} have different vocabularies; mergekit would remap "
                              f"the embedding rows, which cpift does not do")
    conf = _model_config(first) or {}
    size = conf.get("vocab_size", (conf.get("text_config") or {}).get("vocab_size"))
    if size != len(ref) or max(ref.values(), default=-1) >= len(ref):
        raise ConfigError(f"{fld}: the tokenizer has {len(ref)} tokens but the embeddings have {size} rows; "
                          f"mergekit would resize them to the tokenizer, which cpift does not do; leave "
                          f"tokenizer_source out")


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
    first = paths[cfg.models[0].model]
    num_layers = _num_layers(_model_config(first))
    if cfg.layer_range is not None:
        for m in cfg.models:
            n = _num_layers(_model_config(paths[m.model]))
            if n is None:
                raise ConfigError(f"{src}: {m.field}.layer_range: no num_hidden_layers in "
                                  f"{paths[m.model] / 'config.json'} to check the range against")
            if cfg.layer_range != (0, n):
                raise ConfigError(f"{src}: {m.field}.layer_range: {list(cfg.layer_range)} does not cover "
                                  f"the model's {n} layers; partial layer ranges are not supported "
                                  f"(use [0, {n}])")
    donor = paths[cfg.base_model] if cfg.base_model is not None else first
    if cfg.tokenizer_source is not None:
        tok = (donor if cfg.tokenizer_source == "base"
               else paths.get(cfg.tokenizer_source)
               or resolve(cfg.tokenizer_source, "tokenizer_source", src))
        _check_tokenizer(cfg, tok, list(dict.fromkeys(paths.values())), first)
        donor = tok
    if "copy_tokenizer_from" in cfg.cpift:
        donor = resolve(cfg.cpift["copy_tokenizer_from"], "cpift.copy_tokenizer_from", src)

    spec = METHODS[cfg.method]
    fn = spec.function  # the engine, imported only once the config is known to be good
    native = set(spec.native)
    # A Hub model goes to the method as org/name@<commit read>: its card and recipe then name it by id.
    cards = {ref: _card(ref, p, resolve, src) for ref, p in paths.items()}
    hub_ids = {ref: c.recipe_ref for ref, c in cards.items() if c.hub_repo or c.adapter}
    call = (MethodCall(cfg.method, (), {}) if cfg.stack
            else plan_call(cfg, num_layers=num_layers, paths={**paths, **hub_ids}, native=native))
    if spec.param("seed") is not None:
        call.kwargs["seed"] = seed if seed is not None else cfg.cpift.get("seed", 0)
    if cfg.cpift.get("global_trim"):
        call.kwargs["global_trim"] = True
    settings = {"dtype": cfg.dtype, "out_dtype": cfg.out_dtype or cfg.dtype, "copy_tokenizer_from": donor,
                **{k: cfg.cpift[k] for k in ("max_shard_size",) if k in cfg.cpift}}
    settings.update({k: v for k, v in common.items() if v is not None})
    settings["recipe"] = _recipe(cfg, call, paths, settings, out, here)
    settings["inputs"] = [path, *settings.get("inputs", ())]  # -o may not be or hold the config file
    if cfg.stack:
        from cpift.merge.mergekit.stack import run_stack

        return run_stack(cfg, out, paths, **settings)
    result = fn(*call.args, out, **call.kwargs, **settings)
    result.notes.extend(call.notes)
    return result


def _recipe(cfg: MergeConfig, call: MethodCall, paths: Mapping[str, Path], settings: Mapping[str, Any],
            out, here: str | None):
    """The recorded recipe: None when the engine makes one from constant parameters (merge/card.py), else
    this config, paths relative to ``out`` and so marked (gradients and filters kept)."""
    from cpift.merge.card import is_per_tensor, local_ref, rewrite_config
    from cpift.merge.engine import parse_dtype
    from cpift.merge.io.sizes import parse_size

    if not cfg.stack and not any(is_per_tensor(v) for v in call.kwargs.values()):
        return None
    refs = {ref: _card(ref, p, functools.partial(resolve_model, base_dir=here), cfg.source).shown(out)
            for ref, p in paths.items()}
    tok = cfg.tokenizer_source
    if tok not in (None, "base") and tok not in refs:
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
    if cfg.tokenizer_source not in (None, "base"):
        return paths.get(cfg.tokenizer_source) or resolve_model(cfg.tokenizer_source, "tokenizer_source",
                                                                cfg.source, base_dir=here)
    return paths[cfg.base_model] if cfg.base_model is not None else paths[cfg.models[0].model]
