"""mergekit parameter values: numbers, gradients (mergekit's rule: a tensor of layer i of L sits at
t = i/(L−1), outside the layers at t = 0; n values interpolated at s = t·(n−1)) and filters."""

from __future__ import annotations

import pytest
from config_helpers import L4, OUTSIDE

from cpift.errors import ConfigError
from cpift.merge.mergekit.values import Conditional, param_fn, parse_setting, tensor_position

# ------------------------------------------------------------------------------------------------
# Values: forms, gradients, filters


@pytest.mark.parametrize("raw, expected", [
    (0.5, 0.5), (1, 1.0), ("1e-3", 0.001), (" 0.25 ", 0.25), (-2, -2.0),
], ids=["float", "int", "sci-string", "padded-string", "negative"])
def test_scalar_forms(raw, expected):
    assert parse_setting(raw, "weight", "w") == expected
    assert param_fn(raw, 4, name="weight") == expected


def test_gradient_and_conditional_forms_parse():
    assert parse_setting([0, "0.5", 1], "t", "t") == (0.0, 0.5, 1.0)
    assert parse_setting({"filter": "mlp", "value": 0.3}, "t", "t") == (Conditional("mlp", 0.3),)
    assert parse_setting([{"filter": "attn", "value": [0, 1]}, {"value": 0.5}], "t", "t") == (
        Conditional("attn", (0.0, 1.0)), Conditional(None, 0.5))
    assert parse_setting("yes", "normalize", "normalize") is True
    assert parse_setting(0, "int8_mask", "int8_mask") is False


@pytest.mark.parametrize("layer, expected", [(0, 0.0), (1, 1 / 3), (2, 2 / 3), (3, 1.0)])
def test_gradient_two_points_over_four_layers(layer, expected):
    f = param_fn([0, 1], 4, name="t")
    assert f(L4.format(layer)) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("layer, expected", [
    (0, 0.2),          # t = 0: the first value
    (1, 0.6),          # t = 1/3, s = 2/3: 0.2 + (2/3)(0.8 − 0.2)
    (2, 2 / 3),        # t = 2/3, s = 4/3: 0.8 + (1/3)(0.4 − 0.8)
    (3, 0.4),          # t = 1: the last value
])
def test_gradient_three_points_over_four_layers(layer, expected):
    f = param_fn([0.2, 0.8, 0.4], 4, name="weight")
    assert f(f"model.layers.{layer}.mlp.down_proj.weight") == pytest.approx(expected, abs=1e-12)


def test_gradient_five_points_over_five_layers_hits_each_value():
    f = param_fn([0.0, 0.5, 0.3, 0.7, 1.0], 5, name="t")
    assert [f(L4.format(i)) for i in range(5)] == pytest.approx([0.0, 0.5, 0.3, 0.7, 1.0], abs=1e-15)


@pytest.mark.parametrize("name", OUTSIDE)
def test_tensors_outside_layers_take_the_first_value(name):
    # mergekit 0.1.5 plans embeddings and the post-layer weights (norm, lm_head) with t = 0.
    assert param_fn([0.1, 0.9], 4, name="t")(name) == pytest.approx(0.1)
    assert tensor_position(name, 4) == 0.0


def test_single_layer_model_sits_at_t_1_and_single_value_gradient_is_constant():
    assert tensor_position(L4.format(0), 1) == 1.0
    assert param_fn([0.2, 0.6], 1, name="t")(L4.format(0)) == pytest.approx(0.6)
    assert param_fn([0.7], 4, name="t")(L4.format(2)) == 0.7


@pytest.mark.parametrize("name, pos", [
    ("transformer.h.2.attn.c_attn.weight", 2 / 3), ("gpt_neox.layers.3.mlp.dense_h_to_4h.weight", 1.0),
    ("model.layers.1.mlp.experts.3.w1.weight", 1 / 3), ("model.embed_tokens.weight", 0.0),
], ids=["gpt2-h", "neox", "moe-expert-index-ignored", "embed"])
def test_tensor_position_names(name, pos):
    assert tensor_position(name, 4) == pytest.approx(pos)


def test_layer_index_beyond_num_layers_is_an_error():
    with pytest.raises(ConfigError, match=r"t: .*layer 7 is outside the model's num_hidden_layers=4"):
        param_fn([0, 1], 4, name="t")(L4.format(7))


def test_filters_first_match_wins_and_default():
    f = param_fn([{"filter": "self_attn", "value": 0.1}, {"filter": "q_proj", "value": 0.2},
                  {"filter": "mlp", "value": [0, 1]}, {"value": 0.9}], 4, name="t")
    assert f("model.layers.0.self_attn.q_proj.weight") == 0.1       # both match: the first wins
    assert f("model.layers.2.mlp.up_proj.weight") == pytest.approx(2 / 3)
    assert f("model.norm.weight") == 0.9                           # the entry without filter


def test_filter_star_is_a_default():
    f = param_fn([{"filter": "mlp", "value": 1.0}, {"filter": "*", "value": 0.25}], 4, name="weight")
    assert f("lm_head.weight") == 0.25


def test_filter_without_default_errors_on_unmatched_tensor():
    f = param_fn([{"filter": "mlp", "value": 0.3}], 4, name="t", source="m.yml")
    assert f("model.layers.0.mlp.up_proj.weight") == 0.3
    with pytest.raises(ConfigError, match=r"m\.yml: t: no value for tensor 'model\.norm\.weight'"):
        f("model.norm.weight")
