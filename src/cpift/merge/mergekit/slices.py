"""mergekit ``slices`` merged by a method (linear, slerp, ties, ...): several slices, each merging the
same-length layer ranges of its sources, the slices stacked; mergekit 0.1.5's semantics (plan.py,
config.py, parameter_resolver.py, read for this). ``passthrough`` stacks are stack.py's.

The output's layers are the slices' in order, renumbered 0, 1, ...; output layer k of slice i merges
layer ``lo_j + (k − offset_i)`` of each source j of slice i with the method; config.json's
``num_hidden_layers`` is the sum of the slices' lengths. As in mergekit:

- the tensors outside the layers: the embeddings (``embed``, ``wte``, ``wpe``) are merged over the
  first slice's sources, every other one (final norm, ``lm_head``) over the last slice's, each with
  that slice's parameters and base model, at gradient position 0;
- a slice's base model is its own ``base_model``, else the top-level one; it must be one of the
  slice's sources (linear ignores it); a source listed twice in a slice is refused;
- parameters: the source's own, then the slice's, then the top level, then mergekit's default; a
  gradient's position is the layer's place in its slice, i / (n − 1) (1 for a one-layer slice);
  filters of whole-merge parameters (``t``, ``lambda``) match the output tensor name, those of
  per-model ones (``weight``, ``density``) the source's own name (``model.layers.20.`` of the source
  feeding output layer 4), as mergekit resolves them.

How it runs: one ``LayerView`` per input position of the method (a Checkpoint whose names are the
output's, each mapped onto the bytes of that position's source in the tensor's slice), and the
method's function unchanged over the views, its parameters turned into functions of the output name
that dispatch to the tensor's slice (plan.py's ``plan_call`` runs once per slice). So every registered
method mergekit allows in slices runs, streamed, through the fused CPU and Triton kernels as usual.

Refused (with the field): unequal range lengths within a slice, a range outside its model's layers,
empty or reversed ranges, slices with different numbers of sources (mergekit merges each tensor
separately; cpift runs one method call over the views, whose number is fixed), a whole-merge value
that differs between slices where the function takes one value (``lambda``, ``normalize``, ...),
other architectures or layer shapes, ``.bin`` sources. Known difference: ``normalize: true`` of
task_arithmetic divides each weight by a sum of the weights evaluated at that source's tensor name
(mergekit: each at its own source's), which differs only for filters naming a layer index.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Mapping

from cpift.errors import ConfigError
from cpift.merge.mergekit.checks import check_values
from cpift.merge.mergekit.plan import MethodCall, plan_call
from cpift.merge.mergekit.spec import MergeConfig, MergeSlice, ModelSpec
from cpift.merge.mergekit.stack import LayerView, layer_config, layer_tensors, open_sources
from cpift.merge.mergekit.values import layer_range, located, slice_sources, split_layer
from cpift.merge.methods.registry import METHODS

# Whole-merge keywords the method functions take per tensor (a function of the name): a value that
# differs between slices becomes one; any other (lambda, normalize, ...) must be the same in every slice.
PER_TENSOR_SHARED = ("t",)


def parse_slices(raw: Any, source, method: str, top_base: str | None, params: Mapping, *,
                 parse_model: Callable, parse_params: Callable, model_ref: Callable) -> tuple[MergeSlice, ...]:
    """Validate ``slices:`` of a config merged by ``method`` (no files read).

    ``parse_model(raw, fld)`` → (ModelSpec, layer_range); ``parse_params(raw, fld)`` → the slice's
    parameters; ``model_ref(raw, fld)`` → a model reference (config.py's).
    """
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{located(source, 'slices')}: expected a non-empty list of slices")
    out = []
    for i, sl in enumerate(raw):
        fld = f"slices[{i}]"
        if not isinstance(sl, dict):
            raise ConfigError(f"{located(source, fld)}: expected a mapping with 'sources', got {sl!r}")
        specs, ranges = [], []
        for j, s in enumerate(slice_sources(sl, fld, source)):
            spec, lr = parse_model(s, f"{fld}.sources[{j}]")
            specs.append(spec)
            ranges.append(layer_range(lr, f"{fld}.sources[{j}].layer_range", source))
        for j, (lo, hi) in enumerate(ranges):
            if hi - lo != ranges[0][1] - ranges[0][0]:
                raise ConfigError(f"{located(source, f'{fld}.sources[{j}].layer_range')}: {[lo, hi]} has "
                                  f"{hi - lo} layers, {fld}.sources[0] {list(ranges[0])} has "
                                  f"{ranges[0][1] - ranges[0][0]}; every source of a slice gives the same "
                                  f"number of layers (mergekit refuses this too)")
        base = sl.get("base_model")
        base = model_ref(base, f"{fld}.base_model", source) if base is not None else top_base
        sparams = parse_params(sl.get("parameters"), f"{fld}.parameters")
        check_values(method, tuple(specs), base, params, sparams, source, slice_form=True, where=fld)
        if out and len(specs) != len(out[0].sources):
            raise ConfigError(f"{located(source, f'{fld}.sources')}: {len(specs)} sources, slices[0] has "
                              f"{len(out[0].sources)}; cpift merges every slice with one call of {method} "
                              f"over the same inputs, so every slice needs the same number of sources")
        out.append(MergeSlice(tuple(specs), tuple(ranges), base, sparams, fld))
    return tuple(out)


def is_whole(cfg: MergeConfig, paths: Mapping[str, Path]) -> bool:
    """One slice whose sources all span their models' layers, with the top-level base: ``plan_call``'s
    one merge of whole models does it (and checks it like a ``models:`` config)."""
    if len(cfg.slices) != 1 or cfg.slices[0].base_model != cfg.base_model:
        return False
    sl = cfg.slices[0]
    return all(r == (0, layer_config(paths[m.model], f"{m.field}.layer_range", cfg.source)["num_hidden_layers"])
               for m, r in zip(sl.sources, sl.ranges))


def check_no_remap(cfg: MergeConfig, tok: Any, paths: Mapping[str, Path]) -> None:
    """Stacked slices read the sources' embedding rows as they are: refuse a tokenizer field that would
    move them (merge/tokenizer/prepare.py's TokenizerSetup, or None) or cut them to the vocabulary."""
    if tok is None or tok.vocabulary is None:
        return
    rows = tok.config_updates.get("vocab_size")
    fld = "tokenizer" if "tokenizer" in cfg.raw else "tokenizer_source"
    for m in cfg.models:
        n = layer_config(paths[m.model], f"{m.field}.model", cfg.source).get("vocab_size")
        if tok.remaps_rows() or (rows is not None and n != rows):
            raise ConfigError(f"{located(cfg.source, fld)}: remapping the embedding rows of stacked "
                              f"slices is not supported yet (every model's vocabulary must be the output's, "
                              f"here {rows} tokens; {m.model} has {n} rows)")


def _flatten(args: tuple) -> list:
    return [x for a in args for x in (a if isinstance(a, tuple) else (a,))]


def _rebuild(args: tuple, flat: list) -> tuple:
    it = iter(flat)
    return tuple(tuple(next(it) for _ in a) if isinstance(a, tuple) else next(it) for a in args)


class _Layout:
    """Where each output tensor comes from: its slice, its place in it, its source names per slice source."""

    def __init__(self, cfg: MergeConfig, paths: Mapping[str, Path], opened: Mapping[str, Any] | None = None):
        src = cfg.source
        self._check_ranges(cfg, paths)  # config.json only: before any checkpoint is opened
        self.ckpts = open_sources([m.model for sl in cfg.slices for m in sl.sources], paths, opened)
        plans = {ref: layer_tensors(c) for ref, c in self.ckpts.items()}
        self.slice_of: dict[str, int] = {}
        self.position: dict[str, float] = {}
        # (slice i, source j) → [(output name, source name)], in the output's order
        self.entries: dict[tuple[int, int], list[tuple[str, str]]] = {}
        shapes: dict[str, tuple] = {}
        k, last = 0, len(cfg.slices) - 1
        for i, sl in enumerate(cfg.slices):
            for j, (m, (lo, hi)) in enumerate(zip(sl.sources, sl.ranges)):
                p = paths[m.model]
                pre, layers, post = plans[m.model]
                ent = self.entries.setdefault((i, j), [])
                if i == 0:
                    ent += [(name, name) for name in pre]
                for o in range(hi - lo):
                    if lo + o not in layers:
                        raise ConfigError(f"{located(src, f'{m.field}.layer_range')}: {p} holds no tensors of "
                                          f"layer {lo + o}")
                    for name, prefix, suffix in layers[lo + o]:
                        shape = self.ckpts[m.model].info(name).shape
                        if shapes.setdefault(prefix + suffix, shape) != shape:
                            raise ConfigError(f"{located(src, f'{m.field}.model')}: tensor '{name}' of {p} has "
                                              f"shape {list(shape)}, the output's other layers "
                                              f"{list(shapes[prefix + suffix])}")
                        out = f"{prefix}{k + o}{suffix}"
                        ent.append((out, name))
                        self.slice_of[out] = i
                        self.position[out] = o / (hi - lo - 1) if hi - lo > 1 else 1.0
                if i == last:
                    ent += [(name, name) for name in post]
                    self.slice_of.update({name: last for name in post})
            k += sl.length
        self.slice_of.update({name: 0 for name, _ in self.entries[(0, 0)] if name not in self.slice_of})  # pre
        self.layers = k
        self.source_name = {key: dict(e) for key, e in self.entries.items()}

    @staticmethod
    def _check_ranges(cfg: MergeConfig, paths: Mapping[str, Path]) -> None:
        src = cfg.source
        for sl in cfg.slices:
            for m, (lo, hi) in zip(sl.sources, sl.ranges):
                p = paths[m.model]
                conf = layer_config(p, f"{m.field}.model", src)  # architectures: merge/consistency.py
                n = conf["num_hidden_layers"]
                if hi > n:
                    raise ConfigError(f"{located(src, f'{m.field}.layer_range')}: {[lo, hi]} is outside the "
                                      f"model's {n} layers (end is excluded: at most [0, {n}])")

    @staticmethod
    def src_position(lo: int, n: int) -> Callable[[str], float]:
        """Gradient position of a source's tensor name (the source's range starts at ``lo``, n layers)."""
        def pos(name: str) -> float:
            parts = split_layer(name)
            if parts is None:
                return 0.0
            return (parts[1] - lo) / (n - 1) if n > 1 else 1.0
        return pos


def _per_tensor(values: list, slice_of: Mapping[str, int], rename: list | None) -> Any:
    """One value per slice → a constant (all equal constants) or a function of the output name."""
    if not any(callable(v) for v in values) and all(v == values[0] for v in values):
        return values[0]

    def value(name: str):
        i = slice_of[name]
        v = values[i]
        if not callable(v):
            return v
        return v(rename[i][name]) if rename is not None else v(name)

    return value


def plan_slices(cfg: MergeConfig, paths: Mapping[str, Path], native,
                opened: Mapping[str, Any] | None = None) -> tuple[MethodCall, int]:
    """The method call over one LayerView per input position, and the output's layer count; ``opened``:
    how each reference opens (stack.py ``open_sources``)."""
    lay = _Layout(cfg, paths, opened)
    calls_out, calls_src, orders, token = _slice_calls(cfg, paths, native, lay)
    _check_arrangement(cfg, calls_out)
    view = functools.partial(_view, cfg, lay, paths)
    views = [view([o[p] for o in orders]) for p in range(len(orders[0]))]
    kwargs = _merged_kwargs(cfg, lay, calls_out, calls_src, orders, token, view)
    notes = list(dict.fromkeys(n for c in calls_out for n in c.notes))
    return MethodCall(cfg.method, _rebuild(calls_out[0].args, views), kwargs, notes), lay.layers


def _slice_calls(cfg: MergeConfig, paths: Mapping[str, Path], native,
                 lay: _Layout) -> tuple[list[MethodCall], list[list[MethodCall]], list[list[int]], dict[str, int]]:
    """Each slice's call at the output's layer positions, its calls at each source's positions, the order of
    its sources in the call's arguments, and each model token's index in its slice."""
    token = {}  # "slices[i]:resolved path" → source index in the slice
    calls_out, calls_src, orders = [], [], []
    for i, sl in enumerate(cfg.slices):
        sub = dataclasses.replace(cfg, models=sl.sources, base_model=sl.base_model, slice_parameters=sl.parameters,
                                  layer_range=sl.ranges[0], slices=())
        toks = {m.model: f"slices[{i}]:{paths[m.model]}" for m in sl.sources}  # one model of slice i
        for j, m in enumerate(sl.sources):
            token[toks[m.model]] = j
        if sl.base_model is not None and sl.base_model not in toks:
            toks[sl.base_model] = f"slices[{i}]:{paths.get(sl.base_model, sl.base_model)}"
        out_pos = lambda name: lay.position.get(name, 0.0)  # noqa: E731
        calls_out.append(plan_call(sub, num_layers=sl.length, paths=toks, native=native, position=out_pos))
        calls_src.append([plan_call(sub, num_layers=sl.length, paths=toks, native=native,
                                    position=lay.src_position(lo, sl.length)) for lo, _ in sl.ranges])
        orders.append([token[t] for t in _flatten(calls_out[i].args)])
    return calls_out, calls_src, orders, token


def _check_arrangement(cfg: MergeConfig, calls_out: list[MethodCall]) -> None:
    """Every slice must pass its models to the method in slices[0]'s arrangement."""
    shape = [len(a) if isinstance(a, tuple) else None for a in calls_out[0].args]
    for i, c in enumerate(calls_out):
        if [len(a) if isinstance(a, tuple) else None for a in c.args] != shape:
            raise ConfigError(f"{located(cfg.source, f'{cfg.slices[i].field}.sources')}: the method takes its "
                              f"inputs in another arrangement than in slices[0] (check each slice's base_model)")


def _view(cfg: MergeConfig, lay: _Layout, paths: Mapping[str, Path], js: list[int]) -> LayerView:
    """The layers of source js[i] of each slice i, as one model."""
    entries = [(out, lay.ckpts[cfg.slices[i].sources[js[i]].model], name)
               for (i, j), ent in lay.entries.items() for out, name in ent if js[i] == j]
    refs = " + ".join(f"{sl.sources[js[i]].model}{list(sl.ranges[js[i]])}" for i, sl in enumerate(cfg.slices))
    return LayerView(entries, path=paths[cfg.slices[0].sources[js[0]].model], ref=refs)


def _merged_kwargs(cfg: MergeConfig, lay: _Layout, calls_out: list[MethodCall], calls_src: list[list[MethodCall]],
                   orders: list[list[int]], token: dict[str, int], view: Callable) -> dict[str, Any]:
    """The slices' keywords as one call's: a model by keyword as a view, per-model and per-slice values per
    tensor; a constant that differs between slices is refused."""
    models_arg = calls_out[0].args[-1] if isinstance(calls_out[0].args[-1], tuple) else ()
    kwargs: dict[str, Any] = {}
    for key, v0 in calls_out[0].kwargs.items():
        if isinstance(v0, str) and v0 in token:  # a model passed by keyword (nuslerp's base)
            kwargs[key] = view([token[c.kwargs[key]] for c in calls_out])
        elif isinstance(v0, list):  # one value per model: the model's own names and place in its slice
            offset = len(_flatten(calls_out[0].args)) - len(models_arg)
            kwargs[key] = [_per_model(cfg, lay, calls_src, [orders[i][offset + q] for i in range(len(cfg.slices))],
                                      key, q) for q in range(len(v0))]
        else:
            kwargs[key] = _shared(cfg, lay, calls_out, key, v0)
    return kwargs


def _per_model(cfg: MergeConfig, lay: _Layout, calls_src: list[list[MethodCall]], js: list[int], key: str,
               q: int) -> Any:
    """Model q's value of ``key``, per tensor: source js[i]'s value in slice i, under that source's names."""
    vals = [calls_src[i][js[i]].kwargs[key][q] for i in range(len(cfg.slices))]
    rename = [lay.source_name[(i, js[i])] for i in range(len(cfg.slices))]
    return _per_tensor(vals, lay.slice_of, rename)


def _shared(cfg: MergeConfig, lay: _Layout, calls_out: list[MethodCall], key: str, v0: Any) -> Any:
    """A value shared by the models, per tensor from its slice; a constant must be the same in every slice."""
    vals = [c.kwargs[key] for c in calls_out]
    if not any(callable(v) for v in vals) and any(v != v0 for v in vals) and key not in PER_TENSOR_SHARED:
        i = next(i for i, v in enumerate(vals) if v != v0)
        spec = METHODS[cfg.method].param(key)
        name = (spec.mergekit if spec is not None else None) or key
        raise ConfigError(f"{located(cfg.source, f'{cfg.slices[i].field}.parameters')}: {name} = {vals[i]!r} here "
                          f"but {v0!r} in slices[0]; cpift's {cfg.method} takes one {name} for the whole merge")
    return _per_tensor(vals, lay.slice_of, None)


def slice_models(slices: tuple[MergeSlice, ...]) -> tuple[ModelSpec, ...]:
    """Every model the slices name, once, in order of first mention (run.py resolves them)."""
    seen: dict[str, ModelSpec] = {}
    for sl in slices:
        for m in sl.sources:
            seen.setdefault(m.model, ModelSpec(m.model, {}, m.field))
    return tuple(seen.values())
