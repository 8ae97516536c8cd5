"""Bounded numbers on the merge side: every numeric field, from the command line, a YAML config, a
step recipe, adapter or mask metadata, passes cpift.numbers' one bounded parser (finite, in range,
integers within int64). Each refusal: exit 2, one line naming the file/field, no traceback, inputs
byte-identical, nothing at -o."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_bad_input import assert_user_error, no_output
from test_lora_inputs import make_adapter, tiny_llama

from cpift.errors import ConfigError, ParameterError
from cpift.numbers import INT64_MAX, parse_number

BIG = "9" * 400


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    out = []
    for name, values in (("a", [1.5, -2.25, 0.5]), ("b", [1.0, -2.0, 0.75])):
        d = tmp_path / name
        d.mkdir()
        save_file({"w": torch.tensor(values)}, d / "model.safetensors")
        (d / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
        out.append(d)
    return out[0], out[1]


@pytest.mark.parametrize("raw,kw,expected", [
    ("1e-3", {}, 0.001), (7, {"integer": True}, 7), ("12", {"integer": True}, 12), (3.0, {"integer": True}, 3),
    ("1e3", {"integer": True}, 1000), (INT64_MAX, {"integer": True}, INT64_MAX), (0.5, {"lo": 0, "hi": 1}, 0.5),
])
def test_parser_accepts(raw, kw, expected):
    v = parse_number(raw, "f", **kw)
    assert v == expected and type(v) is type(expected)


@pytest.mark.parametrize("raw,kw,message", [
    (BIG, {}, "f: '999999999999999999999999999...(402 chars) is too long for a number"),
    (int(BIG), {}, "f: expected a finite number, got 9999"),
    (int(BIG), {"integer": True}, "does not fit a 64-bit integer"),
    (2**63, {"integer": True}, "f: 9223372036854775808 does not fit a 64-bit integer"),
    ("inf", {}, "f: expected a finite number, got 'inf'"), (float("nan"), {}, "expected a finite number"),
    ("1e400", {}, "expected a finite number"), (True, {}, "expected a finite number, got True"),
    (None, {}, "got None"), ([1], {}, "got [1]"), (2.5, {"integer": True}, "f: expected an integer, got 2.5"),
    ("0x10", {}, "expected a finite number, got '0x10'"), (0, {"lo": 0, "lo_open": True}, "f: 0 is not > 0"),
    (1.5, {"lo": 0, "hi": 1}, "f: 1.5 is outside [0, 1]"), (1, {"hi": 1, "hi_open": True}, "f: 1 is not < 1"),
])
def test_parser_refuses(raw, kw, message):
    with pytest.raises(ConfigError) as e:
        parse_number(raw, "f", **kw)
    assert message in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 120


def test_parser_raises_the_asked_error():
    with pytest.raises(ParameterError):
        parse_number("x", "f", error=ParameterError)


@pytest.mark.parametrize("args,fragment", [
    (["linear", "{a}", "{b}", "--max-shard-size", BIG], "max_shard_size: "),
    (["linear", "{a}", "{b}", "--max-shard-size", str(2**70)], "does not fit a 64-bit integer"),
    (["linear", "{a}", "{b}", "--max-shard-size", "9" * 30 + "GB"], "max_shard_size: "),
    (["linear", "{a}", "{b}", "--threads", "100000"], "Invalid value for '--threads': 100000 is outside [1, "),
    (["linear", "{a}", "{b}", "--weights", f"{BIG},1"], "--weights"),
    (["slerp", "{a}", "{b}", "--t", BIG], "Invalid value for '--t'"),
    (["ties", "{b}", "--base", "{a}", "--density", "1e999"], "--density: expected comma-separated finite"),
    (["dare-linear", "{b}", "--base", "{a}", "--seed", str(2**70)], "'--seed': 1180591620717411303424 does not fit"),
    (["cores", "--base", "{a}", "--model", "t={b}", "--p", BIG], "Invalid value for '--p'"),
    (["cores", "--base", "{a}", "--model", "t={b}", "--p", "inf"], "Invalid value for '--p'"),
    (["cores", "--base", "{a}", "--model", "t={b}", "--granularity", f"block:{BIG}"], "granularity: block:N: "),
    (["cores", "--base", "{a}", "--model", "t={b}", "--granularity", f"block:{2**70}"], "granularity: block:N: "),
    (["cores", "--base", "{a}", "--model", "t={b}", "--granularity", "block:0"], "granularity: block:N: 0 is outside"),
    (["cores", "--base", "{a}", "--model", "t={b}", "--threads", "100000"], "'--threads'"),
    (["fuse", "--backbone", "{a}", "--task", "t={b}:m.safetensors", "--omega", "nan"], "Invalid value for '--omega'"),
], ids=["shard-400-digits", "shard-2**70", "shard-30-digit-GB", "threads-100000", "weights-400-digits",
        "t-400-digits", "density-1e999", "seed-2**70", "p-400-digits", "p-inf", "block-400-digits", "block-2**70",
        "block-0", "cores-threads", "omega-nan"])
def test_command_line_numbers(capsys, tmp_path, pair, args, fragment):
    a, b = pair
    argv = [x.format(a=a, b=b) for x in args] + ["-o", tmp_path / "out", "-q"]
    assert_user_error(capsys, argv, fragment, inputs=[a, b])
    no_output(tmp_path)


def _config(tmp_path: Path, a: Path, b: Path, method: str = "linear", extra: str = "",
            weight: str = "1") -> Path:
    base = f"base_model: {a}\n" if method != "linear" else ""
    cfg = tmp_path / "merge.yml"
    cfg.write_text(f"merge_method: {method}\n{base}models:\n  - model: {a}\n    parameters: {{weight: {weight}}}\n"
                   f"  - model: {b}\n    parameters: {{weight: 1}}\n{extra}")
    return cfg


@pytest.mark.parametrize("method,extra,weight,fragment", [
    ("linear", "", BIG, "merge.yml: models[0].parameters.weight: "),
    ("linear", "", "-" + BIG, "merge.yml: models[0].parameters.weight: "),
    ("linear", "", "[1, " + BIG + "]", "merge.yml: models[0].parameters.weight[1]: "),
    ("linear", "", "{filter: w, value: " + BIG + "}", "merge.yml: models[0].parameters.weight.value: "),
    ("linear", "tokenizer: {source: union, pad_to_multiple_of: " + BIG + "}\n", "1",
     "merge.yml: tokenizer.pad_to_multiple_of: "),
    ("linear", "tokenizer: {source: union, pad_to_multiple_of: 4294967296}\n", "1",
     "merge.yml: tokenizer.pad_to_multiple_of: 4294967296 is outside [1, 1048576]"),
    ("linear", "cpift: {max_shard_size: " + BIG + "}\n", "1", "merge.yml: cpift.max_shard_size: "),
    ("dare_linear", "cpift: {seed: " + BIG + "}\n", "1", "merge.yml: cpift.seed: "),
    ("dare_linear", "cpift: {seed: " + str(2**64) + "}\n", "1", "merge.yml: cpift.seed: 18446744073709551616 does not"),
], ids=["weight-400-digits", "weight-minus-400-digits", "gradient-400-digits", "conditional-400-digits",
        "pad-400-digits", "pad-2**32", "shard-400-digits", "seed-400-digits", "seed-2**64"])
def test_yaml_numbers(capsys, tmp_path, pair, method, extra, weight, fragment):
    a, b = pair
    cfg = _config(tmp_path, a, b, method, extra, weight)
    assert_user_error(capsys, ["config", cfg, "-o", tmp_path / "out", "-q"], fragment, inputs=[a, b, cfg])
    no_output(tmp_path)


def test_config_seed_option(capsys, tmp_path, pair):
    a, b = pair
    cfg = _config(tmp_path, a, b, "dare_linear")
    assert_user_error(capsys, ["config", cfg, "-o", tmp_path / "out", "-q", "--seed", str(2**70)],
                      "'--seed': 1180591620717411303424 does not fit a 64-bit integer", inputs=[a, b, cfg])
    no_output(tmp_path)


@pytest.mark.parametrize("field,value,fragment", [
    ("p", BIG, "recipe.yml: p: "), ("p", ".inf", "recipe.yml: p: expected a finite number"),
    ("p", "1e999", "recipe.yml: p: expected a finite number"),
    ("granularity", "block:" + BIG, "granularity: block:N: "),
], ids=["p-400-digits", "p-inf", "p-1e999", "block-400-digits"])
def test_step_recipe_numbers(capsys, tmp_path, pair, field, value, fragment):
    a, b = pair
    recipe = tmp_path / "recipe.yml"
    fields = {"p": "1", "granularity": "element", field: value}
    recipe.write_text(f"cpift_step: cores\nbase: {a}\nmodels: [{{name: t, model: {b}}}]\n"
                      + "".join(f"{k}: {v}\n" for k, v in fields.items()))
    assert_user_error(capsys, ["config", recipe, "-o", tmp_path / "out", "-q"], fragment, inputs=[a, b, recipe])
    no_output(tmp_path)


@pytest.mark.parametrize("extra,fragment", [
    ({"r": int(BIG)}, "adapter_config.json: r: "),
    ({"r": 2.5}, "adapter_config.json: r: expected an integer ≥ 1, got 2.5"),
    ({"lora_alpha": "big"}, "adapter_config.json: lora_alpha: expected a positive number, got 'big'"),
    ({"lora_alpha": 1e300}, "adapter_config.json: lora_alpha: 1e+300 is outside (0, "),
    ({"rank_pattern": {"q_proj": "3"}}, "adapter_config.json: rank_pattern['q_proj']: expected an integer ≥ 1"),
    ({"rank_pattern": {"q_proj": [3]}}, "adapter_config.json: rank_pattern['q_proj']: expected an integer ≥ 1"),
    ({"rank_pattern": {"q_proj": int(BIG)}}, "adapter_config.json: rank_pattern['q_proj']: "),
    ({"rank_pattern": {"q_proj(": 3}}, "adapter_config.json: rank_pattern: 'q_proj(' is not a regular expression"),
    ({"alpha_pattern": {"v_proj": None}}, "adapter_config.json: alpha_pattern['v_proj']: expected a positive number"),
    ({"alpha_pattern": {"v_proj": -1}}, "adapter_config.json: alpha_pattern['v_proj']: -1 is outside (0, "),
    ({"alpha_pattern": {"[v": 2}}, "adapter_config.json: alpha_pattern: '[v' is not a regular expression"),
    ({"alpha_pattern": [1]}, "adapter_config.json: alpha_pattern: expected an object"),
], ids=["r-400-digits", "r-fraction", "alpha-text", "alpha-1e300", "rank-text", "rank-list", "rank-400-digits",
        "rank-bad-regex", "alpha-null", "alpha-negative", "alpha-bad-regex", "alpha-list"])
def test_adapter_metadata_numbers(capsys, tmp_path, extra, fragment):
    base = tiny_llama(tmp_path / "base")
    adapter = make_adapter(tmp_path / "adapter", base)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(extra)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert_user_error(capsys, ["linear", f"{base}+{adapter}", base, "-o", tmp_path / "out", "-q"], fragment,
                      inputs=[base, adapter])
    no_output(tmp_path)


@pytest.mark.parametrize("key,value,fragment", [
    ("p", BIG, "metadata p: "), ("p", "nan", "metadata p: expected a finite number"),
    ("k", str(2**70), "metadata k: 1180591620717411303424 does not fit"), ("threshold", "1e999", "metadata threshold"),
], ids=["p-400-digits", "p-nan", "k-2**70", "threshold-1e999"])
def test_mask_metadata_numbers(capsys, tmp_path, pair, key, value, fragment):
    from safetensors import safe_open

    a, b = pair
    assert_ok = ["cores", "--base", a, "--model", f"t={b}", "-o", tmp_path / "masks", "-q"]
    from test_bad_input import run_cli

    assert run_cli(capsys, *assert_ok)[0] == 0
    mask = tmp_path / "masks" / "t.safetensors"
    with safe_open(str(mask), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta[key] = value
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata=meta)
    assert_user_error(capsys, ["fuse", "--backbone", a, "--task", f"t={b}:{bad}", "-o", tmp_path / "out", "-q"],
                      "bad.safetensors: " + fragment, inputs=[a, b, bad])
    no_output(tmp_path)


@pytest.mark.parametrize("args,fragment", [
    (["--synthetic", f"tiny-layers:{BIG}"], "--synthetic: "),
    (["--synthetic", "tiny-layers:²"], "the layer count: expected an integer, got '²'"),
    (["--synthetic", "tiny-layers:100000"], "the layer count: 100000 is outside [1, 256]"),
    (["--synthetic", "tiny-layers:-1"], "the layer count: -1 is outside"),
    (["--synthetic", "tiny", "--repeat", str(2**70)], "'--repeat'"),
    (["--synthetic", "tiny", "--busy", "100000"], "'--busy'"),
    (["--synthetic", "tiny", "--case-timeout", "inf"], "'--case-timeout'"),
    (["--synthetic", "tiny", "--threads", "100000"], "'--threads'"),
    (["--synthetic", "tiny", "--max-shard-size", BIG], "--max-shard-size: "),
], ids=["layers-400-digits", "layers-superscript", "layers-100000", "layers-negative", "repeat-2**70", "busy-100000",
        "case-timeout-inf", "threads-100000", "shard-400-digits"])
def test_bench_numbers(capsys, tmp_path, args, fragment):
    assert_user_error(capsys, ["bench", *args, "--workdir", tmp_path / "work", "--methods", "slerp"], fragment)
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("method,extra", [("passthrough", ""), ("linear", "parameters: {weight: 1.0}\n")],
                         ids=["stack", "slices"])
def test_layer_range_numbers(capsys, tmp_path, pair, method, extra):
    a, b = pair
    cfg = tmp_path / "s.yml"
    second = f", {{model: {b}, layer_range: [0, {BIG}]}}" if method == "linear" else ""
    cfg.write_text(f"merge_method: {method}\n{extra}slices:\n  - sources: [{{model: {a}, layer_range: [0, {BIG}]}}"
                   f"{second}]\n")
    assert_user_error(capsys, ["config", cfg, "-o", tmp_path / "out", "-q"],
                      "s.yml: slices[0].sources[0].layer_range: 99999", "does not fit a 64-bit integer",
                      inputs=[a, b, cfg])
    no_output(tmp_path)
