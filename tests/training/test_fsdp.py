"""FSDP2 (``cpift-train sft --fsdp``): frozen cores bit-identical on uneven shards and tied embeddings, masks
from two files, every other entry as one process computes it; the published model loads in transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_cli import bad_run
from training_helpers import element_mask_of, load_state, make_model, write_mask

from cpift.training.sft import sft

ARGS = dict(steps=4, lr=1e-3, weight_decay=0.1, batch_size=8, grad_accum=2, seed=5)
GATE, DOWN, EMBED = ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.down_proj.weight",
                     "model.embed_tokens.weight")


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """A tied Llama whose MLP width (37) shards unevenly over two ranks, and two mask files over it; the head
    (lm_head, the embedding's alias) is masked in one file, the embedding in the other."""
    root = tmp_path_factory.mktemp("uneven")
    model = make_model(root / "model", tied=True, intermediate=37)
    base = load_state(model)
    shape = {n: tuple(base[n].shape) for n in (GATE, DOWN, EMBED)}
    a, bits_a = write_mask(root / "a.safetensors", {GATE: shape[GATE], EMBED: shape[EMBED]}, seed=1)
    b, bits_b = write_mask(root / "b.safetensors", {"lm_head.weight": shape[EMBED], DOWN: shape[DOWN],
                                                    "model.norm.weight": (32,)}, seed=2)
    frozen = {GATE: bits_a[GATE], DOWN: bits_b[DOWN], "model.norm.weight": bits_b["model.norm.weight"],
              EMBED: bits_a[EMBED] | bits_b["lm_head.weight"]}
    frozen = {n: element_mask_of(v, "element", base[n].shape) for n, v in frozen.items()}
    return model, [a, b], frozen


def check_run(out, model, frozen, single_dir) -> None:
    """Frozen entries bit-identical to the base, every entry within 1e-6 of the single-process run."""
    base, got, one = load_state(model), load_state(out), load_state(single_dir)
    assert sorted(got) == sorted(one)
    for name, f in frozen.items():
        assert torch.equal(got[name][f], base[name][f]), name
        assert not torch.equal(got[name][~f], base[name][~f]), name
    for name in one:
        torch.testing.assert_close(got[name], one[name], rtol=0, atol=1e-6, msg=name)


def test_two_gloo_ranks_match_one_process(uneven, train_file, tmp_path):
    model, masks, frozen = uneven
    single = sft(model, train_file, tmp_path / "single", freeze=masks, progress=False, **ARGS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cpift.cli.train_cli", "sft", "--fsdp", "--model", str(model), "--train", str(train_file),
           "-o", str(tmp_path / "fsdp"), *[x for m in masks for x in ("--freeze", str(m))], "-q",
           *[f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items()]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("sft: 4 steps") == 1 and f"{single.frozen:,} entries frozen" in proc.stdout

    metrics = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert metrics["settings"]["world_size"] == 2 and metrics["settings"]["fsdp"] is True
    assert metrics["frozen_entries"] == single.frozen == sum(int(f.sum()) for f in frozen.values())
    # the clip norm counts trainable entries only, on both sides
    torch.testing.assert_close(torch.tensor(metrics["grad_norm"]), torch.tensor(single.grad_norm), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(metrics["train_loss"]), torch.tensor(single.train_loss), rtol=1e-5,
                               atol=0)
    check_run(tmp_path / "fsdp", model, frozen, tmp_path / "single")

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight.detach(), load_state(tmp_path / "fsdp")[EMBED])


def test_fsdp_without_torchrun_is_a_world_of_one(uneven, train_file, tmp_path):
    model, masks, frozen = uneven
    sft(model, train_file, tmp_path / "single", freeze=masks, progress=False, **ARGS)
    result = sft(model, train_file, tmp_path / "fsdp1", freeze=masks, fsdp=True, activation_checkpointing=True,
                 progress=False, **ARGS)
    assert result.frozen == sum(int(f.sum()) for f in frozen.values())
    assert not torch.distributed.is_initialized()  # its own one-rank group, torn down
    check_run(tmp_path / "fsdp1", model, frozen, tmp_path / "single")


def test_fsdp_refuses_a_mask_of_another_model(capsys, train_file, tmp_path):
    model = make_model(tmp_path / "m", intermediate=37)
    other, _ = write_mask(tmp_path / "other.safetensors", {GATE: (38, 32)})
    err = bad_run(capsys, model, train_file, tmp_path, "--fsdp", "--freeze", other)
    assert f"'{GATE}' has shape [38, 32]" in err and "another model" in err
