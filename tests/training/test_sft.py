"""SFT on a tiny random Llama: loss falls, frozen entries stay bit-identical, runs repeat exactly."""

from __future__ import annotations

import json

import pytest
import torch
from training_helpers import element_mask_of, load_state, make_model, write_mask

from cpift.training.sft import global_batches, lr_factor, sft, split


def test_loss_decreases(tiny, train_file, tmp_path):
    r = sft(tiny, train_file, tmp_path / "out", steps=12, lr=1e-2, batch_size=8, progress=False)
    assert len(r.train_loss) == 12 and r.steps == 12
    assert sum(r.train_loss[-3:]) / 3 < 0.7 * sum(r.train_loss[:3]) / 3
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["train_loss"] == r.train_loss and len(metrics["lr"]) == 12
    assert metrics["settings"]["batch_size"] == 8 and metrics["eval"] is None
    assert not list(tmp_path.glob(".*"))  # the partial directory was renamed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_frozen_entries_bit_identical_after_adamw_with_weight_decay(tmp_path, train_file, dtype):
    base = make_model(tmp_path / "base", dtype=dtype)
    before = load_state(base)
    q = "model.layers.0.self_attn.q_proj.weight"
    up = "model.layers.1.mlp.up_proj.weight"
    norm = "model.layers.0.input_layernorm.weight"
    head = "lm_head.weight"
    m1, bits1 = write_mask(tmp_path / "a.safetensors", {q: tuple(before[q].shape), norm: tuple(before[norm].shape)})
    m2, bits2 = write_mask(tmp_path / "b.safetensors", {up: tuple(before[up].shape), head: tuple(before[head].shape)},
                           granularity="row", share=0.25, seed=1)
    r = sft(base, train_file, tmp_path / "out", steps=20, lr=1e-2, weight_decay=0.1, batch_size=4,
            freeze=[m1, m2], progress=False)
    after = load_state(tmp_path / "out")
    frozen_total = 0
    for name, bits, g in [(q, bits1[q], "element"), (norm, bits1[norm], "element"),
                          (up, bits2[up], "row"), (head, bits2[head], "row")]:
        frozen = element_mask_of(bits, g, before[name].shape)
        frozen_total += int(frozen.sum())
        assert after[name].dtype == dtype
        a, b = after[name][frozen], before[name][frozen]
        assert torch.equal(a.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           b.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), name
        moved = (after[name][~frozen] != before[name][~frozen]).float().mean().item()
        assert moved > 0.9, f"{name}: only {moved:.0%} of the trainable entries moved"
    assert r.frozen == frozen_total
    untouched = "model.layers.1.self_attn.v_proj.weight"
    assert (after[untouched] != before[untouched]).float().mean().item() > 0.9


def test_without_restore_weight_decay_would_move_frozen_entries(tmp_path, train_file, monkeypatch):
    """The restore guard is needed: with gradients masked alone, weight decay moves the frozen entries."""
    from cpift.training.freeze import Freezer

    base = make_model(tmp_path / "base")
    before = load_state(base)
    q = "model.layers.0.self_attn.q_proj.weight"
    mask, bits = write_mask(tmp_path / "a.safetensors", {q: tuple(before[q].shape)})
    monkeypatch.setattr(Freezer, "restore", lambda self: None)
    r = sft(base, train_file, tmp_path / "out", steps=5, lr=1e-2, weight_decay=0.1, batch_size=4, freeze=[mask],
            progress=False)
    frozen = element_mask_of(bits[q], "element", before[q].shape)
    after = load_state(tmp_path / "out")[q][frozen]
    decay = torch.tensor([1 - lr * 0.1 for lr in r.lr]).prod()
    assert not torch.equal(after, before[q][frozen])
    torch.testing.assert_close(after, before[q][frozen] * decay, rtol=1e-5, atol=0)  # moved by decay alone


def test_same_seed_same_weights_other_seed_differs(tiny, train_file, tmp_path):
    kw = dict(steps=6, lr=1e-2, weight_decay=0.1, batch_size=4, progress=False)
    a = sft(tiny, train_file, tmp_path / "a", seed=3, **kw)
    b = sft(tiny, train_file, tmp_path / "b", seed=3, **kw)
    c = sft(tiny, train_file, tmp_path / "c", seed=4, **kw)
    sa, sb, sc = (load_state(tmp_path / n) for n in "abc")
    assert a.train_loss == b.train_loss
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert not all(torch.equal(sa[n], sc[n]) for n in sa) and a.train_loss != c.train_loss


def test_grad_accum_gives_the_same_step(tiny, train_file, tmp_path):
    kw = dict(steps=4, lr=1e-3, batch_size=8, seed=1, progress=False)
    one = sft(tiny, train_file, tmp_path / "one", **kw)
    four = sft(tiny, train_file, tmp_path / "four", grad_accum=4, **kw)
    assert one.train_loss == pytest.approx(four.train_loss, rel=1e-5)
    s1, s4 = load_state(tmp_path / "one"), load_state(tmp_path / "four")
    for n in s1:
        torch.testing.assert_close(s4[n], s1[n], rtol=1e-4, atol=1e-6)


def test_schedule_batches_and_split():
    steps, warm = 10, 2
    f = [lr_factor(s, steps, warm) for s in range(steps)]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a >= b for a, b in zip(f[2:], f[3:])) and f[-1] > 0
    batches = global_batches(5, 3, seed=0)
    first = [next(batches) for _ in range(5)]
    flat = sum(first, [])
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))  # epoch by epoch
    again = global_batches(5, 3, seed=0)
    assert [next(again) for _ in range(5)] == first
    assert split(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]


def test_chat_model_trains_and_saves_tokenizer(tiny_chat, tmp_path):
    from training_helpers import write_jsonl
    from transformers import AutoTokenizer

    rows = [{"messages": [{"role": "user", "content": f"{i}+1"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(8)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    r = sft(tiny_chat, data, tmp_path / "out", epochs=2, lr=1e-2, batch_size=4, progress=False)
    assert r.steps == 4  # ceil(2 epochs × 8 examples / 4)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.chat_template and tok.eos_token == "<|end|>"
