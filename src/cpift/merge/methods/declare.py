"""A merge method is a per-tensor function plus its declaration (the idea of mergekit's easy_define).

``@method(...)`` beside the function declares what the method merges (``Inputs``), each parameter
(``ParamSpec``: range, default, per-model or not, mergekit key) and where the method comes from, and
registers it (merge/methods/registry.py). The per-tensor function then only computes:

    fn(xs, out, *, backend, shape, **values)

``xs``: the inputs' flat float views of one tensor (the base first where the method requires one; an
optional base comes as the keyword ``base``, None when not given), ``out``: the flat output to fill,
``shape``: the tensor's shape, ``values``: every declared parameter resolved for this tensor and
range-checked (a number, a list with one number per model, a flag); a function that takes ``name`` gets
the tensor's name (a seeded method's per-tensor seed). A ParameterError it raises (a
refusal that depends on the tensor's values) is reported naming the tensor. Opening the
models, validating the parameters, streaming, publishing, the card and the recipe are the runner's
(merge/methods/runner.py); the command, the mergekit planning and the ``cpift.<method>`` function are
derived from the declaration. A method file imports its kernels inside its function, so declaring
(and listing) methods loads no torch.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from .inputs import Inputs
from .registry import MergekitSpec, MethodSpec, ParamSpec, register

# check(values, tensor) -> None: a rule between parameters (raise ParameterError); values as the function gets them.
Check = Callable[[Mapping[str, Any], str], None]
# prepare(checkpoints, values, options) -> {tensor name: extra keywords} or None: a whole-model pass the runner
# makes once before streaming (TIES' global trim); values as the card shows them, options the MergeOptions.
Prepare = Callable[[Sequence[Any], Mapping[str, Any], Any], Optional[Mapping[str, Mapping[str, Any]]]]


def method(name: str, *, inputs: Inputs, params: tuple[ParamSpec, ...] = (), definition: str, paper: str,
           summary: str, mergekit: MergekitSpec | None = None, bench: Mapping[str, str] | None = None,
           check: Check | None = None, cli: str | None = None,
           notes: Callable[[Mapping[str, Any]], list[str]] | None = None, settings: tuple[ParamSpec, ...] = (),
           prepare: Prepare | None = None) -> Callable[[Callable], Callable]:
    """Declare and register the per-tensor function it decorates as the merge method ``name``.

    ``notes``: the notes a merge prints, from the parameters as the card shows them. ``settings``: true/false
    keywords a mergekit config sets (normalize, rescale) that have no option on the command line; validated
    like the parameters. ``prepare``: a whole-model pass before streaming."""
    if inputs.base not in ("required", "optional", "pair", "none"):
        raise ValueError(f"method '{name}': inputs.base must be required, optional, pair or none")

    def declare(fn: Callable) -> Callable:
        register(MethodSpec(name, cli or name.replace("_", "-"), fn.__module__, inputs, tuple(params),
                            definition, paper, summary, mergekit, bench=dict(bench or {}), tensor=fn, check=check,
                            notes=notes, settings=tuple(settings), prepare=prepare))
        return fn

    return declare

