"""mergekit YAML configs: parsing, mergekit's gradient/filter rules, every refusal, and (once the engine
exists) bit-identity of ``run_config`` with the direct call of the same method.

Expected gradient values are worked out by hand from mergekit's rule: a tensor of layer i in a model of
L layers sits at t = i / (L − 1), tensors outside the layers at t = 0; n values are interpolated
piecewise-linearly at s = t·(n − 1).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from cpift.merge.config import MergeConfig, load_config
from cpift.merge.config_plan import plan_call, resolve_model, run_config
from cpift.merge.config_values import Conditional, param_fn, parse_setting, tensor_position
from cpift.merge.errors import ConfigError

L4 = "model.layers.{}.self_attn.q_proj.weight"
OUTSIDE = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]


def write(tmp_path: Path, text: str, name: str = "merge.yml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def cfg_of(tmp_path: Path, text: str) -> MergeConfig:
    return load_config(write(tmp_path, text))


def value(p, name):
    return p(name) if callable(p) else p


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


# ------------------------------------------------------------------------------------------------
# Configs: every supported form, and the call each maps to

LINEAR = """
    merge_method: linear
    models:
      - model: a
        parameters: {weight: 1.0}
      - model: b
        parameters:
          weight: [{filter: mlp, value: 3}, {value: 1}]
    dtype: float16
"""


def test_linear_models_form(tmp_path):
    cfg = cfg_of(tmp_path, LINEAR)
    assert cfg.method == "linear" and [m.model for m in cfg.models] == ["a", "b"]
    assert cfg.dtype == "float16" and cfg.out_dtype is None and cfg.base_model is None
    call = plan_call(cfg, num_layers=4)
    assert call.function == "linear" and call.args == (("a", "b"),)
    w = call.kwargs["weights"]
    assert w[0] == 1.0 and value(w[1], "model.layers.0.mlp.up_proj.weight") == 3.0
    assert value(w[1], "model.norm.weight") == 1.0


def test_linear_global_weight_is_per_model_fallback_and_unlisted_base_is_added(tmp_path):
    cfg = cfg_of(tmp_path, """
        merge_method: linear
        base_model: c
        parameters: {weight: 0.5}
        models:
          - model: a
            parameters: {weight: 2}
          - model: b
    """)
    call = plan_call(cfg, num_layers=4)
    assert call.args == (("a", "b", "c"),)
    assert call.kwargs["weights"] == [2.0, 0.5, 0.5]
    assert any("base_model 'c' is not listed" in n for n in call.notes)


def test_linear_normalize_false_only_when_constant_weights_sum_to_one(tmp_path):
    ok = cfg_of(tmp_path, """
        merge_method: linear
        parameters: {normalize: false}
        models: [{model: a, parameters: {weight: 0.25}}, {model: b, parameters: {weight: 0.75}}]
    """)
    assert plan_call(ok).kwargs["weights"] == [0.25, 0.75]
    bad = cfg_of(tmp_path, """
        merge_method: linear
        parameters: {normalize: false}
        models: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 1}}]
    """)
    with pytest.raises(ConfigError, match=r"merge\.yml: parameters\.normalize: false .*sum of 2"):
        plan_call(bad)
    assert plan_call(bad, native={"normalize"}).kwargs["normalize"] is False


SLERP = """
    slices:
      - sources:
          - model: other
            layer_range: [0, 4]
          - model: base
            layer_range: [0, 4]
    merge_method: slerp
    base_model: base
    parameters:
      t:
        - filter: self_attn
          value: [0, 0.5, 0.3, 0.7, 1]
        - filter: mlp
          value: [1, 0.5, 0.7, 0.3, 0]
        - value: 0.5
    dtype: bfloat16
