"""Whole merges agree across kernel backends (Triton under the interpreter vs torch) and through the
device-staging path; impossible backend/device requests fail before any output exists."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from references import load_state
from test_bad_input import assert_user_error, no_output, run_cli

from cpift.kernels.backend import HAS_TRITON

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

COMMANDS = {
    "slerp": lambda m: ["slerp", m["task1"], m["task2"], "--t", "0.3"],
    "ties": lambda m: ["ties", m["task1"], m["task2"], m["task3"], "--base", m["base"], "--density", "0.4"],
    "linear": lambda m: ["linear", m["task1"], m["task2"], "--weights", "1,3"],
    "task-arithmetic": lambda m: ["task-arithmetic", m["task1"], m["task2"], "--base", m["base"], "--lambda", "0.7"],
    "dare-ties": lambda m: ["dare-ties", m["task1"], m["task2"], "--base", m["base"], "--seed", "5"],
}


def _within_one_bf16_ulp(got: torch.Tensor, want: torch.Tensor) -> bool:
    """|got − want| ≤ one bfloat16 ulp at |want|, plus float32 slack where results cancel."""
    g, w = got.double(), want.double()
    ulp = torch.ldexp(torch.ones_like(w), torch.frexp(w).exponent - 8)  # |w| in [2^(e-1), 2^e): ulp 2^(e-8)
    slack = 1e-6 * float(w.abs().max()) if w.numel() else 0.0
    return bool(((g - w).abs() <= ulp + slack).all())


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_triton_and_torch_backends_agree_on_whole_merges(families, tmp_path, capsys, command, dtype):
    models = families[("llama", dtype)]
    outs = {}
    for backend in ("torch", "triton"):
        outs[backend] = tmp_path / backend
        code, _, err = run_cli(capsys, *COMMANDS[command](models), "-o", outs[backend], "--backend", backend, "-q")
        assert code == 0, err
    torch_state, triton_state = load_state(outs["torch"]), load_state(outs["triton"])
    assert torch_state.keys() == triton_state.keys()
    # The same float32 arithmetic in both, except sums (reductions, linear's x0 + Σ w(x − x0) form)
    # and fused multiply-adds: the bound is one bf16 ulp; bf16 outputs are mostly bit-identical.
    far = [k for k in torch_state if not _within_one_bf16_ulp(triton_state[k], torch_state[k])]
    assert not far, f"{command}: backends differ by more than one bf16 ulp in {far[:3]}"
    if dtype == torch.bfloat16:
        same = sum(torch.equal(triton_state[k], torch_state[k]) for k in torch_state)
        assert same >= len(torch_state) // 2, f"only {same} of {len(torch_state)} tensors bit-identical"


@pytest.mark.parametrize("command", ["slerp", "ties", "linear"])
def test_device_staging_path_is_byte_identical(families, tmp_path, capsys, command):
    """device="cpu+staging" runs the pinned-buffer staging loop without CUDA and must change nothing."""
    from cpift.merge import methods

    m = families[("llama", torch.bfloat16)]
    calls = {"slerp": lambda out, **kw: methods.slerp(m["task1"], m["task2"], out, t=0.3, **kw),
             "ties": lambda out, **kw: methods.ties(m["base"], [m["task1"], m["task2"]], out, density=0.4, **kw),
             "linear": lambda out, **kw: methods.linear([m["task1"], m["task2"]], out, weights=[1, 3], **kw)}
    calls[command](tmp_path / "plain", progress=False)
    calls[command](tmp_path / "staged", progress=False, device="cpu+staging")
    for f in sorted((tmp_path / "plain").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "staged" / f.name).read_bytes(), f.name


def test_cuda_without_a_gpu_is_a_one_line_error(llama, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_user_error(capsys, ["slerp", llama["task1"], llama["task2"], "-o", tmp_path / "out", "--device", "cuda"],
                      "device", "no CUDA device")
    no_output(tmp_path)
    assert_user_error(capsys, ["slerp", llama["task1"], llama["task2"], "-o", tmp_path / "out", "--device", "tpu:3"],
                      "device")
    assert_user_error(capsys, ["slerp", llama["task1"], llama["task2"], "-o", tmp_path / "out", "--backend", "cuda"],
                      "--backend")


@needs_triton
def test_triton_on_cpu_without_interpreter_is_a_one_line_error(llama, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CPIFT_BACKEND")}
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for argv, env_extra in ((["--backend", "triton"], {}), ([], {"CPIFT_BACKEND": "triton"})):
        proc = subprocess.run([sys.executable, "-m", "cpift.cli.merge_cli", "slerp", str(llama["task1"]),
                               str(llama["task2"]), "-o", str(tmp_path / "out"), *argv],
                              env={**env, **env_extra}, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "TRITON_INTERPRET=1" in proc.stderr, proc.stderr
        no_output(tmp_path)
