"""mergekit ``slices`` that stack layer ranges (``passthrough``): frankenmerges and SOLAR-style depth
up-scaling, with mergekit 0.1.5's semantics (its plan.py and merge.py, read for this):

- every slice lists one source ``{model, layer_range: [start, end)}`` (passthrough takes one input);
  the output's layers are the slices' ranges in order, renumbered 0, 1, ... (``model.layers.{i}.*``),
  bit for bit, and config.json's ``num_hidden_layers`` is the sum of the ranges' lengths;
- tensors outside the layers: the embeddings (a name holding ``embed``, ``wte`` or ``wpe``) come from
  the first slice's source, every other one (final norm, ``lm_head``) from the last slice's, as
  mergekit's pre- and post-layer weights do; config.json and the tokenizer from base_model, else the
  first slice's source (mergekit picks "the first referenced model" out of a set: arbitrary);
- ``scale`` (per source, per slice or top level, with filters and gradients) multiplies a tensor;
  filters match the output name; a gradient's position is the layer's place in its slice,
  i / (n − 1) (1 for a one-layer slice), and 0 for the tensors outside the layers.

Refused, each naming its field (mergekit would merge or silently produce something else): a range
outside [0, num_hidden_layers] of its model, an empty or reversed range (mergekit writes no layers, or
a wrong ``num_hidden_layers``), a model of another architecture or with other layer shapes, more than
one source in a slice. Slices that merge several sources (linear, slerp, ties, ... per slice) are
slices.py's, over the same views. The stack is a ``LayerView`` (a Checkpoint whose names are the output's, each mapped
onto its source's bytes), run through ``passthrough`` and the streaming engine like any model.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from cpift.errors import ConfigError
from cpift.merge.io.checkpoint import INDEX_NAME, Checkpoint
from cpift.merge.io.model_files import read_model_json
from cpift.merge.mergekit.values import Setting, chain_param, layer_range, located, slice_sources, split_layer

_PRE = ("embed", "wte", "wpe")


@dataclass(frozen=True)
class StackSlice:
    """One slice: its single source model, its [start, end), and the parameters of both scopes."""

    model: str
    layer_range: tuple[int, int]
    source_parameters: Mapping[str, Setting]
    parameters: Mapping[str, Setting]
    field: str  # "slices[2]"


def parse_stack(raw: list, source, *, model_ref: Callable, parse_params: Callable) -> tuple[StackSlice, ...]:
    """Validate ``slices:`` of a passthrough config (no files read)."""
    out = []
    for i, sl in enumerate(raw):
        fld = f"slices[{i}]"
        if not isinstance(sl, dict):
            raise ConfigError(f"{located(source, fld)}: expected a mapping with 'sources', got {sl!r}")
        sources = slice_sources(sl, fld, source)
        if sl.get("base_model") is not None:
            raise ConfigError(f"{located(source, f'{fld}.base_model')}: passthrough has no base model")
        if len(sources) != 1:
            raise ConfigError(f"{located(source, f'{fld}.sources')}: passthrough takes one source per slice, "
                              f"got {len(sources)} (mergekit refuses more too)")
        s, sfld = sources[0], f"{fld}.sources[0]"
        if not isinstance(s, dict) or "model" not in s:
            raise ConfigError(f"{located(source, f'{sfld}.model')}: missing")
        for key in s:
            if key not in ("model", "layer_range", "parameters"):
                raise ConfigError(f"{located(source, f'{sfld}.{key}')}: unknown key")
        lr = layer_range(s.get("layer_range"), f"{sfld}.layer_range", source)
        out.append(StackSlice(model_ref(s["model"], f"{sfld}.model", source), lr,
                              parse_params(s.get("parameters"), f"{sfld}.parameters"),
                              parse_params(sl.get("parameters"), f"{fld}.parameters"), fld))
    return tuple(out)


class LayerView(Checkpoint):
    """A Checkpoint whose tensors are other checkpoints' tensors under new names, each read through its
    source (zero-copy, or with a LoRA adapter merged in: an AdaptedCheckpoint source, merge/io/lora.py)."""

    def __init__(self, entries: list[tuple[str, Checkpoint, str]], *, path: Path, ref: str):
        for _, ckpt, _ in entries:
            if ckpt.index_name != INDEX_NAME:
                raise ConfigError(f"{ckpt.path}: a layer stack reads safetensors sources only (this one is .bin)")
        self.path = self.dir = Path(path)
        self.ref = ref
        self.notes: list[str] = []
        self.index_name = INDEX_NAME  # what resume hashes: the first source's index, if it has one
        self._bin = None  # safetensors sources only: tensors are read from their mapped files
        self.tensors = {out: ckpt.info(name) for out, ckpt, name in entries}
        self._order = [out for out, _, _ in entries]
        self._src = {out: (ckpt, name) for out, ckpt, name in entries}
        self._maps = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self._order)

    def sources(self) -> list[Checkpoint]:
        """The checkpoints this view reads, once each (the card lists them: merge/card.py model_inputs)."""
        return list({id(c): c for c, _ in self._src.values()}.values())

    def get(self, name: str):
        ckpt, src = self._src[name]
        return ckpt.get(src)

    def populate(self, name: str) -> None:
        ckpt, src = self._src[name]
        ckpt.populate(src)

    def release(self, name: str) -> None:
        ckpt, src = self._src[name]
        ckpt.release(src)

    def input_paths(self) -> list[Path]:
        return list(dict.fromkeys(p for c in self.sources() for p in c.input_paths()))

    def close(self) -> None:
        for c in self.sources():
            c.close()


def layer_config(path: Path, fld: str, source) -> dict:
    f = path / "config.json"
    conf = read_model_json(path, "config.json", error=ConfigError)
    if not isinstance(conf, dict) or not isinstance(conf.get("num_hidden_layers"), int):
        raise ConfigError(f"{located(source, fld)}: {f} has no num_hidden_layers to place the layer range")
    return conf


def layer_tensors(ckpt: Checkpoint) -> tuple[list[str], dict[int, list[tuple[str, str, str]]], list[str]]:
    """Embedding names, layer i → [(name, prefix, suffix)], other names; in storage order."""
    pre, post, layers = [], [], {}
    for n in ckpt.names():
        parts = split_layer(n)
        if parts is not None:
            layers.setdefault(parts[1], []).append((n, parts[0], parts[2]))
        else:
            (pre if any(p in n for p in _PRE) else post).append(n)
    return pre, layers, post


def open_sources(refs, paths: Mapping[str, Path], opened: Mapping[str, Any] | None) -> dict[str, Checkpoint]:
    """Each model reference opened as the ``models:`` form opens it (merge/io/lora.py ``open_model``): a
    ``BASE+ADAPTER`` reference with its adapter merged in, a Hub id at the commit read (``opened``)."""
    from cpift.merge.io.lora import open_model

    return {ref: open_model((opened or {}).get(ref, paths[ref])) for ref in dict.fromkeys(refs)}


def plan_stack(slices: tuple[StackSlice, ...], paths: Mapping[str, Path], top: Mapping[str, Setting],
               source, opened: Mapping[str, Any] | None = None) -> tuple[LayerView, Any, int]:
    """The stacked view, its ``scale`` (None, or a function of the output name) and its layer count."""
    ckpts = open_sources([sl.model for sl in slices], paths, opened)
    entries: list[tuple[str, Checkpoint, str]] = []
    position: dict[str, tuple[int, float]] = {}
    shapes: dict[str, tuple] = {}
    plans = {ref: layer_tensors(c) for ref, c in ckpts.items()}
    k = 0
    for si, sl in enumerate(slices):
        k = _add_layers(si, sl, k, paths[sl.model], ckpts[sl.model], plans[sl.model][1], source,
                        entries=entries, position=position, shapes=shapes)
    first, last = slices[0].model, slices[-1].model
    pre = [(n, ckpts[first], n) for n in plans[first][0]]
    post = [(n, ckpts[last], n) for n in plans[last][2]]
    position.update({n: (0, 0.0) for n, _, _ in pre})
    position.update({n: (len(slices) - 1, 0.0) for n, _, _ in post})
    refs = " + ".join(f"{sl.model}[{sl.layer_range[0]}, {sl.layer_range[1]})" for sl in slices)
    view = LayerView(pre + entries + post, path=paths[first], ref=refs)
    return view, _stack_scale(slices, top, source, position), k


def _add_layers(si: int, sl: StackSlice, k: int, p: Path, ckpt: Checkpoint, layers: Mapping, source, *,
                entries: list, position: dict, shapes: dict) -> int:
    """Append slice ``si``'s layers as output layers k, k+1, ... (their position in the slice noted, each
    shape checked against the stack's other layers); the next output layer."""
    conf = layer_config(p, f"{sl.field}.sources[0].model", source)  # architectures: consistency.py
    n = conf["num_hidden_layers"]
    start, end = sl.layer_range
    if end > n:
        raise ConfigError(f"{located(source, f'{sl.field}.sources[0].layer_range')}: {list(sl.layer_range)} "
                          f"is outside the model's {n} layers (end is excluded: at most [0, {n}])")
    for i in range(start, end):
        if i not in layers:
            raise ConfigError(f"{located(source, f'{sl.field}.sources[0].layer_range')}: {p} holds no "
                              f"tensors of layer {i}")
        for name, prefix, suffix in layers[i]:
            out = f"{prefix}{k}{suffix}"
            shape = ckpt.info(name).shape
            if shapes.setdefault(prefix + suffix, shape) != shape:
                raise ConfigError(f"{located(source, f'{sl.field}.sources[0].model')}: tensor '{name}' of "
                                  f"{p} has shape {list(shape)}, the stack's other layers "
                                  f"{list(shapes[prefix + suffix])}")
            entries.append((out, ckpt, name))
            position[out] = (si, (i - start) / (end - start - 1) if end - start > 1 else 1.0)
        k += 1
    return k


