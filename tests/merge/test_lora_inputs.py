"""LoRA / PEFT adapter inputs (merge/io/lora.py): ``BASE+ADAPTER`` and adapter directories, merged
on read as W + B @ A · alpha / r, against a float64 reference; CLI and YAML runs equal the same merge
of a pre-merged checkpoint; bad adapters are one-line errors with nothing written."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from references import load_state
from safetensors.torch import save_file
from test_bad_input import assert_user_error, no_output, run_cli

from cpift.merge.io.lora import AdaptedCheckpoint, open_model

TARGETS = ("q_proj", "v_proj", "down_proj")


def tiny_llama(path: Path, dtype=torch.float32, seed=0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=67, hidden_size=24, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_adapter(path: Path, base: Path, *, r=3, alpha=5.0, rslora=False, fan_in_fan_out=False,
                 modules_to_save=(), seed=1, dtype=torch.float32, extra=None, bad_shape=False) -> Path:
    """A PEFT adapter by hand: PEFT's key format and adapter_config.json."""
    g = torch.Generator().manual_seed(seed)
    state = load_state(base)
    tensors = {}
    for name, w in state.items():
        module = name.removesuffix(".weight")
        if not module.endswith(TARGETS):
            continue
        out_f, in_f = (w.shape[1], w.shape[0]) if fan_in_fan_out else w.shape
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_f + bad_shape, generator=g).to(dtype)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, r, generator=g).to(dtype)
    for name in modules_to_save:
        tensors[f"base_model.model.{name}"] = torch.randn(state[name].shape, generator=g).to(dtype)
    path.mkdir(parents=True)
    save_file(tensors, path / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
           "fan_in_fan_out": fan_in_fan_out, "target_modules": list(TARGETS), "use_dora": False,
           "base_model_name_or_path": str(base), "modules_to_save": None}
    cfg.update(extra or {})
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def merged64(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The float64 reference: W + (B @ A)[ᵀ] · scale for every targeted tensor; replacements as saved."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
    ad = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for name, w in load_state(base).items():
        key = f"base_model.model.{name.removesuffix('.weight')}"
        if f"base_model.model.{name}" in ad:
            out[name] = ad[f"base_model.model.{name}"].double()
        elif f"{key}.lora_A.weight" in ad:
            d = ad[f"{key}.lora_B.weight"].double() @ ad[f"{key}.lora_A.weight"].double()
            out[name] = w.double() + (d.T if cfg["fan_in_fan_out"] else d) * scale
        else:
            out[name] = w.double()
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {"base": tiny_llama(root / "base"), "other": tiny_llama(root / "other", seed=5),
            "bf16": tiny_llama(root / "bf16", dtype=torch.bfloat16, seed=7), "root": root}


CASES = {"plain": {}, "rslora": {"rslora": True}, "fan_in_fan_out": {"fan_in_fan_out": True},
         "modules_to_save": {"modules_to_save": ("lm_head.weight",)}, "r1": {"r": 1, "alpha": 16},
         "bf16_factors": {"dtype": torch.bfloat16}}


@pytest.mark.parametrize("base_name", ["base", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_merged_tensors_match_float64(models, tmp_path, case, base_name):
    base = models[base_name]
    adapter = make_adapter(tmp_path / "ad", base, **CASES[case])
    ref = merged64(base, adapter)
    with AdaptedCheckpoint(base, adapter) as ck:
        assert ck.names() and set(ck.names()) == set(ref)
        for name in ck.names():
            got = ck.get(name)
            assert got.dtype == ck.info(name).dtype and tuple(got.shape) == tuple(ref[name].shape)
            want = ref[name].to(got.dtype)  # one rounding of the exact value (float32 math: a few ulps)
            tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[got.dtype]
            torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol, msg=name)


def test_adapter_directory_alone_uses_its_base(models, tmp_path):
    adapter = make_adapter(tmp_path / "ad", models["base"])
    a, b = open_model(adapter), open_model(f"{models['base']}+{adapter}")
    for name in a.names():
        assert torch.equal(a.get(name), b.get(name)), name


def test_bin_adapter_equals_safetensors(models, tmp_path):
    from safetensors.torch import load_file

    adapter = make_adapter(tmp_path / "ad", models["base"])
    binned = tmp_path / "bin"
    binned.mkdir()
    shutil.copy(adapter / "adapter_config.json", binned)
    torch.save(load_file(adapter / "adapter_model.safetensors"), binned / "adapter_model.bin")
    a, b = AdaptedCheckpoint(models["base"], adapter), AdaptedCheckpoint(models["base"], binned)
    for name in a.names():
        assert torch.equal(a.get(name), b.get(name)), name


def premerged(base: Path, adapter: Path, out: Path) -> Path:
    """The same adapter merged into a checkpoint of its own (cpift's reader, saved by safetensors)."""
    shutil.copytree(base, out)
    with AdaptedCheckpoint(base, adapter) as ck:
        save_file({n: ck.get(n).contiguous() for n in ck.names()}, out / "model.safetensors")
    return out


def test_cli_and_yaml_with_base_plus_lora_equal_premerged(capsys, models, tmp_path):
    adapter = make_adapter(tmp_path / "ad", models["base"], rslora=True)
    pre = premerged(models["base"], adapter, tmp_path / "pre")
    lora_ref = f"{models['base']}+{adapter}"
    want_out = tmp_path / "want"
    code, _, err = run_cli(capsys, "linear", pre, models["other"], "--weights", "0.3,0.7", "-o", want_out)
    assert code == 0, err
    want = load_state(want_out)
    code, _, err = run_cli(capsys, "linear", lora_ref, models["other"], "--weights", "0.3,0.7", "-o",
                           tmp_path / "cli")
    assert code == 0, err
    got = load_state(tmp_path / "cli")
    assert all(torch.equal(got[n], want[n]) for n in want)
    recipe = (tmp_path / "cli" / "cpift_recipe.yml").read_text()
    assert "+" in recipe and adapter.name in recipe  # the recipe names base+adapter, not the base alone

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "cli")

    cfg = tmp_path / "lin.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {lora_ref}\n    parameters: {{weight: 0.3}}\n"
                   f"  - model: {models['other']}\n    parameters: {{weight: 0.7}}\n")
    code, _, err = run_cli(capsys, "config", cfg, "-o", tmp_path / "yaml")
    assert code == 0, err
    got = load_state(tmp_path / "yaml")
    assert all(torch.equal(got[n], want[n]) for n in want)