"""


def test_slerp_slices_form_base_is_model_a(tmp_path):
    cfg = cfg_of(tmp_path, SLERP)
    assert cfg.layer_range == (0, 4)
    call = plan_call(cfg, num_layers=4)
    assert call.function == "slerp" and call.args == ("base", "other")
    t = call.kwargs["t"]
    # L = 4, n = 5: layer 1 sits at s = 4/3, between 0.5 and 0.3 at a third of the way.
    assert t("model.layers.1.self_attn.k_proj.weight") == pytest.approx(0.5 + (0.3 - 0.5) / 3)
    assert t("model.layers.3.mlp.gate_proj.weight") == 0.0
    assert t("model.layers.2.input_layernorm.weight") == 0.5
    assert t("model.embed_tokens.weight") == 0.5


def test_slerp_models_form_with_unlisted_base(tmp_path):
    cfg = cfg_of(tmp_path, """
        merge_method: slerp
        base_model: base
        models: [{model: other}]
        parameters: {t: 0.3}
    """)
    assert plan_call(cfg).args == ("base", "other") and plan_call(cfg).kwargs == {"t": 0.3}


TIES = """
    merge_method: ties
    base_model: base
    models:
      - model: base
      - model: a
        parameters: {weight: 1.0, density: 0.5}
      - model: b
        parameters:
          weight: [0, 1]
          density: [{filter: mlp, value: 0.2}]
    parameters:
      density: 0.7
      lambda: 0.9
      normalize: true
      int8_mask: true
    dtype: float32
    out_dtype: bfloat16
