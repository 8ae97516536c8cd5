"""Every step iterates the one stream (merge/io/stream.py), so cores, cluster and --global-trim take
--device and --backend: the Triton kernels run there (under TRITON_INTERPRET=1 on the CPU) and agree
with the torch backend bit for bit; impossible devices or backends are one-line errors (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_bad_input import assert_user_error, digest, no_output, run_cli

import cpift.kernels._masks_triton as masks_triton
import cpift.kernels._scores_triton as scores_triton
from cpift.kernels.backend import HAS_TRITON
from cpift.merge.cpi.cluster import cluster_masks
from cpift.merge.cpi.cores import compute_cores
from cpift.merge.io.models import open_models
from cpift.merge.io.stream import TensorStream
from cpift.merge.methods.global_trim import global_magnitude_cuts

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


@pytest.fixture
def triton_calls(monkeypatch) -> dict[str, int]:
    """Counts the launches of the Triton scoring and packing/popcount kernels."""
    calls = {"score": 0, "pack_cut": 0, "overlap": 0}
    for module, name, key in ((scores_triton, "score_triton", "score"), (masks_triton, "pack_cut_triton", "pack_cut"),
                              (masks_triton, "overlap_triton", "overlap")):
        real = getattr(module, name)

        def counted(*a, _real=real, _key=key, **kw):
            calls[_key] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(module, name, counted)
    return calls


def _cores(llama, out, **kw):
    return compute_cores(llama["base"], [("a", llama["task1"]), ("b", llama["task2"])], out, p=3.0,
                         progress=False, **kw)


def _mask_bytes(out) -> dict[str, bytes]:
    from safetensors.torch import load_file

    return {f.name: b"".join(t.numpy().tobytes() for _, t in sorted(load_file(f).items()))
            for f in sorted(out.glob("*.safetensors"))}


def test_stream_yields_every_tensor_in_order_with_staged_inputs(llama):
    models = open_models([llama["base"], llama["task1"]])
    names = sorted(models[0].names())[:5]
    for device in (None, torch.device("cpu")):  # cpu: the pinned-buffer staging loop without CUDA
        with TensorStream(models, names, device=device) as stream:
            seen = []
            for item in stream:
                seen.append(item.name)
                assert item.nbytes == sum(m.info(item.name).nbytes for m in models)
                for x, v, m in zip(item.inputs, item.views, models):
                    assert torch.equal(x, m.get(item.name).reshape(-1)) and torch.equal(v, x)
                    assert (x is v) == (device is None)
        assert seen == names


@needs_triton
def test_cores_and_cluster_run_the_triton_kernels_bit_identical_to_torch(llama, tmp_path, triton_calls):
    ref = _cores(llama, tmp_path / "torch", backend="torch")
    assert triton_calls["score"] == triton_calls["pack_cut"] == 0
    got = _cores(llama, tmp_path / "triton", backend="triton", device="cpu+staging")
    assert triton_calls["score"] > 0 and triton_calls["pack_cut"] > 0
    assert [(t.k, t.threshold, t.counts) for t in got.tasks] == [(t.k, t.threshold, t.counts) for t in ref.tasks]
    assert _mask_bytes(tmp_path / "triton") == _mask_bytes(tmp_path / "torch")

    masks = [tmp_path / "torch" / "a.safetensors", tmp_path / "torch" / "b.safetensors"]
    before = triton_calls["overlap"]  # the triton cores counted each mask's bits with it
    want = cluster_masks(masks, backend="torch")
    assert triton_calls["overlap"] == before
    have = cluster_masks(masks, backend="triton", device="cpu+staging")
    assert triton_calls["overlap"] > before
    assert have.jaccard == want.jaccard and have.groups == want.groups


@needs_triton
@pytest.mark.parametrize("densities", [[0.3, 0.05], [1.0, 0.5]], ids=["partial", "all-and-half"])
def test_global_trim_selection_runs_the_triton_kernels_bit_identical_to_torch(llama, triton_calls, densities):
    models = open_models([llama["base"], llama["task1"], llama["task2"]])
    want = global_magnitude_cuts(models[0], models[1:], densities, backend="torch")
    assert triton_calls["score"] == 0
    have = global_magnitude_cuts(models[0], models[1:], densities, backend="triton", device=torch.device("cpu"))
    assert triton_calls["score"] > 0
    assert have == want


@no_gpu
@pytest.mark.parametrize("command", ["cores", "cluster", "ties"])
def test_device_cuda_without_a_gpu_is_a_one_line_error(llama, tmp_path, capsys, command):
    _cores(llama, tmp_path / "masks", backend="torch")
    masks = [tmp_path / "masks" / "a.safetensors", tmp_path / "masks" / "b.safetensors"]
    argv = {"cores": ["cores", "--base", llama["base"], "--model", f"a={llama['task1']}", "-o", tmp_path / "out"],
            "cluster": ["cluster", *masks],
            "ties": ["ties", "--base", llama["base"], llama["task1"], "--global-trim", "--density", "0.3",
                     "-o", tmp_path / "out"]}[command]
    assert_user_error(capsys, [*argv, "--device", "cuda"], "device", "no CUDA device",
                      inputs=[llama["base"], tmp_path / "masks"])
    no_output(tmp_path)


@needs_triton
@no_gpu
@pytest.mark.parametrize("command", ["cores", "cluster"])
def test_backend_triton_on_cpu_without_interpreter_is_a_one_line_error(llama, tmp_path, command):
    _cores(llama, tmp_path / "masks", backend="torch")
    before = digest(tmp_path / "masks")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CPIFT_BACKEND")}
    argv = {"cores": ["cores", "--base", str(llama["base"]), "--model", f"a={llama['task1']}",
                      "-o", str(tmp_path / "out")],
            "cluster": ["cluster", str(tmp_path / "masks" / "a.safetensors"),
                        str(tmp_path / "masks" / "b.safetensors")]}
    proc = subprocess.run([sys.executable, "-m", "cpift.cli.merge_cli", *argv[command], "--backend", "triton"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "TRITON_INTERPRET=1" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    no_output(tmp_path)
    assert digest(tmp_path / "masks") == before


def test_cores_recipe_passes_device_and_backend_and_refuses_what_does_not_apply(llama, tmp_path, capsys):
    _cores(llama, tmp_path / "masks", backend="torch")
    recipe = tmp_path / "masks" / "cpift_recipe.yml"
    for flag in (["--dry-run"], ["--resume"], ["--allow-nonfinite"], ["--dtype", "float32"], ["--seed", "3"]):
        assert_user_error(capsys, ["config", recipe, "-o", tmp_path / "out", *flag], flag[0],
                          inputs=[tmp_path / "masks"])
        no_output(tmp_path)
    code, _, err = run_cli(capsys, "config", recipe, "-o", tmp_path / "out", "--device", "cpu+staging",
                           "--backend", "torch", "--threads", "1", "-q")
    assert code == 0, err
    assert _mask_bytes(tmp_path / "out") == _mask_bytes(tmp_path / "masks")
