"""A merge method is a per-tensor function plus its declaration (the idea of mergekit's easy_define).

``@method(...)`` beside the function declares what the method merges (``Inputs``), each parameter
(``ParamSpec``: range, default, per-model or not, mergekit key) and where the method comes from, and
registers it (merge/methods/registry.py). The per-tensor function then only computes:

    fn(xs, out, *, backend, shape, **values)

``xs``: the inputs' flat float views of one tensor (the base first where the method has one), ``out``:
the flat output to fill, ``shape``: the tensor's shape, ``values``: every declared parameter resolved
for this tensor and range-checked (a number, a list with one number per model, a flag); a function that
takes ``name`` gets the tensor's name (a seeded method's per-tensor seed). Opening the
models, validating the parameters, streaming, publishing, the card and the recipe are the runner's
(merge/methods/runner.py); the command, the mergekit planning and the ``cpift.<method>`` function are
derived from the declaration. A method file imports its kernels inside its function, so declaring
(and listing) methods loads no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from .registry import MergekitSpec, MethodSpec, ParamSpec, register

# check(values, tensor) -> None: a rule between parameters (raise ParameterError); values as the function gets them.
Check = Callable[[Mapping[str, Any], str], None]
# prepare(checkpoints, values, options) -> {tensor name: extra keywords} or None: a whole-model pass the runner
# makes once before streaming (TIES' global trim); values as the card shows them, options the MergeOptions.
Prepare = Callable[[Sequence[Any], Mapping[str, Any], Any], Optional[Mapping[str, Mapping[str, Any]]]]


@dataclass(frozen=True)
class Inputs:
    """What a method merges.

    ``base``: "required" (a base and ``min_models``..``max_models`` models besides it), "optional"
    (models, and perhaps a base the models are taken as deltas from), "pair" (two models, the first
    one the base: mergekit's base_model), or "none" (models only; ``max_models=1``: one model).
    """

    base: str
    min_models: int = 1
    max_models: int | None = None

    def roles(self) -> tuple[str, ...]:
        """The registry's input roles (cli/methods_cli.py, merge/card.py, merge/mergekit/)."""
        if self.base == "pair":
            return ("model_a", "model_b")
        if self.base == "required":
            return ("base", "models")
        return ("model",) if self.max_models == 1 else ("models",)


def method(name: str, *, inputs: Inputs, params: tuple[ParamSpec, ...] = (), definition: str, paper: str,
           summary: str, mergekit: MergekitSpec | None = None, bench: Mapping[str, str] | None = None,
           check: Check | None = None, cli: str | None = None, settings: tuple[ParamSpec, ...] = (),
           prepare: Prepare | None = None) -> Callable[[Callable], Callable]:
    """Declare and register the per-tensor function it decorates as the merge method ``name``.

    ``settings``: true/false keywords a mergekit config sets (normalize, rescale) that have no option on the
    command line; validated like the parameters. ``prepare``: a whole-model pass before streaming."""
    if inputs.base not in ("required", "optional", "pair", "none"):
        raise ValueError(f"method '{name}': inputs.base must be required, optional, pair or none")

    def declare(fn: Callable) -> Callable:
        register(MethodSpec(name, cli or name.replace("_", "-"), fn.__module__, inputs.roles(), tuple(params),
                            definition, paper, summary, mergekit, bench=dict(bench or {}),
                            min_models=inputs.min_models, optional_base=inputs.base == "optional",
                            max_models=inputs.max_models, tensor=fn, check=check, settings=tuple(settings),
                            prepare=prepare))
        return fn

    return declare

