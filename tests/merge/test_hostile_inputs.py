"""Hostile inputs: crafted headers, parser bombs, overflowing parameters, ambiguous model
directories. Each refusal: exit 2, one line naming the culprit, no traceback, inputs byte-identical,
nothing at -o."""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_bad_input import assert_user_error, no_output

from cpift.errors import CheckpointError
from cpift.merge.cpi.masks import load_core_mask
from cpift.merge.io.checkpoint import Checkpoint

F = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _t(dtype, shape, offsets):
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def _file(header: dict | None = None, data: bytes = b"", *, raw: bytes | None = None, n: int | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if n is None else n) + text + data


D8, D16 = bytes(range(1, 9)), bytes(range(1, 17))
CRAFTED = {
    "valid": _file({"a": F}, D8),
    "valid-unordered": _file({"b": _t("F32", [2], [8, 16]), "a": F}, D16),
    "valid-empty-tensor": _file({"z": _t("F32", [0, 3], [0, 0]), "a": F}, D8),
    "valid-duplicate-key": _file(raw=b'{"a":' + json.dumps(F).encode() + b',"a":' + json.dumps(F).encode() + b"}",
                                 data=D8),
    "valid-deep-extra-field-127": _file(raw=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":'
                                        + b"[" * 125 + b"]" * 125 + b"}}", data=D8),
    "overlap": _file({"a": F, "b": _t("F32", [2], [4, 12])}, D8 + D8[:4]),
    "same-offsets": _file({"a": F, "b": F}, D8),
    "negative": _file({"a": _t("F32", [2], [-8, 0])}, D8),
    "gap": _file({"a": F, "b": _t("F32", [1], [12, 16])}, D16),
    "end-before-begin": _file({"a": _t("U8", [0], [8, 0])}, D8),
    "beyond-eof": _file({"a": _t("F32", [4], [0, 16])}, D8),
    "trailing-bytes": _file({"a": F}, D16),
    "header-length-beyond-eof": _file({"a": F}, D8, n=10**6),
    "header-length-huge": _file({"a": F}, D8, n=2**63),
    "too-short": b"\x01\x00",
    "bad-dtype": _file({"a": _t("X99", [2], [0, 8])}, D8),
    "shape-length-mismatch": _file({"a": _t("F32", [3], [0, 8])}, D8),
    "shape-float": _file({"a": _t("F32", [2.0], [0, 8])}, D8),
    "shape-bool": _file({"a": _t("F32", [True, 2], [0, 8])}, D8),
    "shape-overflow": _file({"a": _t("U8", [2**40, 2**40, 0], [0, 0])}),
    "three-offsets": _file({"a": _t("F32", [2], [0, 8, 8])}, D8),
    "missing-field": _file({"a": {"dtype": "F32", "shape": [2]}}, D8),
    "not-an-object": _file(raw=b"[]"),
    "metadata-int": _file({"__metadata__": {"x": 1}, "a": F}, D8),
    "nan-token": _file(raw=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":NaN}}', data=D8),
    "not-utf8": _file(raw=b'{"\xff":1}'),
    "bom": _file(raw=b"\xef\xbb\xbf" + json.dumps({"a": F}).encode(), data=D8),
    "nul-padding": _file(raw=json.dumps({"a": F}).encode() + b"\0\0", data=D8),
    "depth-bomb-128": _file(raw=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":'
                            + b"[" * 126 + b"]" * 126 + b"}}", data=D8),
    "depth-bomb-100000": _file(raw=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":'
                               + b"[" * 100000 + b"]" * 100000 + b"}}", data=D8),
}


def _library_accepts(file: Path) -> bool:
    try:
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        return True
    except Exception:  # noqa: BLE001 - the library's verdict is all the oracle needs
        return False


@pytest.fixture
def good(tmp_path) -> Path:
    d = tmp_path / "good"
    d.mkdir()
    save_file({"a": torch.tensor([1.5, -2.25])}, d / "model.safetensors")
    (d / "config.json").write_text('{"model_type": "llama"}')
    return d


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_header_refused_exactly_when_safetensors_refuses(case, tmp_path, good, capsys):
    d = tmp_path / "crafted"
    d.mkdir()
    (d / "model.safetensors").write_bytes(CRAFTED[case])
    library_ok = _library_accepts(d / "model.safetensors")
    assert library_ok == case.startswith("valid"), "the crafted file is not what its name says"
    if library_ok:
        assert Checkpoint(d).tensors  # cpift accepts it too
        return
    assert_user_error(capsys, ["linear", d, good, "-o", tmp_path / "out", "-q"], "model.safetensors",
                      inputs=[d, good])
    no_output(tmp_path)


def test_crafted_header_valid_reads_the_right_bytes(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes(CRAFTED["valid-unordered"])
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        want = {k: f.get_tensor(k) for k in f.keys()}
    with Checkpoint(d) as ckpt:
        for name, t in want.items():
            assert torch.equal(ckpt.get(name).clone(), t)


@pytest.mark.parametrize("fname", ["/etc/passwd", "../escape.safetensors", "sub/x.safetensors", "..", ""])
def test_index_entry_outside_the_model_directory(fname, tmp_path, good, capsys):
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({"a": torch.tensor([1.5, -2.25])}, tmp_path / "escape.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": fname}}))
    assert_user_error(capsys, ["linear", d, good, "-o", tmp_path / "out", "-q"], "model.safetensors.index.json",
                      inputs=[d, good])
    no_output(tmp_path)