"""


def test_ties_base_in_models_is_dropped_and_scopes_fall_through(tmp_path):
    cfg = cfg_of(tmp_path, TIES)
    assert cfg.out_dtype == "bfloat16"
    call = plan_call(cfg, num_layers=4)
    assert call.function == "ties" and call.args == ("base", ("a", "b"))
    assert call.kwargs["lam"] == 0.9
    w, d = call.kwargs["weights"], call.kwargs["density"]
    assert w[0] == 1.0 and value(w[1], L4.format(3)) == 1.0 and value(w[1], "lm_head.weight") == 0.0
    assert d[0] == 0.5
    assert value(d[1], "model.layers.0.mlp.up_proj.weight") == 0.2
    assert value(d[1], L4.format(0)) == 0.7          # no filter matched: the top-level density
    assert "normalize" not in call.kwargs and call.notes == []


def test_delta_methods_density_default_and_base_parameters_note(tmp_path):
    cfg = cfg_of(tmp_path, """
        merge_method: dare_linear
        base_model: base
        models:
          - model: base
            parameters: {weight: 1}
          - model: a
            parameters: {weight: 0.5}
    """)
    call = plan_call(cfg)
    assert call.function == "dare_linear" and call.args == ("base", ("a",))
    assert call.kwargs == {"weights": [0.5], "lam": 1.0, "density": [1.0]}
    assert any("models[0].parameters (weight) have no effect" in n for n in call.notes)


def test_task_arithmetic_normalize_true_divides_weights(tmp_path):
    cfg = cfg_of(tmp_path, """
        merge_method: task_arithmetic
        base_model: base
        parameters: {normalize: true, lambda: 2}
        models: [{model: a, parameters: {weight: 0.5}}, {model: b, parameters: {weight: 0.3}}]
    """)
    call = plan_call(cfg)
    assert call.kwargs["weights"] == [0.5 / 0.8, 0.3 / 0.8] and call.kwargs["lam"] == 2.0
    assert "density" not in call.kwargs


def test_task_arithmetic_normalize_true_with_gradient_weights(tmp_path):
    cfg = cfg_of(tmp_path, """
        merge_method: task_arithmetic
        base_model: base
        parameters: {normalize: true}
        models: [{model: a, parameters: {weight: [1, 3]}}, {model: b, parameters: {weight: 1}}]
    """)
    w = plan_call(cfg, num_layers=3).kwargs["weights"]
    # layer 1 of 3: weight a = 2, b = 1 → 2/3 and 1/3.
    assert value(w[0], L4.format(1)) == pytest.approx(2 / 3)
    assert value(w[1], L4.format(1)) == pytest.approx(1 / 3)


def test_task_arithmetic_density_is_accepted_with_a_note(tmp_path):
    cfg = cfg_of(tmp_path, """
        merge_method: task_arithmetic
        base_model: base
        parameters: {weight: 1, density: 0.5}
        models: [{model: a}]
    """)
    call = plan_call(cfg)
    assert call.kwargs == {"weights": [1.0], "lam": 1.0}
    assert any("parameters.density has no effect" in n for n in call.notes)


def test_dare_ties_normalize(tmp_path):
    base = """
        merge_method: dare_ties
        base_model: base
        models: [{model: a, parameters: {weight: 1, density: 0.4}}]
    """
    # mergekit's default for dare_ties is normalize: false; cpift's dare_ties takes the TIES mean.
    with pytest.raises(ConfigError, match=r"parameters\.normalize: false \(mergekit's default for "
                                          r"dare_ties\) is not supported"):
        plan_call(cfg_of(tmp_path, base))
    assert plan_call(cfg_of(tmp_path, base), native={"normalize"}).kwargs["normalize"] is False
    ok = plan_call(cfg_of(tmp_path, base + "    parameters: {normalize: true}\n"))
    assert ok.kwargs == {"weights": [1.0], "lam": 1.0, "density": [0.4]}


@pytest.mark.parametrize("method, setting, message", [
    ("ties", "normalize: false", r"parameters\.normalize: false is not supported for ties"),
    ("ties", "rescale: true", r"parameters\.rescale: true is not supported for ties"),
    ("dare_linear", "rescale: false", r"parameters\.rescale: false is not supported for dare_linear"),
])
def test_unsupported_normalize_rescale(tmp_path, method, setting, message):
    cfg = cfg_of(tmp_path, f"""
        merge_method: {method}
        base_model: base
        parameters: {{{setting}}}
        models: [{{model: a, parameters: {{weight: 1}}}}]
    """)
    with pytest.raises(ConfigError, match=message):
        plan_call(cfg)


def test_slice_parameters_sit_between_model_and_top_level(tmp_path):
    cfg = cfg_of(tmp_path, """
        merge_method: ties
        base_model: base
        parameters: {weight: 9, density: 0.9}
        slices:
          - sources:
              - {model: base, layer_range: [0, 4]}
              - {model: a, layer_range: [0, 4], parameters: {density: 0.1}}
            parameters: {weight: [{filter: mlp, value: 2}]}
    """)
    call = plan_call(cfg, num_layers=4)
    w = call.kwargs["weights"][0]
    assert value(w, "model.layers.0.mlp.up_proj.weight") == 2.0 and value(w, "model.norm.weight") == 9.0
    assert call.kwargs["density"] == [0.1]


def test_gradient_needs_num_layers(tmp_path):
    with pytest.raises(ConfigError, match="gradient .*num_hidden_layers"):
        plan_call(cfg_of(tmp_path, LINEAR.replace("weight: 1.0", "weight: [1, 2]")), num_layers=None)


def test_same_model_twice_after_resolution(tmp_path):
    cfg = cfg_of(tmp_path, LINEAR)
    with pytest.raises(ConfigError, match=r"models\[1\]\.model: 'b' is the same model as models\[0\]"):
        plan_call(cfg, num_layers=4, paths={"a": "/x/a", "b": "/x/a"})


def test_misc_top_level_fields(tmp_path):
    cfg = cfg_of(tmp_path, """
        name: my-merge
        merge_method: slerp
        base_model: base
        tokenizer_source: base
        dtype: torch.float16
        models: [{model: base}, {model: other}]
        parameters: {t: 0.5}
    """)
    assert cfg.name == "my-merge" and cfg.tokenizer_source == "base" and cfg.dtype == "float16"
    assert cfg_of(tmp_path, """
        merge_method: slerp
        base_model: base
        tokenizer: {source: some/dir}
        models: [{model: base}, {model: other}]
        parameters: {t: 0.5}
    """).tokenizer_source == "some/dir"


# ------------------------------------------------------------------------------------------------
# Refusals: each names the file and the field

GOOD_MODELS = "models: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 1}}]"


@pytest.mark.parametrize("text, message", [
    ("merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1}}\n"
     "  - {model: b, parameters: {weight: abc}}\n",
     r"merge\.yml: models\[1\]\.parameters\.weight: expected a number or a list of numbers, got 'abc'"),
    (f"merge_method: linear\n{GOOD_MODELS}\nparameters: {{weight: [1, x]}}\n",
     r"parameters\.weight\[1\]: expected a number, got 'x'"),
    (f"merge_method: linear\n{GOOD_MODELS}\nparameters: {{weight: .inf}}\n",
     r"parameters\.weight: expected a finite number"),
    (f"merge_method: linear\n{GOOD_MODELS}\nparameters: {{weight: nan}}\n",
     r"parameters\.weight: expected a finite number, got 'nan'"),
    (f"merge_method: linear\n{GOOD_MODELS}\nparameters: {{weight: true}}\n",
     r"parameters\.weight: expected a number or a list of numbers, got True"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\nparameters: {t: 1.5}\n",
     r"parameters\.t: 1\.5 is outside \[0, 1\]"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n"
     "parameters: {t: [{filter: mlp, value: [0, -0.1]}]}\n",
     r"parameters\.t\[0\]\.value\[1\]: -0\.1 is outside \[0, 1\]"),
    ("merge_method: ties\nbase_model: a\nmodels: [{model: b, parameters: {weight: 1, density: 0}}]\n",
     r"models\[0\]\.parameters\.density: 0 is outside \(0, 1\]"),
    ("merge_method: ties\nbase_model: a\nmodels: [{model: b, parameters: {weight: 1, density: 1.5}}]\n",
     r"models\[0\]\.parameters\.density: 1\.5 is outside \(0, 1\]"),
    ("merge_method: ties\nbase_model: a\nmodels: [{model: b, parameters: {weight: 1}}]\n"
     "parameters: {lambda: [1, 2]}\n", r"parameters\.lambda: expected one number"),
    ("merge_method: ties\nbase_model: a\nmodels: [{model: b, parameters: {weight: 1}}]\n"
     "parameters: {normalize: maybe}\n", r"parameters\.normalize: expected true or false, got 'maybe'"),
    ("merge_method: ties\nbase_model: a\nmodels: [{model: b, parameters: {weight: 1}}]\n"
     "parameters: {int8_mask: [true, false]}\n", r"parameters\.int8_mask: expected true or false"),
    ("merge_method: ties\nbase_model: a\nmodels: [{model: b, parameters: {weight: 1, densty: 0.5}}]\n",
     r"models\[0\]\.parameters\.densty: unknown parameter for ties "
     r"\(per-model parameters: weight, density\)"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b, parameters: {t: 0.5}}]\n"
     "parameters: {t: 0.5}\n", r"models\[1\]\.parameters\.t: 't' applies to the whole merge in slerp"),
    (f"merge_method: linear\n{GOOD_MODELS}\nparameters: {{density: 0.5}}\n",
     r"parameters\.density: unknown parameter for linear"),
    (f"merge_method: linear\n{GOOD_MODELS}\nrandom_seed: 3\n", r"merge\.yml: random_seed: unknown key"),
    (f"merge_method: della\n{GOOD_MODELS}\n", r"merge_method: 'della' is not supported by cpift"),
    (f"{GOOD_MODELS}\n", r"merge_method: missing"),
    ("merge_method: linear\n", r"models: give exactly one of 'models' and 'slices'"),
    (f"merge_method: linear\n{GOOD_MODELS}\nslices: []\n", r"give exactly one of 'models' and 'slices'"),
    ("merge_method: linear\nmodels: [a, b]\n", r"models\[0\]: expected a mapping with a 'model' key"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}, layer_range: [0, 4]}, {model: b}]\n",
     r"models\[0\]\.layer_range: unknown key"),
    ("merge_method: linear\nmodels: [{model: a+lora, parameters: {weight: 1}}, {model: b}]\n",
     r"models\[0\]\.model: 'a\+lora' names a LoRA adapter"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}},\n"
     "  {model: a, parameters: {weight: 1}}]\n",
     r"models\[1\]\.model: 'a' is listed twice"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}},\n"
     "  {model: b, parameters: {weight: -1}}]\n",
     r"models: the weights sum to 0"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n",
     r"models: linear needs at least two models, got 1"),
    ("merge_method: ties\nbase_model: a\nmodels: [{model: a}, {model: b}]\n",
     r"models\[1\]\.parameters\.weight: missing; ties needs a weight for every model "
     r"\(mergekit has no default\)"),
    ("merge_method: linear\nbase_model: c\n"
     "models: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 1}}]\n",
     r"parameters\.weight: missing; linear needs a weight .*base_model missing from models"),
    ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]\n",
     r"base_model: missing; ties merges deltas"),
    ("merge_method: ties\nbase_model: a\nmodels: [{model: a}]\n",
     r"models: ties needs at least one model besides base_model"),
    ("merge_method: slerp\nmodels: [{model: a}, {model: b}]\nparameters: {t: 0.5}\n",
     r"base_model: missing; slerp needs it"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}, {model: c}]\n"
     "parameters: {t: 0.5}\n",
     r"models: slerp merges exactly two models.*got 3"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n", r"parameters\.t: missing"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n"
     "parameters: {t: [{filter: 3, value: 1}]}\n", r"parameters\.t\[0\]\.filter: expected a substring"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n"
     "parameters: {t: [{filter: mlp}]}\n", r"parameters\.t\[0\]\.value: missing"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n"
     "parameters: {t: {filter: mlp, value: 1, when: x}}\n", r"parameters\.t\.when: unknown key"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n"
     "parameters: {t: [{value: {filter: mlp, value: 1}}]}\n", r"parameters\.t\[0\]\.value: .*do not nest"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n"
     "parameters: {t: [{filter: mlp, value: 1}, 0.5]}\n",
     r"parameters\.t\[1\]: expected a \{filter, value\} mapping"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n"
     "parameters: {t: [[0, 1]]}\n", r"parameters\.t\[0\]: expected a number, got \[0, 1\]"),
    (f"merge_method: linear\n{GOOD_MODELS}\ndtype: fp8\n",
     r"dtype: expected one of bfloat16, float16, float32, float64, got 'fp8'"),
    (f"merge_method: linear\n{GOOD_MODELS}\nout_dtype: int64\n", r"out_dtype: expected one of"),
    (f"merge_method: linear\n{GOOD_MODELS}\ntokenizer_source: union\n",
     r"tokenizer_source: 'union' builds a new vocabulary"),
    (f"merge_method: linear\n{GOOD_MODELS}\ntokenizer: {{source: base, tokens: {{x: {{}}}}}}\n",
     r"tokenizer\.tokens: not supported"),
    (f"merge_method: linear\n{GOOD_MODELS}\ntokenizer: {{}}\n", r"tokenizer\.source: 'union'"),
    (f"merge_method: linear\n{GOOD_MODELS}\nchat_template: chatml\n", r"chat_template: not supported"),
    ("merge_method: linear\nmodules: {}\n", r"give exactly one of"),
    ("merge_method: linear\nmodules: {text: {}}\n", r"modules: multi-module configs are not supported"),
])
def test_bad_field(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("slices, message", [
    ("""
      - sources:
          - {model: a, layer_range: [0, 2]}
          - {model: b, layer_range: [0, 2]}
      - sources:
          - {model: a, layer_range: [2, 4]}
          - {model: b, layer_range: [2, 4]}
    """, r"slices: 2 slices stack layer ranges"),
    ("""
      - sources:
          - {model: a, layer_range: [1, 4]}
          - {model: b, layer_range: [1, 4]}
    """, r"slices\[0\]\.sources\[0\]\.layer_range: \[1, 4\] is a partial layer range; partial layer "
         r"ranges are not supported"),
    ("""
      - sources:
          - {model: a, layer_range: [0, 4]}
          - {model: b, layer_range: [0, 3]}
    """, r"slices\[0\]\.sources\[1\]\.layer_range: \[0, 3\] differs from \[0, 4\]; partial layer ranges"),
    ("""
      - sources:
          - {model: a}
          - {model: b, layer_range: [0, 4]}
    """, r"slices\[0\]\.sources\[0\]\.layer_range: missing"),
    ("""
      - sources:
          - {model: a, layer_range: [0, 4]}
          - {model: b, layer_range: [0, 4]}
        residual_weight: 0.1
    """, r"slices\[0\]\.residual_weight: not supported"),
    ("""
      - sources:
          - {model: b, layer_range: [0, 4]}
          - {model: c, layer_range: [0, 4]}
    """, r"slices\[0\]\.sources: base_model 'a' must be one of the sources"),
])
def test_bad_slices(tmp_path, slices, message):
    text = "merge_method: slerp\nbase_model: a\nparameters: {t: 0.5}\nslices:" + textwrap.indent(
        textwrap.dedent(slices), "  ")
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path, "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [1, 2}\n",
              name="broken.yml")
    with pytest.raises(ConfigError, match=r"broken\.yml: line 4, column \d+: invalid YAML"):
        load_config(p)


def test_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"merge\.yml: expected a mapping at the top level"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match=r"nope\.yml: cannot read the config"):
        load_config(tmp_path / "nope.yml")
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------------------------------
# Model directories: resolution and the checks run_config makes before the engine is involved


def fake_model(d: Path, layers: int = 4, vocab: dict | None = None, vocab_size: int = 4) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": layers, "vocab_size": vocab_size}))
    if vocab is not None:
        (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab},
                                                      "added_tokens": []}))
    return d


def test_relative_paths_resolve_against_cwd(tmp_path, monkeypatch):
    fake_model(tmp_path / "work" / "m")
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_model("m", "models[0].model") == tmp_path / "work" / "m"
    with pytest.raises(ConfigError, match=r"x\.yml: models\[0\]\.model: 'missing/dir' is not a directory "
                                          r"\(relative paths are relative to the current directory"):
        resolve_model("missing/dir", "models[0].model", "x.yml")


def test_run_config_checks_layer_range_against_config_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_model(tmp_path / "a", layers=6)
    fake_model(tmp_path / "b", layers=6)
    p = write(tmp_path, SLERP.replace("model: other", "model: b").replace("model: base", "model: a")
              .replace("base_model: base", "base_model: a"))
    with pytest.raises(ConfigError, match=r"slices\[0\]\.sources\[0\]\.layer_range: \[0, 4\] does not cover "
                                          r"the model's 6 layers; partial layer ranges are not supported"):
        run_config(p, tmp_path / "out")


@pytest.mark.parametrize("vocab_b, size, message", [
    (None, 2, r"has no tokenizer\.json"),
    ({"x": 0, "z": 1}, 2, r"different vocabularies"),
    ({"x": 0, "y": 1}, 4, r"the tokenizer has 2 tokens but the embeddings have 4 rows"),
])
def test_tokenizer_source_must_be_exact(tmp_path, monkeypatch, vocab_b, size, message):
    monkeypatch.chdir(tmp_path)
    fake_model(tmp_path / "a", vocab={"x": 0, "y": 1}, vocab_size=size)
    fake_model(tmp_path / "b", vocab=vocab_b, vocab_size=size)
    p = write(tmp_path, "merge_method: slerp\nbase_model: a\ntokenizer_source: base\n"
                        "models: [{model: a}, {model: b}]\nparameters: {t: 0.5}\n")
    with pytest.raises(ConfigError, match=r"merge\.yml: tokenizer_source: .*" + message):
        run_config(p, tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# Integration: run_config against the direct cpift call, bit for bit

try:
    from cpift.merge import methods
    _ENGINE_ERROR = None
except Exception as e:  # noqa: BLE001 - any import failure means the engine is not there yet
    methods = None
    _ENGINE_ERROR = f"{type(e).__name__}: {e}"

engine = pytest.mark.skipif(methods is None, reason=f"cpift.merge.methods cannot be imported yet "
                                                    f"({_ENGINE_ERROR})")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """base, a, b, c: tiny Llama checkpoints of 4 layers with independent seeded weights, sharded."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    vocab = {f"t{i}": i for i in range(128)}
    for seed, name in enumerate(["base", "a", "b", "c"]):
        torch.manual_seed(1000 + seed)
        model = transformers.LlamaForCausalLM(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.05)
        model.save_pretrained(root / name, max_shard_size="20KB")
        (root / name / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab},
                                                                "added_tokens": []}))
        assert len(list((root / name).glob("*.safetensors"))) > 2
    return root


