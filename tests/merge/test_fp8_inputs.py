"""fp8 inputs (F8_E4M3, F8_E5M2), block-scaled with ``weight_scale_inv``, are read
as float32 (merge/io/fp8.py): the read equals the float64 dequantisation rounded to float32 bit for bit,
and every method variant and ``cores`` gives exactly what it gives on the dequantised float32 copies;
malformed scales are one-line errors naming the tensor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_input import assert_user_error, no_output, run_cli

from cpift.merge.io.lora import open_model

BLOCK = (4, 8)
SHAPES = {"model.layers.0.mlp.up_proj.weight": (10, 13), "model.layers.1.mlp.up_proj.weight": (7, 16),
          "model.layers.0.self_attn.q_proj.weight": (13, 5)}
PLAIN = "model.layers.1.self_attn.q_proj.weight"  # fp8 without a scale: read as float32(W)
NORM = "model.norm.weight"


def quantized(root: Path, name: str, seed: int, fp8: torch.dtype, base: dict | None = None) -> tuple[Path, dict]:
    """An fp8 model and the float64 dequantisation of each of its fp8 tensors."""
    g = torch.Generator().manual_seed(seed)
    tensors, exact = {}, {}
    for n, shape in SHAPES.items():
        w = (base[n] if base else torch.randn(shape, generator=g)) + 0.25 * torch.randn(shape, generator=g)
        q = w.to(fp8)
        s = torch.rand(math.ceil(shape[0] / BLOCK[0]), math.ceil(shape[1] / BLOCK[1]), generator=g) + 0.5
        tensors[n], tensors[n + "_scale_inv"] = q, s
        full = s.double().repeat_interleave(BLOCK[0], 0)[: shape[0]].repeat_interleave(BLOCK[1], 1)[:, : shape[1]]
        exact[n] = q.double() * full
    tensors[PLAIN] = torch.randn(6, 3, generator=g).to(fp8)
    exact[PLAIN] = tensors[PLAIN].double()
    tensors[NORM] = torch.rand(13, generator=g).to(torch.bfloat16)
    d = root / name
    d.mkdir()
    save_file(tensors, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "weight_block_size": list(BLOCK)}}))
    return d, {n: v.float() for n, v in exact.items()}


def dequantized_copy(src: Path, dst: Path, exact: dict) -> Path:
    dst.mkdir()
    tensors = {n: exact.get(n, t) for n, t in load_file(src / "model.safetensors").items()
               if not n.endswith("_scale_inv")}
    save_file(tensors, dst / "model.safetensors")
    conf = json.loads((src / "config.json").read_text())
    del conf["quantization_config"]
    (dst / "config.json").write_text(json.dumps(conf))
    return dst


@pytest.fixture(scope="module", params=[torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def fam(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"fp8-{request.param}")
    base, exact = quantized(root, "base", 1, request.param)
    ref = {n: load_file(base / "model.safetensors")[n].float() for n in SHAPES}
    out = {"base": (base, exact)}
    for i in (1, 2):
        out[f"task{i}"] = quantized(root, f"task{i}", 1 + i, request.param, ref)
    copies = {k: dequantized_copy(p, root / f"{k}-f32", e) for k, (p, e) in out.items()}
    return {k: p for k, (p, _) in out.items()}, {k: e for k, (_, e) in out.items()}, copies


def test_read_equals_float64_dequantisation(fam):
    models, exact, _ = fam
    for key, path in models.items():
        ckpt = open_model(path)
        try:
            assert not any(n.endswith("_scale_inv") for n in ckpt.names())
            for n, want in exact[key].items():
                got = ckpt.get(n)
                assert got.dtype == torch.float32 and torch.equal(got, want), n
                assert ckpt.info(n).dtype == torch.float32
            assert ckpt.get(NORM).dtype == torch.bfloat16
        finally:
            ckpt.close()


VARIANTS = {
    "slerp": ["slerp", "{task1}", "{task2}"],
    "linear": ["linear", "{task1}", "{task2}", "--weights", "1,2"],
    "task-arithmetic": ["task-arithmetic", "--base", "{base}", "{task1}", "{task2}"],
    "ties": ["ties", "--base", "{base}", "{task1}", "{task2}", "--density", "0.4"],
    "ties-global-trim": ["ties", "--base", "{base}", "{task1}", "{task2}", "--density", "0.4", "--global-trim"],
    "dare-linear": ["dare-linear", "--base", "{base}", "{task1}", "{task2}"],
    "dare-ties": ["dare-ties", "--base", "{base}", "{task1}", "{task2}"],
    "model-stock": ["model-stock", "--base", "{base}", "{task1}", "{task2}"],
    "model-stock-rows": ["model-stock", "--base", "{base}", "{task1}", "{task2}", "--filter-wise"],
    "passthrough": ["passthrough", "{task1}", "--scale", "0.5"],
    "breadcrumbs": ["breadcrumbs", "--base", "{base}", "{task1}", "{task2}"],
    "breadcrumbs-ties": ["breadcrumbs-ties", "--base", "{base}", "{task1}", "{task2}"],
    "della": ["della", "--base", "{base}", "{task1}", "{task2}"],
    "della-linear": ["della-linear", "--base", "{base}", "{task1}", "{task2}"],
    "nuslerp": ["nuslerp", "{task1}", "{task2}"],
    "multislerp": ["multislerp", "{task1}", "{task2}", "--base", "{base}"],
    "karcher": ["karcher", "{base}", "{task1}", "{task2}"],
    "sce": ["sce", "--base", "{base}", "{task1}", "{task2}"],
    "nearswap": ["nearswap", "{task1}", "{task2}", "--t", "0.5"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_method_merges_fp8_as_its_float32_dequantisation(capsys, fam, tmp_path, variant):
    models, _, copies = fam
    outs = {}
    for kind, paths in (("fp8", models), ("f32", copies)):
        argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in VARIANTS[variant]]
        code, _, err = run_cli(capsys, *argv, "-o", tmp_path / kind, "--threads", "1")
        assert code == 0 and "Traceback" not in err, err
        outs[kind] = load_file(tmp_path / kind / "model.safetensors")
    assert sorted(outs["fp8"]) == sorted(outs["f32"]) and not any(n.endswith("_scale_inv") for n in outs["fp8"])
    for n, t in outs["f32"].items():
        assert outs["fp8"][n].dtype == t.dtype and torch.equal(outs["fp8"][n], t), n
    conf = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert "quantization_config" not in conf and conf["num_hidden_layers"] == 2


def test_cores_of_fp8_models_equal_those_of_the_dequantisation(capsys, fam, tmp_path):
    models, _, copies = fam
    for kind, paths in (("fp8", models), ("f32", copies)):
        code, _, err = run_cli(capsys, "cores", "--base", paths["base"], "--model", f"a={paths['task1']}",
                               "--model", f"b={paths['task2']}", "--p", "10", "-o", tmp_path / kind, "-q")
        assert code == 0, err
    for t in ("a", "b"):
        x, y = (load_file(tmp_path / k / f"{t}.safetensors") for k in ("fp8", "f32"))
        assert sorted(x) == sorted(y) and all(torch.equal(x[n], y[n]) for n in x)


@pytest.mark.parametrize("damage,fragment", [
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(2, 2)}),
     "tensor 'model.layers.0.mlp.up_proj.weight_scale_inv' has shape [2, 2], but "
     "'model.layers.0.mlp.up_proj.weight' [10, 13] in blocks of 4×8 needs [3, 2]"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(3, 2, dtype=torch.int32)}),
     "tensor 'model.layers.0.mlp.up_proj.weight_scale_inv' is torch.int32, expected float32 scales"),
    (lambda t: t.update({PLAIN + "_scale": torch.ones(1)}), f"tensor '{PLAIN}' is fp8 with a '_scale' companion"),
], ids=["scale-shape", "scale-dtype", "other-scheme"])
def test_bad_scales_are_one_line_errors(capsys, fam, tmp_path, damage, fragment):
    models, _, _ = fam
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(models["task1"] / "model.safetensors")
    damage(tensors)
    save_file(tensors, bad / "model.safetensors")
    (bad / "config.json").write_text((models["task1"] / "config.json").read_text())
    assert_user_error(capsys, ["linear", models["base"], bad, "-o", tmp_path / "out", "-q"], fragment,
                      inputs=[bad, models["base"]])
    no_output(tmp_path)
