"""A ``BASE+ADAPTER`` model reference is applied wherever it appears, the
passthrough stack's ``slices:`` and the slices merged by a method included, exactly as the ``models:``
form applies it: the same bytes, and a card and recipe that name the adapter (the recipe replays to the
same bytes)."""

from __future__ import annotations

import pytest
import torch
import yaml
from references import load_state
from test_bad_input import run_cli
from test_lora_inputs import make_adapter
from test_slices_passthrough import _tiny

Q = "model.layers.{}.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-refs")
    base = _tiny(root / "base", 1, dtype=torch.float32)
    other = _tiny(root / "other", 2, dtype=torch.float32)
    return base, other, make_adapter(root / "adapter", base)


def _run(capsys, tmp_path, name, text):
    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(text)
    capsys.readouterr()
    code, _, err = run_cli(capsys, "config", cfg, "-o", tmp_path / name, "-q", "--threads", "1")
    assert code == 0, err
    return tmp_path / name


def _same(a, b):
    sa, sb = load_state(a), load_state(b)
    assert sorted(sa) == sorted(sb)
    for n in sa:
        assert sa[n].dtype == sb[n].dtype and torch.equal(sa[n], sb[n]), n


def test_stack_applies_the_adapter_as_the_models_form(capsys, lora, tmp_path):
    base, _, adapter = lora
    ref = f"{base}+{adapter}"
    models = _run(capsys, tmp_path, "models", f"merge_method: passthrough\nmodels:\n  - model: {ref}\n")
    stack = _run(capsys, tmp_path, "stack", "merge_method: passthrough\nslices:\n"
                 f"  - sources: [{{model: {ref}, layer_range: [0, 2]}}]\n"
                 f"  - sources: [{{model: {ref}, layer_range: [2, 4]}}]\n")
    _same(stack, models)
    assert not torch.equal(load_state(stack)[Q.format(1)], load_state(base)[Q.format(1)])  # the adapter counts
    card = (stack / "README.md").read_text()
    rows = [r for r in card.splitlines() if r.startswith("| model | `")]
    assert len(rows) == 1 and rows[0].endswith(" |") and "/base+" in rows[0] and "/adapter`" in rows[0], card
    recipe = yaml.safe_load((stack / "cpift_recipe.yml").read_text())
    assert all("+" in s["sources"][0]["model"] for s in recipe["slices"])
    code, _, err = run_cli(capsys, "config", stack / "cpift_recipe.yml", "-o", tmp_path / "again", "-q")
    assert code == 0, err
    _same(tmp_path / "again", stack)


def test_stack_mixing_base_and_base_plus_adapter(capsys, lora, tmp_path):
    base, _, adapter = lora
    ref = f"{base}+{adapter}"
    plain = _run(capsys, tmp_path, "plain", f"merge_method: passthrough\nmodels:\n  - model: {base}\n")
    adapted = _run(capsys, tmp_path, "adapted", f"merge_method: passthrough\nmodels:\n  - model: {ref}\n")
    mixed = _run(capsys, tmp_path, "mixed", "merge_method: passthrough\nslices:\n"
                 f"  - sources: [{{model: {base}, layer_range: [0, 2]}}]\n"
                 f"  - sources: [{{model: {ref}, layer_range: [2, 4]}}]\n")
    m, p, a = load_state(mixed), load_state(plain), load_state(adapted)
    for n in m:
        layer = next((i for i in range(4) if f".layers.{i}." in n), None)
        from_adapted = layer in (2, 3) or (layer is None and "embed" not in n)  # post-layer: the last slice's
        assert torch.equal(m[n], (a if from_adapted else p)[n]), n
    assert any(not torch.equal(a[n], p[n]) for n in a if ".layers.2." in n)
    rows = [r for r in (mixed / "README.md").read_text().splitlines() if r.startswith("| model | `")]
    assert len(rows) == 2 and "+" not in rows[0] and "/adapter`" in rows[1], rows


def test_slices_merged_by_a_method_apply_the_adapter(capsys, lora, tmp_path):
    base, other, adapter = lora
    ref = f"{base}+{adapter}"
    models = _run(capsys, tmp_path, "models", "merge_method: linear\nparameters: {weight: [1.0, 3.0]}\n"
                  f"models:\n  - model: {ref}\n  - model: {other}\n")
    sliced = _run(capsys, tmp_path, "sliced", "merge_method: linear\nparameters: {weight: [1.0, 3.0]}\nslices:\n"
                  f"  - sources: [{{model: {ref}, layer_range: [0, 4]}}, {{model: {other}, layer_range: [0, 4]}}]\n")
    _same(sliced, models)
    split = _run(capsys, tmp_path, "split", "merge_method: linear\nparameters: {weight: [1.0, 3.0]}\nslices:\n"
                 f"  - sources: [{{model: {ref}, layer_range: [0, 2]}}, {{model: {other}, layer_range: [0, 2]}}]\n"
                 f"  - sources: [{{model: {ref}, layer_range: [2, 4]}}, {{model: {other}, layer_range: [2, 4]}}]\n")
    _same(split, models)
