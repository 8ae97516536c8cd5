"""One consistency rule for every merge plan (merge/consistency.py, applied by
io.models.check_compatible for every method, YAML config, layer stack and ``cores``): the same architecture,
non-floating tensors equal in every input, no tensor integer in one input and float in another; each
breach refused in one line naming the tensor or config.json (exit 2, inputs untouched, nothing at -o)
unless ``--allow-crimes``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_input import assert_user_error, no_output, run_cli

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}
MISTRAL = {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "num_hidden_layers": 2}


def model(root: Path, name: str, config: dict, **extra: torch.Tensor) -> Path:
    d = root / name
    d.mkdir()
    g = torch.Generator().manual_seed(len(name))
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(3, 5, generator=g) for i in range(2)}
    tensors["model.embed_tokens.weight"] = torch.randn(7, 5, generator=g)
    save_file({**tensors, **extra}, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("argv", [
    ["linear", "{a}", "{b}"],
    ["slerp", "{a}", "{b}", "--t", "0.3"],
    ["task-arithmetic", "{b}", "--base", "{a}"],
    ["cores", "--base", "{a}", "--model", "t={b}"],
], ids=["linear", "slerp", "task-arithmetic", "cores"])
def test_different_architectures_refused(capsys, tmp_path, argv):
    a, b = model(tmp_path, "llama", LLAMA), model(tmp_path, "mistral", MISTRAL)
    args = [x.format(a=a, b=b) for x in argv] + ["-o", tmp_path / "out", "-q"]
    assert_user_error(capsys, args, f"{b / 'config.json'}: model_type 'mistral', but {a / 'config.json'} has 'llama'",
                      "--allow-crimes", inputs=[a, b])
    no_output(tmp_path)
    code, _, err = run_cli(capsys, *args, "--allow-crimes")
    assert code == 0, err
    assert (tmp_path / "out").is_dir()


def test_different_architectures_in_yaml_and_stack(capsys, tmp_path):
    a, b = model(tmp_path, "llama", LLAMA), model(tmp_path, "mistral", MISTRAL)
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: linear\nparameters: {{weight: 1.0}}\nmodels:\n  - model: {a}\n  - model: {b}\n")
    stack = tmp_path / "s.yml"
    stack.write_text(f"merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 1]}}]\n"
                     f"  - sources: [{{model: {b}, layer_range: [1, 2]}}]\n")
    sliced = tmp_path / "l.yml"
    sliced.write_text(f"merge_method: linear\nparameters: {{weight: 1.0}}\nslices:\n"
                      f"  - sources: [{{model: {a}, layer_range: [0, 1]}}, {{model: {b}, layer_range: [0, 1]}}]\n"
                      f"  - sources: [{{model: {a}, layer_range: [1, 2]}}, {{model: {b}, layer_range: [1, 2]}}]\n")
    for f in (cfg, stack, sliced):
        assert_user_error(capsys, ["config", f, "-o", tmp_path / "out", "-q"], "model_type 'mistral'",
                          "--allow-crimes", inputs=[a, b, f])
        no_output(tmp_path)
        code, _, err = run_cli(capsys, "config", f, "-o", tmp_path / f.stem, "-q", "--allow-crimes")
        assert code == 0, err


def test_architecture_missing_from_one_config_is_no_breach(capsys, tmp_path):
    a = model(tmp_path, "a", LLAMA)
    b = model(tmp_path, "b", {"model_type": "llama"})
    assert run_cli(capsys, "linear", a, b, "-o", tmp_path / "out", "-q")[0] == 0


@pytest.mark.parametrize("first,second,fragment", [
    (torch.arange(6), torch.arange(6).flip(0), "tensor 'pos' (torch.int64, not merged but copied) differs between"),
    (torch.arange(6), torch.arange(6).int(), "tensor 'pos' (torch.int64, not merged but copied) differs"),
    (torch.tensor([True, False]), torch.tensor([True, True]), "tensor 'pos' (torch.bool, not merged but copied)"),
    (torch.arange(6), torch.arange(6).float(), "tensor 'pos': torch.int64 (non-floating) in"),
    (torch.arange(6).float(), torch.arange(6), "tensor 'pos': torch.float32 (floating-point) in"),
], ids=["int-values", "int-dtypes", "bool-values", "int-then-float", "float-then-int"])
def test_non_floating_tensors_must_agree(capsys, tmp_path, first, second, fragment):
    a, b = model(tmp_path, "a", LLAMA, pos=first), model(tmp_path, "b", LLAMA, pos=second)
    args = ["linear", a, b, "-o", tmp_path / "out", "-q"]
    assert_user_error(capsys, args, fragment, "--allow-crimes", inputs=[a, b])
    no_output(tmp_path)
    code, _, err = run_cli(capsys, *args[:-1], "--allow-crimes")
    assert code == 0 and "merged anyway (--allow-crimes)" in err, err
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["pos"], first)


def test_equal_integer_tensors_are_copied(capsys, tmp_path):
    pos = torch.arange(6) * 3
    a, b = model(tmp_path, "a", LLAMA, pos=pos), model(tmp_path, "b", LLAMA, pos=pos.clone())
    code, _, err = run_cli(capsys, "linear", a, b, "-o", tmp_path / "out")
    assert code == 0 and "--allow-crimes" not in err, err
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["pos"], pos)
