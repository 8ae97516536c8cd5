"""config.json of every output names the dtype its tensors are stored in (--out-dtype / --dtype)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from cpift.cli.merge_cli import main


def _run(capsys, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    return exc.value.code, capsys.readouterr().err


def _stored_dtypes(out) -> set[str]:
    dtypes = set()
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            dtypes |= {str(s.get_slice(k).get_dtype()) for k in s.keys()}
    return dtypes


@pytest.mark.parametrize("flag, dtype, stored", [("--out-dtype", "float16", "F16"), ("--dtype", "float32", "F32")])
def test_merge_config_json_follows_the_stored_dtype(capsys, llama, tmp_path, flag, dtype, stored):
    from transformers import AutoConfig

    assert json.loads((llama["task1"] / "config.json").read_text())["dtype"] == "bfloat16"
    out = tmp_path / "out"
    code, err = _run(capsys, "slerp", llama["task1"], llama["task2"], flag, dtype, "-o", out, "-q")
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == dtype and cfg.get("torch_dtype", dtype) == dtype
    assert _stored_dtypes(out) == {stored}
    assert AutoConfig.from_pretrained(out).dtype == getattr(torch, dtype)
    # everything else is the input's config, unchanged
    src = json.loads((llama["task1"] / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k not in ("dtype", "torch_dtype")} == \
        {k: v for k, v in src.items() if k not in ("dtype", "torch_dtype")}


def test_torch_dtype_key_is_updated_too(capsys, llama, tmp_path):
    """A config written by an older transformers (torch_dtype only) gets both keys."""
    import shutil

    donor = tmp_path / "donor"
    shutil.copytree(llama["task1"], donor)
    cfg = json.loads((donor / "config.json").read_text())
    cfg["torch_dtype"] = cfg.pop("dtype")
    (donor / "config.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, "linear", donor, llama["task2"], "--out-dtype", "float16", "-o", tmp_path / "o", "-q")
    assert code == 0, err
    out_cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert out_cfg["torch_dtype"] == "float16" and out_cfg["dtype"] == "float16"
    assert json.loads((donor / "config.json").read_text()) == cfg  # the input is untouched


def test_without_a_cast_config_json_is_copied_byte_for_byte(capsys, llama, tmp_path):
    code, err = _run(capsys, "slerp", llama["task1"], llama["task2"], "-o", tmp_path / "o", "-q")
    assert code == 0, err
    assert (tmp_path / "o" / "config.json").read_bytes() == (llama["task1"] / "config.json").read_bytes()


def test_fuse_and_config_runs_follow_the_dtype(capsys, llama, tmp_path):
    code, err = _run(capsys, "cores", "--base", llama["base"], "--model", f"a={llama['task1']}", "--p", "5",
                     "-o", tmp_path / "cores", "-q")
    assert code == 0, err
    code, err = _run(capsys, "fuse", "--backbone", llama["task1"], "--task",
                     f"a={llama['task1']}:{tmp_path / 'cores' / 'a.safetensors'}", "--out-dtype", "float32",
                     "-o", tmp_path / "fused", "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["dtype"] == "float32"
    assert _stored_dtypes(tmp_path / "fused") == {"F32"}
    yml = tmp_path / "c.yml"
    yml.write_text(f"merge_method: linear\nout_dtype: float16\nparameters: {{weight: 1.0}}\nmodels:\n"
                   f"- model: {llama['task1']}\n- model: {llama['task2']}\n")
    code, err = _run(capsys, "config", yml, "-o", tmp_path / "cfg", "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "cfg" / "config.json").read_text())["dtype"] == "float16"


def test_unreadable_config_json_is_one_line_exit_2(capsys, llama, tmp_path):
    import shutil

    donor = tmp_path / "donor"
    shutil.copytree(llama["task1"], donor)
    (donor / "config.json").write_text("{not json")
    code, err = _run(capsys, "slerp", donor, llama["task2"], "--out-dtype", "float16", "-o", tmp_path / "o", "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # Refused by the input check (merge/io/model_files.py read_side_files) before any dtype is set.
    assert f"{donor / 'config.json'}: not valid JSON" in err
    assert not (tmp_path / "o").exists() and (donor / "config.json").read_text() == "{not json"
