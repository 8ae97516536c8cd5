"""A method's Inputs declaration answers every input question (merge/methods/inputs.py): the arguments,
the card roles, the counts and their messages, mergekit's base_model, the recipe's models, the bench."""

from __future__ import annotations

import pytest
import yaml
from config_helpers import write

from cpift.errors import ConfigError, ParameterError
from cpift.merge.mergekit.config import load_config
from cpift.merge.mergekit.plan import plan_call
from cpift.merge.methods.inputs import Inputs
from cpift.merge.methods.registry import METHODS

PAIR, REQUIRED, OPTIONAL = Inputs("pair"), Inputs("required", 2), Inputs("optional", 2, 2)
SEVERAL, ONE = Inputs("none", 2), Inputs("none", max_models=1)


@pytest.mark.parametrize("inputs, positional, arguments, base_option", [
    (PAIR, ("model_a", "model_b"), ("model_a", "model_b"), None),
    (REQUIRED, ("base", "models"), ("models",), True),
    (OPTIONAL, ("models",), ("models",), False),
    (SEVERAL, ("models",), ("models",), None),
    (ONE, ("model",), ("model",), None),
], ids=["pair", "required", "optional", "several", "one"])
def test_arguments_of_the_function_and_the_command(inputs, positional, arguments, base_option):
    assert inputs.positional == positional and inputs.arguments == arguments
    assert (inputs.base_option and inputs.base_option[0]) == base_option
    assert inputs.base_keyword == (inputs is OPTIONAL)


def test_the_registry_holds_an_inputs_for_every_method():
    assert all(isinstance(s.inputs, Inputs) for s in METHODS.values())
    assert METHODS["ties"].inputs.positional == ("base", "models")
    assert METHODS["slerp"].inputs.lists_base_model and not METHODS["linear"].inputs.takes_base


def test_stream_order_roles_and_counts():
    assert REQUIRED.stream("m", ("b", ["x", "y"])) == (["b", "x", "y"], ["base", "model", "model"], 2)
    assert OPTIONAL.stream("m", (["x", "y"],), "b") == (["b", "x", "y"], ["base", "model", "model"], 2)
    assert PAIR.stream("m", ("x", "y")) == (["x", "y"], ["model", "model"], 1)
    assert REQUIRED.card_roles(3) == ["base", "model", "model"] and OPTIONAL.card_roles(2) == ["model", "model"]
    with pytest.raises(ParameterError, match=r"^models: m needs at least 2 models besides the base, got 1$"):
        REQUIRED.stream("m", ("b", ["x"]))
    with pytest.raises(ParameterError, match=r"^models: m merges exactly 2 models, got 3$"):
        OPTIONAL.stream("m", (["x", "y", "z"],))


@pytest.mark.parametrize("inputs, n, base_given, slice_form, message", [
    (PAIR, 3, True, False, "m merges exactly two models, base_model and one other; got 3"),
    (REQUIRED, 2, True, False, "m needs at least 2 models besides base_model, got 1"),
    (Inputs("required"), 1, True, False, "m needs at least one model besides base_model, got 0"),
    (OPTIONAL, 4, True, False, "m merges exactly 2 models besides base_model, got 3"),
    (OPTIONAL, 1, False, False, "m merges exactly 2 models, got 1"),
    (SEVERAL, 1, False, False, "m needs at least two models, got 1"),
    (ONE, 2, False, False, "m takes one model (with base_model, if not listed, counted), got 2; stack layer "
                           "ranges with slices:"),
    (ONE, 2, False, True, None),
    (REQUIRED, 3, True, False, None),
], ids=["pair", "required", "required-one", "optional-base", "optional", "several", "one", "one-slices", "ok"])
def test_config_counts_and_their_messages(inputs, n, base_given, slice_form, message):
    assert inputs.config_count_error("m", n, base_given=base_given, slice_form=slice_form) == message


def test_base_model_in_recipes_calls_and_the_bench():
    assert PAIR.split_refs(["a", "b"]) == ("a", ["a", "b"]) and REQUIRED.split_refs(["a", "b"]) == ("a", ["b"])
    assert SEVERAL.split_refs(["a", "b"]) == (None, ["a", "b"])
    assert PAIR.call_args("a", ("b",)) == ("a", "b") and SEVERAL.call_args(None, ("a", "b")) == (("a", "b"),)
    assert PAIR.missing_base("m") == "missing; m needs it (t = 0 gives it)" and OPTIONAL.missing_base("m") is None
    assert OPTIONAL.bench_inputs("B", ["t1", "t2", "t3"], ["p1", "p2"]) == (["t1", "t2"], ["t1", "t2"])
    assert REQUIRED.bench_inputs("B", ["t1"], ["p1", "p2"]) == (["--base", "B", "t1"], ["B", "t1"])
    assert REQUIRED.bench_count_error("x", 1) == "--methods: x needs at least 2 task models besides the base, got 1"


def test_a_method_of_models_only_ignores_an_unlisted_base_model_in_slices_form(tmp_path):
    """linear and karcher alike (mergekit adds no base_model to a slice's sources); a method with a base
    still needs it among the sources."""
    for method in ("linear", "karcher"):
        cfg = load_config(write(tmp_path, yaml.safe_dump({
            "merge_method": method, "base_model": "a", "parameters": {"weight": 1.0} if method == "linear" else {},
            "slices": [{"sources": [{"model": m, "layer_range": [0, 2]} for m in ("b", "c")]}]})))
        assert plan_call(cfg, num_layers=4).args == (("b", "c"),)
    with pytest.raises(ConfigError, match=r"slices\[0\]\.sources: base_model 'a' must be one of the sources"):
        load_config(write(tmp_path, yaml.safe_dump({
            "merge_method": "multislerp", "base_model": "a",
            "slices": [{"sources": [{"model": m, "layer_range": [0, 2]} for m in ("b", "c")]}]})))
