"""Exact updates: a bf16-saved probe rounds a small-lr update to zero where its float32 save keeps it, ``cores``
reports the zero share and warns; the pipeline keeps intermediate models in float32, the final one in the base's
dtype."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from training_helpers import arithmetic_rows, load_state, make_model, write_jsonl

from cpift.cli.merge_cli import main as merge_main
from cpift.merge.cpi.cores import compute_cores
from cpift.training.pipeline import run_pipeline
from cpift.training.sft import sft

ARGS = dict(steps=3, lr=1e-5, batch_size=8, seed=0, warmup=0.0, progress=False)


def dtypes(model) -> set[str]:
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        return {f.get_slice(n).get_dtype() for n in f.keys()}  # header names: F32, BF16


@pytest.fixture(scope="module")
def probes(tmp_path_factory, train_file):
    root = tmp_path_factory.mktemp("exact")
    base = make_model(root / "base", dtype=torch.bfloat16)
    for dtype in ("auto", "float32"):
        sft(base, train_file, root / dtype, save_dtype=dtype, **ARGS)
    return root


def test_bf16_save_rounds_the_update_away(probes):
    base = {n: t.float() for n, t in load_state(probes / "base").items()}
    rounded, exact = load_state(probes / "auto"), load_state(probes / "float32")
    assert {t.dtype for t in rounded.values()} == {torch.bfloat16}
    assert {t.dtype for t in exact.values()} == {torch.float32}
    assert json.loads((probes / "float32" / "metrics.json").read_text())["settings"]["saved_dtype"] == "float32"
    lost = zeros_r = zeros_e = total = 0
    for n, b in base.items():
        dr, de = rounded[n].float() - b, exact[n] - b
        lost += int(((dr == 0) & (de != 0)).sum())
        assert not bool(((de == 0) & (dr != 0)).any()), n  # the rounding can only lose updates
        zeros_r, zeros_e, total = zeros_r + int((dr == 0).sum()), zeros_e + int((de == 0).sum()), total + b.numel()
        # the bf16 save is the float32 one rounded (round to nearest even), bit for bit
        assert torch.equal(rounded[n], exact[n].to(torch.bfloat16)), n
    assert lost > 0 and zeros_r / total > 0.5 > zeros_e / total


def test_cores_reports_the_zero_share_and_warns(probes, tmp_path, capsys):
    result = compute_cores(probes / "base", [("rounded", probes / "auto"), ("exact", probes / "float32")],
                           tmp_path / "cores", p=1, progress=False, backend="torch")
    rounded, exact = result.tasks
    base, r, e = load_state(probes / "base"), load_state(probes / "auto"), load_state(probes / "float32")
    assert rounded.zero_share == sum(int((r[n] == base[n]).sum()) for n in base) / result.elements
    assert exact.zero_share == sum(int((e[n] == base[n].float()).sum()) for n in base) / result.elements
    assert rounded.zero_share > 0.5 > exact.zero_share
    assert "zero Δ" in result.table()
    [warning] = result.warnings()
    assert str(probes / "auto") in warning and "(task rounded)" in warning and "--save-dtype float32" in warning

    with pytest.raises(SystemExit) as exc:
        merge_main(["cores", "--base", str(probes / "base"), "--model", f"r={probes / 'auto'}", "--model",
                    f"e={probes / 'float32'}", "--p", "1", "-o", str(tmp_path / "cli"), "--backend", "torch", "-q"])
    err = capsys.readouterr().err
    assert exc.value.code == 0
    assert err.count("warning: ") == 1 and err.startswith(f"warning: {probes / 'auto'} (task r): ")


def test_pipeline_keeps_intermediates_in_float32(tmp_path):
    make_model(tmp_path / "base", dtype=torch.bfloat16)
    for i, task in enumerate(("a", "b")):
        write_jsonl(tmp_path / f"{task}.jsonl", arithmetic_rows(8, seed=i))
        write_jsonl(tmp_path / f"{task}-eval.jsonl", arithmetic_rows(2, seed=10 + i))
    (tmp_path / "recipe.yml").write_text(
        "base: base\ntasks:\n  - {name: a, train: a.jsonl, eval: a-eval.jsonl}\n"
        "  - {name: b, train: b.jsonl, eval: b-eval.jsonl}\n"
        "probe: {steps: 1, lr: 1e-5, batch_size: 4}\np: 5\ntau: 1.0\n"
        "train: {steps_per_task: 1, lr: 1e-5, batch_size: 4}\n"
        "calibration: {examples: 4, steps_per_task: 1, lr: 1e-5, batch_size: 4}\n"
        "eval: {batch_size: 2, max_length: 16}\n")
    lines = []
    run_pipeline(tmp_path / "recipe.yml", tmp_path / "wd", log=lines.append)
    wd = tmp_path / "wd"
    for model in ("probes/a", "probes/b", "stages/1", "stages/2", "fused", "calibrated/1"):
        assert dtypes(wd / model) == {"F32"}, model
    assert dtypes(wd / "calibrated/2") == {"BF16"}  # the final model, in the base's dtype
    assert not any(line.startswith("warning:") for line in lines)  # exact probes: no rounding warning