def _stack_scale(slices: tuple[StackSlice, ...], top: Mapping[str, Setting], source,
                 position: Mapping[str, tuple[int, float]]) -> Callable[[str], float] | None:
    """The ``scale`` of each output tensor from its slice's setting (None: no slice sets one)."""
    chains = [[s[key] for s in (sl.source_parameters, sl.parameters, top) if key in s]
              for sl in slices for key in ("scale",)]
    if not any(chains):
        return None
    params = [chain_param(c, None, default=1.0, fld=f"{sl.field}.parameters.scale", source=source,
                          position=lambda name: position[name][1]) for c, sl in zip(chains, slices)]

    def scale(name: str) -> float:
        p = params[position[name][0]]
        return p(name) if callable(p) else p

    return scale


def run_stack(cfg, out: str | os.PathLike, paths: Mapping[str, Path], *, recipe: Mapping[str, Any],
              opened: Mapping[str, Any] | None = None, **settings: Any):
    """Run a passthrough ``slices`` config (``cfg.stack``) through ``passthrough``; ``opened``: how each
    reference opens (run.py: ``BASE+ADAPTER`` and Hub ids as the ``models:`` form opens them)."""
    from cpift.merge.methods import passthrough

    view, scale, layers = plan_stack(cfg.stack, paths, cfg.parameters, cfg.source, opened)
    settings["inputs"] = [*settings.get("inputs", ()), *paths.values()]
    updates = {**(settings.pop("config_updates", None) or {}), "num_hidden_layers": layers}  # vocab_size too
    return passthrough(view, out, scale=scale, recipe=recipe, config_updates=updates, **settings)
