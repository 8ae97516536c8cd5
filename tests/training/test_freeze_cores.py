"""freeze_cores: hooks that keep frozen entries bit-identical in a plain loop and out of the clip norm; detachable;
ZeRO refused; exported from cpift.training without importing torch."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from test_freeze import Tiny
from training_helpers import write_mask

from cpift.errors import ParameterError
from cpift.training import freeze_cores

SHAPES = {"proj.weight": (6, 6), "proj.bias": (6,), "head.weight": (11, 6)}


def step(model, x) -> None:
    model(x).logsumexp(-1).mean().backward()


def test_hooks_alone_keep_entries_bit_identical_and_out_of_the_clip_norm(tmp_path):
    model = Tiny()
    twin = copy.deepcopy(model)
    mask, bits = write_mask(tmp_path / "m.safetensors", SHAPES, share=0.4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    handle = freeze_cores(model, [mask], opt)
    x = torch.randint(0, 11, (4, 5))
    # the first step's clip norm: the twin's full gradient, frozen entries left out by hand, in float64
    step(twin, x)
    frozen = {n: b.reshape(SHAPES[n]) for n, b in bits.items()}
    kept = [p.grad.double()[~frozen[n]] if n in frozen else p.grad.double().flatten()
            for n, p in twin.named_parameters()]
    expected = float(torch.cat(kept).norm())
    full = float(torch.cat([p.grad.double().flatten() for p in twin.parameters()]).norm())
    norms = []
    for _ in range(20):
        step(model, x)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
        opt.step()
        opt.zero_grad()
    assert norms[0] == pytest.approx(expected, rel=1e-6) and abs(full - expected) > 1e-3
    params = dict(model.named_parameters())
    for name, f in frozen.items():
        p = params[name].detach()
        assert torch.equal(p[f], before[name][f])
        assert (p[~f] != before[name][~f]).all()
        assert torch.count_nonzero(opt.state[params[name]]["exp_avg"][f]) == 0
        assert torch.count_nonzero(opt.state[params[name]]["exp_avg_sq"][f]) == 0
    assert handle.frozen == sum(int(b.sum()) for b in bits.values())
    assert handle.nbytes == handle.frozen * (8 + 4)  # int64 index + float32 value per entry

    handle.remove()  # detached: frozen entries move again
    step(model, x)
    opt.step()
    name = "head.weight"
    assert not torch.equal(params[name].detach()[frozen[name]], before[name][frozen[name]])


def test_wrapped_optimizer_gets_the_hook_on_its_inner_torch_optimizer(tmp_path):
    model = Tiny()
    mask, bits = write_mask(tmp_path / "m.safetensors", {"head.weight": (11, 6)}, share=0.5)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    wrapper = type("AcceleratedOptimizer", (), {"optimizer": inner})()  # as accelerate wraps it
    before = model.head.weight.detach().clone()
    with freeze_cores(model, [mask], wrapper):
        step(model, torch.randint(0, 11, (2, 3)))
        inner.step()
    f = bits["head.weight"].reshape(11, 6)
    assert torch.equal(model.head.weight.detach()[f], before[f])


def test_deepspeed_zero_is_refused(tmp_path):
    model = Tiny()
    model.proj.weight.ds_id = 3  # how ZeRO-3 marks its partitioned parameters
    mask, _ = write_mask(tmp_path / "m.safetensors", {"proj.weight": (6, 6)})
    with pytest.raises(ParameterError, match="DeepSpeed ZeRO partitions gradients outside p.grad"):
        freeze_cores(model, [mask], torch.optim.AdamW(model.parameters()))


def test_package_import_stays_light():
    code = ("import sys, cpift.training; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules)); "
            "print(sorted(cpift.training.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "['CoreFreezeCallback', 'Freezer', 'freeze_cores']"]
