"""mergekit configs cpift refuses (each error names the file and the field), and model resolution."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from config_helpers import SLERP, write

from cpift.errors import ConfigError
from cpift.merge.mergekit.config import load_config
from cpift.merge.mergekit.run import resolve_model, run_config

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
    (f"merge_method: fourier_slerp\n{GOOD_MODELS}\n", r"merge_method: 'fourier_slerp' is not supported by cpift"),
    (f"{GOOD_MODELS}\n", r"merge_method: missing"),
    ("merge_method: linear\n", r"models: give exactly one of 'models' and 'slices'"),
    (f"merge_method: linear\n{GOOD_MODELS}\nslices: []\n", r"give exactly one of 'models' and 'slices'"),
    ("merge_method: linear\nmodels: [a, b]\n", r"models\[0\]: expected a mapping with a 'model' key"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}, layer_range: [0, 4]}, {model: b}]\n",
     r"models\[0\]\.layer_range: unknown key"),
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
    (f"merge_method: linear\n{GOOD_MODELS}\ntokenizer: {{source: base, tokens: {{x: {{force: 1}}}}}}\n",
     r"tokenizer\.tokens\.x\.force: expected true or false"),
    (f"merge_method: linear\n{GOOD_MODELS}\ntokenizer: {{tokens: {{x: {{source: {{kind: one}}}}}}}}\n",
     r"tokenizer\.tokens\.x\.source\.kind: expected 'zero' or 'model_token'"),
    (f"merge_method: linear\n{GOOD_MODELS}\n"
     f"tokenizer: {{tokens: {{x: {{source: {{kind: model_token, model: a}}}}}}}}\n",
     r"tokenizer\.tokens\.x\.source: give exactly one of token and token_id"),
    (f"merge_method: linear\n{GOOD_MODELS}\ntokenizer: {{pad_to_multiple_of: 0}}\n",
     r"tokenizer\.pad_to_multiple_of: 0 is outside \[1, 1048576\]"),
    (f"merge_method: linear\n{GOOD_MODELS}\ntokenizer: {{sauce: base}}\n", r"tokenizer\.sauce: unknown key"),
    (f"merge_method: linear\n{GOOD_MODELS}\ntokenizer: {{}}\ntokenizer_source: base\n",
     r"tokenizer: give tokenizer or tokenizer_source, not both"),
    (f"merge_method: linear\n{GOOD_MODELS}\nchat_template: chatmlx\n",
     r"chat_template: 'chatmlx' is neither 'auto', a built-in template"),
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
          - {model: c, layer_range: [2, 4]}
    """, r"slices\[1\]\.sources: slerp merges exactly two models, base_model and one other; got 3"),
    ("""
      - sources:
          - {model: a, layer_range: [3, 1]}
          - {model: b, layer_range: [3, 1]}
    """, r"slices\[0\]\.sources\[0\]\.layer_range: \[3, 1\] is empty or reversed"),
    ("""
      - sources:
          - {model: a, layer_range: [0, 4]}
          - {model: b, layer_range: [0, 3]}
    """, r"slices\[0\]\.sources\[1\]\.layer_range: \[0, 3\] has 3 layers, slices\[0\]\.sources\[0\] \[0, 4\] "
         r"has 4; every source of a slice gives the same number of layers"),
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
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # 'missing/dir' has the form of a Hub id: no network in tests
    assert resolve_model("m", "models[0].model") == tmp_path / "work" / "m"
    with pytest.raises(ConfigError, match=r"x\.yml: models\[0\]\.model: 'missing/dir' is not a directory "
                                          r"\(relative paths are relative to the current directory"):
        resolve_model("missing/dir", "models[0].model", "x.yml")


def test_run_config_checks_layer_range_against_config_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_model(tmp_path / "a", layers=3)
    fake_model(tmp_path / "b", layers=3)
    p = write(tmp_path, SLERP.replace("model: other", "model: b").replace("model: base", "model: a")
              .replace("base_model: base", "base_model: a"))
    with pytest.raises(ConfigError, match=r"slices\[0\]\.sources\[0\]\.layer_range: \[0, 4\] is outside "
                                          r"the model's 3 layers"):
        run_config(p, tmp_path / "out")


# tokenizer_source with vocabularies that differ runs: tests/merge/test_tokenizer_rows.py.