def load_out(path: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    assert state, f"no tensors in {path}"
    return state


def assert_identical(x: Path, y: Path) -> None:
    import torch

    a, b = load_out(x), load_out(y)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(-1).view(torch.uint8), b[name].view(-1).view(torch.uint8)), (
            f"{name}: first mismatch at flat index "
            f"{(a[name].reshape(-1) != b[name].reshape(-1)).nonzero()[0].item()}")


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def ramp(name: str) -> float:
    """[0, 1] over 4 layers by hand: layer i → i/3, tensors outside layers → 0."""
    i = layer_of(name)
    return 0.0 if i is None else i / 3


CASES = {
    "linear": ("""
        merge_method: linear
        models:
          - model: a
            parameters: {weight: [0, 1]}
          - model: b
            parameters:
              weight: [{filter: mlp, value: 2}, {value: 1}]
          - model: c
            parameters: {weight: 0.5}
     """, lambda r: methods.linear([r / "a", r / "b", r / "c"], r / "direct", weights=[
        ramp, lambda n: 2.0 if "mlp" in n else 1.0, 0.5], copy_tokenizer_from=r / "a")),
    "slerp": ("""
        merge_method: slerp
        base_model: b
        slices:
          - sources:
              - {model: a, layer_range: [0, 4]}
              - {model: b, layer_range: [0, 4]}
        parameters:
          t: [{filter: self_attn, value: [0, 1]}, {value: 0.25}]
        dtype: bfloat16
     """, lambda r: methods.slerp(r / "b", r / "a", r / "direct",
                                  t=lambda n: ramp(n) if "self_attn" in n else 0.25, dtype="bfloat16",
                                  out_dtype="bfloat16", copy_tokenizer_from=r / "b")),
    "task_arithmetic": ("""
        merge_method: task_arithmetic
        base_model: base
        models:
          - model: base
          - {model: a, parameters: {weight: 0.5}}
          - {model: b, parameters: {weight: -0.25}}
        parameters: {lambda: 0.75}
        out_dtype: float16
     """, lambda r: methods.task_arithmetic(r / "base", [r / "a", r / "b"], r / "direct",
                                            weights=[0.5, -0.25], lam=0.75, out_dtype="float16",
                                            copy_tokenizer_from=r / "base")),
    "ties": ("""
        merge_method: ties
        base_model: base
        models:
          - {model: a, parameters: {weight: 1, density: 0.5}}
          - {model: b, parameters: {weight: 0.5, density: [{filter: mlp, value: 0.2}, {value: 0.7}]}}
          - {model: c, parameters: {weight: 0.25}}
        parameters: {normalize: true, int8_mask: true, density: 0.4}
        tokenizer_source: base
     """, lambda r: methods.ties(r / "base", [r / "a", r / "b", r / "c"], r / "direct",
                                 weights=[1.0, 0.5, 0.25],
                                 density=[0.5, lambda n: 0.2 if "mlp" in n else 0.7, 0.4],
                                 copy_tokenizer_from=r / "base")),
    "dare_linear": ("""
        merge_method: dare_linear
        base_model: base
        models:
          - {model: a, parameters: {weight: 0.6, density: 0.5}}
          - {model: b, parameters: {weight: 0.4, density: 0.9}}
        parameters: {lambda: 1.5}
     """, lambda r: methods.dare_linear(r / "base", [r / "a", r / "b"], r / "direct", weights=[0.6, 0.4],
                                        density=[0.5, 0.9], lam=1.5, seed=7,
                                        copy_tokenizer_from=r / "base")),
    "dare_ties": ("""
        merge_method: dare_ties
        base_model: base
        models:
          - {model: a, parameters: {weight: [1, 0]}}
          - {model: b, parameters: {weight: 1}}
        parameters: {density: 0.6, normalize: true}
     """, lambda r: methods.dare_ties(r / "base", [r / "a", r / "b"], r / "direct",
                                      weights=[lambda n: 1.0 - ramp(n), 1.0], density=[0.6, 0.6], seed=7,
                                      copy_tokenizer_from=r / "base")),
}