def test_index_entry_symlink_escape(tmp_path, good, capsys):
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({"a": torch.tensor([1.5, -2.25])}, tmp_path / "outside.safetensors")
    (d / "model-00001.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    assert_user_error(capsys, ["linear", d, good, "-o", tmp_path / "out", "-q"], "outside",
                      inputs=[d, good])
    no_output(tmp_path)


@pytest.mark.parametrize("what", ["index", "config"])
def test_deeply_nested_json(what, tmp_path, good, capsys):
    d = tmp_path / "m"
    shutil.copytree(good, d)
    bomb = '{"weight_map": ' + "[" * 50000 + "]" * 50000 + "}"
    if what == "index":
        (d / "model.safetensors").unlink()
        (d / "model.safetensors.index.json").write_text(bomb)
    else:
        (d / "config.json").write_text(bomb)
    name = "model.safetensors.index.json" if what == "index" else "config.json"
    assert_user_error(capsys, ["linear", d, good, "-o", tmp_path / "out", "-q"], name, "nested",
                      inputs=[d, good])
    no_output(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"], ids=["invalid", "not-object"])
def test_bad_config_json_is_not_copied(text, tmp_path, good, capsys):
    d = tmp_path / "m"
    shutil.copytree(good, d)
    (d / "config.json").write_text(text)
    assert_user_error(capsys, ["linear", d, good, "-o", tmp_path / "out", "-q"], "config.json", inputs=[d, good])
    no_output(tmp_path)


def test_single_file_wins_over_index_as_in_transformers(tmp_path, good, capsys):
    from cpift.cli.merge_cli import main

    d = tmp_path / "both"
    shutil.copytree(good, d)
    save_file({"a": torch.tensor([100.0, 100.0])}, d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in ["linear", d, good, "-o", tmp_path / "out"]])
    assert exc.value.code == 0
    err = capsys.readouterr().err
    assert "both model.safetensors and model.safetensors.index.json" in err
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("a"), torch.tensor([1.5, -2.25]))  # the single file, not the shard


