"""The fused CPU kernels in whole merges: they are the default on the CPU, their outputs are the torch
backend's bytes where the kernels are exact, and the backend that ran shows in the summary and the card."""

from __future__ import annotations

import pytest
import torch
from test_backends import COMMANDS
from test_bad_input import run_cli, shards

from cpift.kernels.backend import HAS_NUMBA

pytestmark = pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")

# slerp's reduction sums in float64 on "cpu" (float32 partials on "torch"): close, not byte-identical.
EXACT = ["ties", "linear", "task-arithmetic", "dare-ties"]


@pytest.mark.parametrize("command", EXACT)
def test_default_cpu_merge_is_the_torch_backend_byte_for_byte(families, tmp_path, capsys, monkeypatch, command):
    monkeypatch.delenv("CPIFT_BACKEND", raising=False)
    models = families[("llama", torch.bfloat16)]
    runs = {}
    for backend in (None, "torch"):
        out = tmp_path / (backend or "default")
        code, stdout, err = run_cli(capsys, *COMMANDS[command](models), "-o", out, "-q", "--threads", "1",
                                    *(["--backend", backend] if backend else []))
        assert code == 0, err
        runs[backend] = (out, stdout)
    (cpu_out, cpu_line), (torch_out, torch_line) = runs[None], runs["torch"]
    assert "GB/s of input, cpu kernels)" in cpu_line, cpu_line
    assert "GB/s of input, torch kernels)" in torch_line, torch_line
    assert [f.name for f in shards(cpu_out)] == [f.name for f in shards(torch_out)]
    for f in shards(cpu_out):
        assert f.read_bytes() == (torch_out / f.name).read_bytes(), f.name
    assert "| backend | cpu |" in (cpu_out / "README.md").read_text()
    assert "| backend | torch |" in (torch_out / "README.md").read_text()
    # The recipe replays the merge on any backend: it does not name one.
    assert (cpu_out / "cpift_recipe.yml").read_bytes() == (torch_out / "cpift_recipe.yml").read_bytes()


def test_backend_cpu_is_accepted_by_every_command(families, tmp_path, capsys):
    m = families[("llama", torch.float32)]
    code, line, err = run_cli(capsys, "slerp", m["task1"], m["task2"], "--t", "0.3", "-o", tmp_path / "s",
                              "--backend", "cpu", "-q")
    assert code == 0 and "cpu kernels" in line, err
    code, _, err = run_cli(capsys, "cores", "--base", m["base"], "--model", f"a={m['task1']}", "--p", "5",
                           "-o", tmp_path / "c", "--backend", "cpu", "-q")
    assert code == 0, err
    code, line, err = run_cli(capsys, "linear", m["task1"], m["task2"], "-o", tmp_path / "d", "--dtype", "float64",
                              "--backend", "cpu", "-q")
    assert code == 0 and "torch kernels" in line, (line, err)  # float64 math runs the torch kernels
