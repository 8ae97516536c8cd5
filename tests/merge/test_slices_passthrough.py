"""passthrough and mergekit ``slices`` that stack layer ranges (frankenmerges, SOLAR-style depth
up-scaling): exact tensors, renumbering, num_hidden_layers, transformers loads and generates the
result, bad input is one line naming the field, and parity with mergekit where CPIFT_MERGEKIT_YAML
names a mergekit-yaml."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from references import load_state
from test_bad_input import run_cli

MERGEKIT = os.environ.get("CPIFT_MERGEKIT_YAML")
Q = "model.layers.{}.self_attn.q_proj.weight"


def _tiny(path, seed, dtype=torch.bfloat16, layers=4, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**dict(hidden_size=24, intermediate_size=37, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=53,
                         max_position_embeddings=32, tie_word_embeddings=False), **kw})
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape).to(dtype))  # non-zero, different per model and layer
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    return _tiny(root / "a", 1), _tiny(root / "b", 2)


def _yaml(tmp_path, slices, extra=""):
    lines = ["merge_method: passthrough", "slices:"]
    for model, lo, hi, params in slices:
        lines += ["  - sources:", f"      - model: {model}", f"        layer_range: [{lo}, {hi}]"]
        if params:
            lines.append(f"        parameters: {params}")
    p = tmp_path / "stack.yml"
    p.write_text("\n".join(lines) + "\n" + extra)
    return p


def _run(capsys, cfg, out):
    return run_cli(capsys, "config", cfg, "-o", out, "-q", "--threads", "1")


def _expected(slices):
    """output name → the source tensor it must equal, from the definition."""
    want, k = {}, 0
    states = {m: load_state(m) for m, *_ in slices}
    for m, lo, hi, _ in slices:
        for i in range(lo, hi):
            for n, t in states[m].items():
                pre = f"model.layers.{i}."
                if n.startswith(pre):
                    want[f"model.layers.{k}.{n[len(pre):]}"] = t
            k += 1
    first, last = states[slices[0][0]], states[slices[-1][0]]
    want["model.embed_tokens.weight"] = first["model.embed_tokens.weight"]
    for n in ("model.norm.weight", "lm_head.weight"):
        want[n] = last[n]
    return want, k


@pytest.mark.parametrize("kind", ["frankenmerge", "solar"])
def test_stack_is_the_source_layers_bit_for_bit(capsys, pair, tmp_path, kind):
    a, b = pair
    slices = ([(a, 0, 3, None), (b, 1, 4, None)] if kind == "frankenmerge"
              else [(a, 0, 3, None), (a, 1, 4, None)])  # SOLAR: one model stacked on itself, overlapping
    code, _, err = _run(capsys, _yaml(tmp_path, slices), tmp_path / "out")
    assert code == 0, err
    got = load_state(tmp_path / "out")
    want, layers = _expected(slices)
    assert layers == 6 and sorted(got) == sorted(want)
    for n in want:
        assert got[n].dtype == want[n].dtype and torch.equal(got[n].view(torch.int16), want[n].view(torch.int16)), n
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["num_hidden_layers"] == 6
    assert "passthrough" in (tmp_path / "out" / "README.md").read_text()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert ids.shape == (1, 7)


def test_scale_with_a_filter_and_the_recipe_replays(capsys, pair, tmp_path):
    a, b = pair
    params = "{scale: [{filter: o_proj, value: 0.5}, {value: 1.0}]}"
    cfg = _yaml(tmp_path, [(a, 0, 2, params), (b, 2, 4, None)], "parameters:\n  scale: 2.0\n")
    code, _, err = _run(capsys, cfg, tmp_path / "out")
    assert code == 0, err
    got = load_state(tmp_path / "out")
    sa, sb = load_state(a), load_state(b)
    o = "model.layers.{}.self_attn.o_proj.weight"
    assert torch.equal(got[o.format(0)], sa[o.format(0)] * 0.5)
    assert torch.equal(got[Q.format(1)], sa[Q.format(1)])  # the source's own default entry: 1.0
    assert torch.equal(got[Q.format(3)], sb[Q.format(3)] * 2.0)  # no source value: the top level's
    assert torch.equal(got["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])  # slice 0's
    assert torch.equal(got["lm_head.weight"], sb["lm_head.weight"] * 2.0)  # slice -1's scopes
    code, _, err = _run(capsys, tmp_path / "out" / "cpift_recipe.yml", tmp_path / "again")
    assert code == 0, err
    again = load_state(tmp_path / "again")
    assert all(torch.equal(again[n], got[n]) for n in got)


def test_passthrough_command_copies_or_scales(capsys, pair, tmp_path):
    a, _ = pair
    code, _, err = run_cli(capsys, "passthrough", a, "-o", tmp_path / "copy", "-q", "--threads", "1")
    assert code == 0, err
    src, got = load_state(a), load_state(tmp_path / "copy")
    assert all(torch.equal(got[n], src[n]) for n in src)
    code, _, err = run_cli(capsys, "passthrough", a, "--scale", "0.25", "-o", tmp_path / "half", "-q")
    assert code == 0, err
    got = load_state(tmp_path / "half")
    assert all(torch.equal(got[n], src[n] * 0.25) for n in src)


@pytest.mark.parametrize("slices,fragment", [
    ("oob", "slices[1].sources[0].layer_range: [2, 5] is outside the model's 4 layers"),
    ("empty", "slices[0].sources[0].layer_range: [2, 2] is empty or reversed"),
    ("reversed", "slices[0].sources[0].layer_range: [3, 1] is empty or reversed"),
    ("two", "slices[0].sources: passthrough takes one source per slice, got 2"),
    ("arch", "/c/config.json: architectures ['MistralForCausalLM'], but"),
    ("shape", "has shape"),
    ("param", "slices[0].parameters.weight: unknown parameter for passthrough"),
])
def test_bad_stack_is_one_line_exit_2(capsys, pair, tmp_path, slices, fragment):
    a, b = pair
    if slices == "arch":
        from transformers import Qwen2Config  # noqa: F401  (another architecture, same tensor names)

        c = tmp_path / "c"
        _tiny(c, 3)
        conf = json.loads((c / "config.json").read_text())
        conf["architectures"] = ["MistralForCausalLM"]
        (c / "config.json").write_text(json.dumps(conf))
        b = c
    if slices == "shape":
        b = _tiny(tmp_path / "wide", 4, intermediate_size=41)
    text = {"oob": [(a, 0, 2, None), (b, 2, 5, None)], "empty": [(a, 2, 2, None)],
            "reversed": [(a, 3, 1, None)], "arch": [(a, 0, 2, None), (b, 2, 4, None)],
            "shape": [(a, 0, 2, None), (b, 2, 4, None)], "two": [(a, 0, 2, None)],
            "param": [(a, 0, 2, None)]}[slices]
    capsys.readouterr()  # transformers' save progress bars
    cfg = _yaml(tmp_path, text)
    if slices == "two":
        cfg.write_text(cfg.read_text().replace("        layer_range: [0, 2]\n",
                                               f"        layer_range: [0, 2]\n      - model: {b}\n"
                                               f"        layer_range: [0, 2]\n", 1))
    if slices == "param":
        cfg.write_text(cfg.read_text() + "    parameters: {weight: 1.0}\n")
    code, out, err = _run(capsys, cfg, tmp_path / "out")
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and fragment in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not MERGEKIT, reason="CPIFT_MERGEKIT_YAML is not set to a mergekit-yaml")
@pytest.mark.parametrize("scaled", [False, True])
def test_agrees_with_mergekit_bit_for_bit(capsys, pair, tmp_path, scaled):
    a, b = pair
    params = "{scale: [{filter: mlp, value: 0.3}, {value: 1.0}]}" if scaled else None
    cfg = _yaml(tmp_path, [(a, 0, 3, params), (b, 1, 4, None), (a, 3, 4, None)])
    subprocess.run([MERGEKIT, str(cfg), str(tmp_path / "mk"), "--no-copy-tokenizer", "--quiet"],
                   check=True, capture_output=True)
    code, _, err = _run(capsys, cfg, tmp_path / "cp")
    assert code == 0, err
    mk, cp = load_state(tmp_path / "mk"), load_state(tmp_path / "cp")
    assert sorted(mk) == sorted(cp)
    for n in mk:
        assert mk[n].dtype == cp[n].dtype and torch.equal(mk[n].view(torch.int16), cp[n].view(torch.int16)), n
    for f in ("mk", "cp"):
        assert json.loads((tmp_path / f / "config.json").read_text())["num_hidden_layers"] == 7