def _bomb_yaml() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for c in "bcdefghij":
        lines.append(f"{c}: &{c} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = c
    return "\n".join(lines)


@pytest.mark.parametrize("kind", ["mergekit", "step"])
def test_yaml_alias_bomb_refused_fast(kind, tmp_path, good, capsys):
    head = ("merge_method: linear\nmodels:\n  - model: " + str(good) + "\n  - model: " + str(good) + "\n"
            if kind == "mergekit" else "cpift_step: fuse\n")
    cfg = tmp_path / "bomb.yml"
    cfg.write_text(head + "parameters:\n  junk:\n" + "\n".join("    " + ln for ln in _bomb_yaml().splitlines()) + "\n")
    start = time.perf_counter()
    assert_user_error(capsys, ["config", cfg, "-o", tmp_path / "out", "-q"], "bomb.yml", "alias",
                      inputs=[cfg.parent / "good"])
    assert time.perf_counter() - start < 5
    no_output(tmp_path)


def test_yaml_deep_nesting(tmp_path, good, capsys):
    cfg = tmp_path / "deep.yml"
    cfg.write_text("merge_method: linear\nparameters:\n  x: " + "[" * 20000 + "]" * 20000 + "\n")
    assert_user_error(capsys, ["config", cfg, "-o", tmp_path / "out", "-q"], "deep.yml", "nested", inputs=[good])
    no_output(tmp_path)


@pytest.mark.parametrize("argv,fragment", [
    (["linear", "{a}", "{b}", "--weights", "1e308,1e308"], "weights"),
    (["linear", "{a}", "{b}", "--weights", "1e39,1"], "weights"),
    (["linear", "{a}", "{b}", "--weights", "nan,1"], "weights"),
    (["task-arithmetic", "{b}", "--base", "{a}", "--lambda", "1e39"], "lambda"),
    (["task-arithmetic", "{b}", "--base", "{a}", "--lambda", "inf"], "lambda"),
    (["task-arithmetic", "{b}", "--base", "{a}", "--lambda", "1e30", "--weights", "1e30"], "lambda"),
    (["ties", "{b}", "--base", "{a}", "--density", "nan"], "density"),
    (["slerp", "{a}", "{b}", "--t", "nan"], "t"),
], ids=["weights-sum", "weights-f32", "weights-nan", "lambda-f32", "lambda-inf", "lambda-times-weights",
        "density-nan", "t-nan"])
def test_overflowing_parameters(argv, fragment, tmp_path, good, capsys):
    b = tmp_path / "b"
    shutil.copytree(good, b)
    argv = [str(x).format(a=good, b=b) for x in argv]
    assert_user_error(capsys, argv + ["-o", tmp_path / "out", "-q"], fragment, inputs=[good, b])
    no_output(tmp_path)


@pytest.mark.parametrize("value", ["1e39", "-1e39"])
def test_overflowing_yaml_parameter(value, tmp_path, good, capsys):
    cfg = tmp_path / "big.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {good}\n    parameters: {{weight: {value}}}\n"
                   f"  - model: {good}\n    parameters: {{weight: 1.0}}\n")
    assert_user_error(capsys, ["config", cfg, "-o", tmp_path / "out", "-q"], "big.yml", "weight", inputs=[good])
    no_output(tmp_path)


@pytest.mark.parametrize("repo", ["not-a-repo", "me/x--y", "a/b/c", "me/" + "x" * 100])
def test_push_to_hub_repo_checked_before_the_merge(repo, tmp_path, good, capsys):
    assert_user_error(capsys, ["linear", good, good, "-o", tmp_path / "out", "-q", "--push-to-hub", repo],
                      "--push-to-hub", inputs=[good])
    no_output(tmp_path)


def _tamper_mask(src: Path, dst: Path, *, counts=None, k=None, flip: bool = False) -> None:
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {n: f.get_tensor(n).clone() for n in f.keys()}
    if counts is not None:
        meta["counts"] = json.dumps(counts(json.loads(meta["counts"])))
    if k is not None:
        meta["k"] = str(k(int(meta["k"])))
    if flip:
        name = next(iter(tensors))
        tensors[name][0] ^= 1
    save_file(tensors, dst, metadata=meta)


@pytest.fixture
def masks(llama, tmp_path):
    from cpift.merge.cpi.cores import compute_cores

    out = tmp_path / "cores"
    compute_cores(llama["base"], [("t1", llama["task1"]), ("t2", llama["task2"])], out, p=5.0, progress=False)
    return out


@pytest.mark.parametrize("how", ["count", "k", "bits"])
def test_mask_popcount_disagreeing_with_metadata(how, masks, llama, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    kw = {"count": dict(counts=lambda c: {n: v + (i == 0) for i, (n, v) in enumerate(c.items())}),
          "k": dict(k=lambda k: k + 1), "bits": dict(flip=True)}[how]
    _tamper_mask(masks / "t1.safetensors", bad / "t1.safetensors", **kw)
    with pytest.raises(CheckpointError, match=r"t1\.safetensors.*corrupt"):
        load_core_mask(bad / "t1.safetensors", lazy=True)
    assert_user_error(capsys, ["cluster", bad / "t1.safetensors", masks / "t2.safetensors"], "t1.safetensors",
                      "corrupt",
                      inputs=[bad, masks])
    assert_user_error(capsys, ["fuse", "--backbone", llama["base"],
                               "--task", f"t1={llama['task1']}:{bad / 't1.safetensors'}",
                               "-o", tmp_path / "out", "-q"], "t1.safetensors", "corrupt", inputs=[bad])
    no_output(tmp_path)
