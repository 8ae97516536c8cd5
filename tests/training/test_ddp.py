"""Two CPU processes under torchrun (gloo, loopback only) train like one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from training_helpers import element_mask_of, load_state, write_mask

from cpift.training.sft import sft


def test_two_gloo_ranks_match_one_process(tiny, train_file, tmp_path):
    base = load_state(tiny)
    name = "model.layers.1.self_attn.o_proj.weight"
    mask, bits = write_mask(tmp_path / "m.safetensors", {name: tuple(base[name].shape)})
    args = dict(steps=4, lr=1e-3, weight_decay=0.1, batch_size=8, seed=5)
    single = sft(tiny, train_file, tmp_path / "single", freeze=[mask], progress=False, **args)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cpift.cli.train_cli", "sft", "--model", str(tiny), "--train", str(train_file),
           "-o", str(tmp_path / "ddp"), "--freeze", str(mask), "--grad-accum", "2", "-q",
           *[f"--{k.replace('_', '-')}={v}" for k, v in args.items()]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("sft: 4 steps") == 1  # rank 0 alone reports (and writes)

    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["settings"]["world_size"] == 2
    torch.testing.assert_close(torch.tensor(metrics["train_loss"]), torch.tensor(single.train_loss),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(metrics["grad_norm"]), torch.tensor(single.grad_norm), rtol=1e-5, atol=0)
    ddp, one = load_state(tmp_path / "ddp"), load_state(tmp_path / "single")
    for n in one:
        torch.testing.assert_close(ddp[n], one[n], rtol=1e-4, atol=1e-6, msg=n)
    frozen = element_mask_of(bits[name], "element", base[name].shape)
    assert torch.equal(ddp[name][frozen], base[name][frozen])
    assert not (ddp[name][~frozen] == base[name][~frozen]).all()
