"""Hostile inputs to cpift-train: unavailable devices, a diverging run, non-finite eval results,
parser bombs in JSONL and recipes, tampered freeze masks. Refusals: exit 2, one line, no traceback,
inputs byte-identical, nothing published."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from training_helpers import digest, run_cli, write_jsonl, write_mask


def assert_refused(capsys, argv, *fragments, inputs=()):
    before = digest(*inputs)
    code, out, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("cpift-train: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, (f, err)
    assert digest(*inputs) == before, "inputs were modified"
    return err


def nothing_published(root: Path) -> None:
    assert [p.name for p in root.iterdir() if "out" in p.name] == [], list(root.iterdir())


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "bogus", "mps:0"])
@pytest.mark.parametrize("command", ["sft", "eval", "pipeline"])
def test_unavailable_device(command, device, capsys, tiny, train_file, tmp_path):
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    argv = {"sft": ["sft", "--model", tiny, "--train", train_file, "-o", tmp_path / "out"],
            "eval": ["eval", "--model", tiny, "--data", train_file],
            "pipeline": ["pipeline", tmp_path / "missing-recipe.yml", "-o", tmp_path / "out"]}[command]
    assert_refused(capsys, argv + ["--device", device, "-q"], "device", device, inputs=[tiny, train_file])
    nothing_published(tmp_path)


def test_diverging_sft_publishes_nothing(capsys, tiny, train_file, tmp_path):
    err = assert_refused(capsys, ["sft", "--model", tiny, "--train", train_file, "-o", tmp_path / "out",
                                  "--steps", 4, "--lr", 1e30, "--batch-size", 4, "--threads", 1, "-q"],
                         "step ", "diverged", inputs=[tiny, train_file])
    assert "lr" in err
    nothing_published(tmp_path)


def test_eval_json_is_strict_when_the_loss_is_nan(capsys, tiny, train_file, tmp_path):
    broken = tmp_path / "nan-model"
    shutil.copytree(tiny, broken)
    state = load_file(str(broken / "model.safetensors"))
    with safe_open(str(broken / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    for t in state.values():
        if t.is_floating_point():
            t.fill_(float("nan"))
    save_file(state, broken / "model.safetensors", metadata=meta)
    code, out, err = run_cli(capsys, "eval", "--model", broken, "--data", train_file, "--json",
                             tmp_path / "eval.json", "--max-new-tokens", 2, "--threads", 1, "-q")
    assert code == 0, err

    def strict(name):
        raise ValueError(f"{name} is not JSON")

    for text in (out, (tmp_path / "eval.json").read_text()):
        result = json.loads(text, parse_constant=strict)
        assert result["loss"] is None


def test_deeply_nested_jsonl_line(capsys, tiny, tmp_path):
    data = write_jsonl(tmp_path / "deep.jsonl", [{"prompt": "1+1=", "response": "2"},
                                                 '{"prompt": ' + "[" * 50000 + "]" * 50000 + "}"])
    assert_refused(capsys, ["sft", "--model", tiny, "--train", data, "-o", tmp_path / "out", "-q"],
                   "deep.jsonl:2", "nested", inputs=[tiny, data])
    nothing_published(tmp_path)


def test_recipe_alias_bomb_refused_fast(capsys, tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, c in zip("abcdefghi", "bcdefghij"):
        lines.append(f"{c}: &{c} [" + ",".join([f"*{prev}"] * 9) + "]")
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("base: model\ntasks:\n" + "\n".join("  " + ln for ln in lines) + "\n")
    start = time.perf_counter()
    assert_refused(capsys, ["pipeline", recipe, "-o", tmp_path / "out", "-q"], "recipe.yml", "alias",
                   inputs=[recipe])
    assert time.perf_counter() - start < 5
    nothing_published(tmp_path)


def test_freeze_mask_with_wrong_counts(capsys, tiny, train_file, tmp_path):
    shapes = {n: tuple(t.shape) for n, t in load_file(str(tiny / "model.safetensors")).items()
              if t.is_floating_point() and t.dim() == 2}
    path, _ = write_mask(tmp_path / "mask.safetensors", shapes)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {n: f.get_tensor(n).clone() for n in f.keys()}
    name = next(iter(tensors))
    tensors[name][0] ^= 1  # one bit more or less than the recorded count
    save_file(tensors, path, metadata=meta)
    assert_refused(capsys, ["sft", "--model", tiny, "--train", train_file, "-o", tmp_path / "out",
                            "--freeze", path, "--steps", 1, "-q"], "mask.safetensors", name,
                   inputs=[tiny, train_file, path])
    nothing_published(tmp_path)
