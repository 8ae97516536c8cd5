"""Freezer: AdamW moments stay exactly zero on frozen entries, values bit-identical; masks must fit the model."""

from __future__ import annotations

import pytest
import torch
from training_helpers import load_state, make_model, write_mask

from cpift.errors import MismatchError
from cpift.training.freeze import Freezer, load_freezer
from cpift.training.sft import sft


class Tiny(torch.nn.Module):
    def __init__(self, tied: bool = False):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.proj = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(torch.tanh(self.proj(self.embed(x))))


def test_moments_stay_zero_and_values_bit_identical(tmp_path):
    model = Tiny()
    shapes = {"proj.weight": (6, 6), "proj.bias": (6,), "head.weight": (11, 6)}
    mask, bits = write_mask(tmp_path / "m.safetensors", shapes, share=0.4)
    freezer = load_freezer(model, [mask])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randint(0, 11, (4, 5))
    for _ in range(20):
        loss = model(x).logsumexp(-1).mean()
        loss.backward()
        freezer.mask_grads()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        freezer.restore()
    params = dict(model.named_parameters())
    for name, b in bits.items():
        frozen = b.reshape(shapes[name])
        p = params[name]
        assert torch.equal(p.detach()[frozen], before[name][frozen])
        assert (p.detach()[~frozen] != before[name][~frozen]).all()
        state = opt.state[p]
        assert torch.count_nonzero(state["exp_avg"][frozen]) == 0
        assert torch.count_nonzero(state["exp_avg_sq"][frozen]) == 0
    assert freezer.frozen == sum(int(b.sum()) for b in bits.values())


def test_tied_weights_either_alias_and_several_masks_unite(tmp_path):
    model = Tiny(tied=True)
    a, bits_a = write_mask(tmp_path / "a.safetensors", {"embed.weight": (11, 6)}, share=0.3, seed=1)
    b, bits_b = write_mask(tmp_path / "b.safetensors", {"head.weight": (11, 6)}, share=0.3, seed=2)
    freezer = load_freezer(model, [a, b])
    assert len(freezer.entries) == 1  # one parameter behind both names
    p, idx, values = freezer.entries[0]
    assert p is model.embed.weight
    assert idx.tolist() == (bits_a["embed.weight"] | bits_b["head.weight"]).nonzero().squeeze(1).tolist()
    assert torch.equal(values, p.detach().view(-1)[idx])


def test_mask_for_another_model_is_refused(tmp_path):
    model = Tiny()
    wrong_shape, _ = write_mask(tmp_path / "a.safetensors", {"proj.weight": (7, 6)})
    with pytest.raises(MismatchError, match="'proj.weight' has shape \\[7, 6\\].*another model"):
        load_freezer(model, [wrong_shape], model_label="tiny")
    wrong_name, _ = write_mask(tmp_path / "b.safetensors", {"model.layers.9.mlp.weight": (6, 6)})
    with pytest.raises(MismatchError, match="'model.layers.9.mlp.weight' is not in tiny"):
        load_freezer(model, [wrong_name], model_label="tiny")


def test_sft_guards_every_step(tmp_path, train_file, monkeypatch):
    """sft attaches freeze_cores' hooks: each micro-batch's gradient masked as it accumulates, one restore per step."""
    base = make_model(tmp_path / "base")
    shape = tuple(load_state(base)["lm_head.weight"].shape)
    mask, _ = write_mask(tmp_path / "m.safetensors", {"lm_head.weight": shape}, share=0.1)
    calls = []
    original_mask, original_restore = Freezer.mask_grad, Freezer.restore
    monkeypatch.setattr(Freezer, "mask_grad", lambda self, p, idx: (calls.append("mask_grad"),
                                                                      original_mask(self, p, idx))[1])
    monkeypatch.setattr(Freezer, "restore", lambda self: (calls.append("restore"), original_restore(self))[1])
    sft(base, train_file, tmp_path / "out", steps=3, batch_size=8, grad_accum=2, freeze=[mask], progress=False)
    assert calls == ["mask_grad", "mask_grad", "restore"] * 3
