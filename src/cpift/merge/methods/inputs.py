"""What a merge method takes as inputs (``MethodSpec.inputs``, merge/methods/registry.py).

One ``Inputs`` declaration decides every input question, so no consumer switches on the kind: the
Python function's and the command's arguments (cli/methods_cli.py, merge/methods/runner.py), the card
roles of the opened paths (merge/card.py), what mergekit's base_model is and how many models a config
may list (merge/mergekit/), the recipe's base_model and models, and the bench's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from cpift.errors import ParameterError

# The words of a model count in mergekit-config refusals.
_WORDS = {1: "one model", 2: "two models"}


@dataclass(frozen=True)
class Inputs:
    """What a method merges; every consumer asks it rather than switching on the kind.

    ``base``: "required" (a base and ``min_models``..``max_models`` models besides it), "optional"
    (models, and perhaps a base the models are taken as deltas from: mergekit's BasePolicy.OPTIONAL),
    "pair" (two models, the first one mergekit's base_model), or "none" (models only, an unlisted
    mergekit base_model counted as one more; ``max_models=1``: one model).
    """

    base: str
    min_models: int = 1
    max_models: int | None = None

    @property
    def positional(self) -> tuple[str, ...]:
        """The Python function's input arguments, in order (``out`` follows them)."""
        if self.base in ("pair", "required"):
            return ("model_a", "model_b") if self.base == "pair" else ("base", "models")
        return ("model",) if self.max_models == 1 else ("models",)

    @property
    def arguments(self) -> tuple[str, ...]:
        """The command's input arguments, in order (a base is its ``--base`` option)."""
        return tuple(a for a in self.positional if a != "base")

    @property
    def base_option(self) -> tuple[bool, str] | None:
        """The command's ``--base`` option: (required, help), or None."""
        if self.base == "required":
            return True, "Base model the deltas are taken from."
        if self.base == "optional":
            return False, "Optional base model: merge the deltas from it and add it back."
        return None

    @property
    def base_keyword(self) -> bool:
        """The Python function takes ``base=None`` as a keyword."""
        return self.base == "optional"

    @property
    def requires_base(self) -> bool:
        """A base is one of the inputs, always (the method merges deltas from it)."""
        return self.base == "required"

    @property
    def takes_base(self) -> bool:
        """A base may be among the inputs (per-model values then exclude it)."""
        return self.base in ("required", "optional")

    @property
    def counts_base_model(self) -> bool:
        """mergekit's base_model is one more model (models form, if not listed), not a base."""
        return self.base == "none"

    @property
    def base_model_in_sources(self) -> bool:
        """In slices form base_model must be one of each slice's sources (mergekit does not add it); a
        method of several models only (linear, karcher) ignores an unlisted one there."""
        return not (self.base == "none" and self.max_models != 1)

    def card_roles(self, n: int) -> list[str]:
        """The card roles of ``n`` opened inputs in stream order (a required base first)."""
        return ["base" if i == 0 and self.base == "required" else "model" for i in range(n)]

    def stream(self, name: str, args: Sequence[Any], base: Any = None) -> tuple[list, list[str], int]:
        """(paths in stream order, their card roles, the number of models besides a base) of the
        positional values ``args`` (and the ``base`` keyword); raises ParameterError on a bad count."""
        if self.base == "pair" or self.max_models == 1:
            return list(args), ["model"] * len(args), 1
        base, models = (args[0], list(args[1])) if self.base == "required" else (base, list(args[0]))
        lo, hi = self.min_models, self.max_models
        if len(models) < lo or (hi is not None and len(models) > hi):
            want = f"merges exactly {lo}" if lo == hi else f"needs at least {lo}"
            raise ParameterError(f"models: {name} {want} model{'s' if lo > 1 else ''}"
                                 f"{' besides the base' if base is not None else ''}, got {len(models)}")
        head = [base] if base is not None else []
        return head + models, ["base"] * len(head) + ["model"] * len(models), len(models)

    def call_args(self, base: Any, models: tuple) -> tuple:
        """The positional inputs of the Python function, from mergekit's base_model and the models
        besides it (with ``counts_base_model``: every model)."""
        if self.base == "pair":
            return base, models[0]
        return (base, models) if self.base == "required" else (models,)

    @property
    def lists_base_model(self) -> bool:
        """mergekit's base_model is also the first of the models (a pair)."""
        return self.base == "pair"

    def split_refs(self, refs: Sequence[Any], *, base_given: bool = False) -> tuple[Any, list]:
        """(mergekit's base_model, its models) of the inputs in stream order, as a recipe writes them
        (``base_given``: an optional base was given, so it is refs[0])."""
        if self.base == "pair":
            return refs[0], list(refs)
        with_base = self.base == "required" or (self.base == "optional" and base_given)
        return (refs[0], list(refs[1:])) if with_base else (None, list(refs))

    def missing_base(self, name: str) -> str | None:
        """What a mergekit config without base_model is told, or None where it may leave it out."""
        if self.base == "pair":
            return f"missing; {name} needs it (t = 0 gives it)"
        return f"missing; {name} merges deltas from it" if self.base == "required" else None

    def config_count_error(self, name: str, inputs: int, *, base_given: bool, slice_form: bool) -> str | None:
        """What a mergekit config with ``inputs`` models (an unlisted base_model counted) is told, or None."""
        lo, hi = self.min_models, self.max_models
        if self.base == "pair":
            return None if inputs == 2 else (f"{name} merges exactly two models, base_model and one other; "
                                              f"got {inputs}")
        if self.base == "required":
            return None if inputs - 1 >= lo else (f"{name} needs at least {'one model' if lo == 1 else f'{lo} models'}"
                                                  f" besides base_model, got {inputs - 1}")
        if self.max_models == 1:  # a stack's slices are checked in merge/mergekit/stack.py
            return None if inputs == 1 or slice_form else (
                f"{name} takes one model (with base_model, if not listed, counted), got {inputs}; stack layer "
                f"ranges with slices:")
        n = inputs - (base_given and self.base == "optional")
        if n >= lo and (hi is None or n <= hi):
            return None
        if self.base == "none" and hi is None:
            return f"{name} needs at least {_WORDS.get(lo, f'{lo} models')}, got {n}"
        want = f"exactly {lo}" if lo == hi else f"at least {lo}"
        besides = (" besides base_model" if self.base == "optional" else " (base_model, if not listed, counted)"
                   ) if base_given else ""
        return f"{name} merges {want} model{'s' if lo > 1 else ''}{besides}, got {n}"

    def bench_inputs(self, base: Any, tasks: list, pair: list) -> tuple[list[str], list]:
        """The bench's arguments of ``cpift-merge METHOD`` for these inputs, and the paths it reads."""
        tasks = tasks[:self.max_models] if self.max_models else tasks  # nuslerp: the first two task models
        if self.base == "pair":
            return [*map(str, pair)], list(pair)
        if self.base == "required":
            return ["--base", str(base), *map(str, tasks)], [base, *tasks]
        return [*map(str, tasks)], list(tasks)

    def bench_count_error(self, command: str, tasks: int) -> str | None:
        """What a bench with ``tasks`` task models is told, or None."""
        if self.base == "required" and tasks < self.min_models:
            return f"--methods: {command} needs at least {self.min_models} task models besides the base, got {tasks}"
        return None