BAD = {
    "dora": ({"extra": {"use_dora": True}}, "use_dora"),
    "not_lora": ({"extra": {"peft_type": "IA3"}}, "peft_type"),
    "shape": ({"bad_shape": True}, "do not fit"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_is_one_line_error(capsys, models, tmp_path, case):
    kw, fragment = BAD[case]
    adapter = make_adapter(tmp_path / "ad", models["base"], **kw)
    assert_user_error(capsys, ["linear", f"{models['base']}+{adapter}", models["other"], "-o", tmp_path / "out"],
                      fragment, inputs=[adapter, models["base"]])
    no_output(tmp_path)


def test_missing_adapter_config_is_one_line_error(capsys, models, tmp_path):
    adapter = make_adapter(tmp_path / "ad", models["base"])
    (adapter / "adapter_config.json").unlink()
    assert_user_error(capsys, ["linear", f"{models['base']}+{adapter}", models["other"], "-o", tmp_path / "out"],
                      "adapter_config.json", inputs=[adapter])
    no_output(tmp_path)


def test_matches_peft_merge_and_unload(models, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed (optional: pip install peft)")
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tmp_path / "ad", models["base"], modules_to_save=("lm_head.weight",),
                           extra={"modules_to_save": ["lm_head"]})
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["base"]), adapter)
    want = model.merge_and_unload().state_dict()
    with AdaptedCheckpoint(models["base"], adapter) as ck:
        for name in ck.names():
            assert torch.equal(ck.get(name), want[name]), name


@pytest.mark.skipif(not os.environ.get("CPIFT_MERGEKIT_YAML"), reason="set CPIFT_MERGEKIT_YAML to mergekit-yaml")
def test_mergekit_parity_base_plus_lora(capsys, models, tmp_path):
    adapter = make_adapter(tmp_path / "ad", models["base"])
    cfg = tmp_path / "lin.yml"
    cfg.write_text(f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {models['base']}+{adapter}\n"
                   f"    parameters: {{weight: 0.3}}\n  - model: {models['other']}\n    parameters: {{weight: 0.7}}\n")
    subprocess.run([os.environ["CPIFT_MERGEKIT_YAML"], str(cfg), str(tmp_path / "mk"), "--lora-merge-cache",
                    str(tmp_path / "cache")], check=True, capture_output=True)
    code, _, err = run_cli(capsys, "config", cfg, "-o", tmp_path / "cp")
    assert code == 0, err
    mk, cp = load_state(tmp_path / "mk"), load_state(tmp_path / "cp")
    assert set(mk) <= set(cp)
    for n in mk:
        torch.testing.assert_close(cp[n], mk[n].to(cp[n].dtype), rtol=1e-6, atol=1e-6, msg=n)
