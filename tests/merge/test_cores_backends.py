"""`cores` and `cluster` run their kernels on the resolved backend: the default (auto) takes the fused
CPU kernels on CPU tensors, and their masks and Jaccard values equal the torch backend's byte for byte."""

from __future__ import annotations

import json

import pytest
import torch
from test_bad_input import assert_user_error, run_cli

from cpift.kernels.backend import HAS_NUMBA
from cpift.merge.io.device import check_backend


def _cores(capsys, m, out, *extra):
    code, _, err = run_cli(capsys, "cores", "--base", m["base"], "--model", f"a={m['task1']}", "--model",
                           f"b={m['task2']}", "-o", out, "-q", "--threads", "1", *extra)
    assert code == 0, err


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("p", ["1", "30"])
def test_default_backend_is_fused_and_masks_equal_torch(families, tmp_path, capsys, monkeypatch, p):
    import cpift.kernels._masks_cpu as fused_masks
    import cpift.kernels._scores_cpu as fused_scores

    assert check_backend(None, None) == "cpu"
    m = families[("llama", torch.bfloat16)]  # bf16 deltas: many exact ties at the threshold
    calls = []
    for mod, name in [(fused_scores, "score_cpu"), (fused_masks, "pack_cut_cpu"), (fused_masks, "overlap_cpu")]:
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    _cores(capsys, m, tmp_path / "auto", "--p", p)
    assert {"score_cpu", "pack_cut_cpu", "overlap_cpu"} <= set(calls)
    calls.clear()
    _cores(capsys, m, tmp_path / "torch", "--p", p, "--backend", "torch")
    assert not calls
    for name in ("a.safetensors", "b.safetensors"):
        assert (tmp_path / "auto" / name).read_bytes() == (tmp_path / "torch" / name).read_bytes(), name
    files = [tmp_path / "auto" / "a.safetensors", tmp_path / "auto" / "b.safetensors"]
    results = {}
    for be in ("cpu", "torch"):
        code, _, err = run_cli(capsys, "cluster", *files, "--json", tmp_path / f"{be}.json", "--backend", be)
        assert code == 0, err
        results[be] = json.loads((tmp_path / f"{be}.json").read_text())
    assert results["cpu"] == results["torch"]
    assert "overlap_cpu" in calls  # cluster --backend cpu: the fused popcount


def test_impossible_backend_is_a_user_error_before_output(families, tmp_path, capsys, monkeypatch):
    import cpift.kernels.backend as backend

    m = families[("llama", torch.float32)]
    monkeypatch.setattr(backend, "HAS_NUMBA", False)
    assert check_backend(None, None) == "torch"
    assert_user_error(capsys, ["cores", "--base", m["base"], "--model", f"a={m['task1']}", "-o", tmp_path / "c",
                               "--backend", "cpu"], "backend", "numba", inputs=[m["base"], m["task1"]])
    assert not (tmp_path / "c").exists()