@engine
@pytest.mark.parametrize("method", list(CASES))
def test_run_config_matches_direct_call(tiny, tmp_path, monkeypatch, method):
    text, direct = CASES[method]
    root = tmp_path / "run"
    root.mkdir()
    for name in ("base", "a", "b", "c"):
        (root / name).symlink_to(tiny / name)
    monkeypatch.chdir(root)  # the YAML names models relative to the current directory, as mergekit does
    cfg = write(root, text, name=f"{method}.yml")
    result = run_config(cfg, root / "from-yaml", seed=7, progress=False)
    direct(root)
    assert_identical(root / "from-yaml", root / "direct")
    assert result.out == root / "from-yaml"


@engine
def test_slices_form_equals_models_form(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny)
    models = write(tmp_path, """
        merge_method: slerp
        base_model: a
        models: [{model: a}, {model: b}]
        parameters: {t: [0.2, 0.9]}
    """, name="models.yml")
    slices = write(tmp_path, """
        merge_method: slerp
        base_model: a
        slices:
          - sources: [{model: a, layer_range: [0, 4]}, {model: b, layer_range: [0, 4]}]
        parameters: {t: [0.2, 0.9]}
    """, name="slices.yml")
    run_config(models, tmp_path / "m", progress=False)
    run_config(slices, tmp_path / "s", progress=False)
    assert_identical(tmp_path / "m", tmp_path / "s")
