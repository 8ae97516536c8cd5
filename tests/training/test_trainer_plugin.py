"""CoreFreezeCallback in transformers' Trainer and TRL's SFTTrainer: frozen entries bit-identical, AdamW moments
zero there, and the logged grad_norm is the norm of the trainable entries' gradients alone."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from training_helpers import arithmetic_rows, element_mask_of, load_state, make_tokenizer, write_jsonl, write_mask

from cpift.errors import ParameterError
from cpift.training import CoreFreezeCallback

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install 'cpift[trl]')")

NAMES = ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight")


class RawGradNorms(transformers.TrainerCallback):
    """Hooks registered before CoreFreezeCallback's (so they run first): each step's full gradient norm, and
    the norm over the entries the masks leave trainable."""

    def __init__(self, frozen: dict[str, torch.Tensor]):
        self.frozen, self.full, self.trainable, self._sq = frozen, [], [], [0.0, 0.0]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(lambda p, n=name: self._record(n, p.grad))

    def _record(self, name, grad):
        g = grad.detach().double()
        self._sq[0] += float((g ** 2).sum())
        keep = ~self.frozen[name] if name in self.frozen else torch.ones_like(g, dtype=torch.bool)
        self._sq[1] += float((g[keep] ** 2).sum())

    def on_step_end(self, args, state, control, **kwargs):
        self.full.append(math.sqrt(self._sq[0]))
        self.trainable.append(math.sqrt(self._sq[1]))
        self._sq = [0.0, 0.0]


@pytest.fixture
def setup(tiny, tmp_path):
    base = load_state(tiny)
    a, bits_a = write_mask(tmp_path / "a.safetensors", {n: tuple(base[n].shape) for n in NAMES[:2]}, seed=1)
    b, bits_b = write_mask(tmp_path / "b.safetensors", {NAMES[2]: tuple(base[NAMES[2]].shape)}, seed=2)
    bits = {**bits_a, **bits_b}
    frozen = {n: element_mask_of(bits[n], "element", base[n].shape) for n in NAMES}
    tok = make_tokenizer()
    rows = [tok(r["prompt"] + r["response"] + tok.eos_token)["input_ids"] for r in arithmetic_rows(24)]
    return base, [a, b], frozen, tok, rows


def train_args(tmp_path, **extra):
    return transformers.TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=4, learning_rate=1e-3,
                                          weight_decay=0.1, per_device_train_batch_size=4, max_grad_norm=0.5,
                                          logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                          lr_scheduler_type="constant", seed=0, **extra)


def check(trainer, recorder, base, frozen) -> None:
    params = dict(trainer.model.named_parameters())
    for name, f in frozen.items():
        p = params[name].detach()
        assert torch.equal(p[f], base[name][f]), name
        assert not torch.equal(p[~f], base[name][~f]), name
        state = trainer.optimizer.state[params[name]]
        assert torch.count_nonzero(state["exp_avg"][f]) == 0 and torch.count_nonzero(state["exp_avg_sq"][f]) == 0
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(logged) == len(recorder.trainable) == 4
    for got, trainable, full in zip(logged, recorder.trainable, recorder.full):
        assert got == pytest.approx(trainable, rel=1e-5)
        assert abs(full - trainable) > 1e-3 * full  # the frozen entries would have counted


def test_trainer_with_the_callback(setup, tiny, tmp_path):
    base, masks, frozen, tok, rows = setup
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny)
    data = [{"input_ids": r, "labels": r} for r in rows]
    recorder = RawGradNorms(frozen)
    collator = transformers.DataCollatorForSeq2Seq(tok, padding=True)
    trainer = transformers.Trainer(model=model, args=train_args(tmp_path), train_dataset=data,
                                   data_collator=collator, callbacks=[recorder, CoreFreezeCallback(masks)])
    trainer.train()
    check(trainer, recorder, base, frozen)
    # detached at the end of training: the recorder's hook is the only one left
    params = dict(model.named_parameters())
    assert all(len(params[n]._post_accumulate_grad_hooks) == 1 for n in NAMES)


def test_sft_trainer_with_the_callback(setup, tiny, tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is optional (pip install 'cpift[trl]')")
    datasets = pytest.importorskip("datasets")
    base, masks, frozen, tok, _ = setup
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny)
    data = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["response"]}
                                       for r in arithmetic_rows(24)])
    recorder = RawGradNorms(frozen)
    config = trl.SFTConfig(**train_args(tmp_path).to_dict() | {"output_dir": str(tmp_path / "sft"),
                                                                 "max_length": 32})
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok,
                             callbacks=[recorder, CoreFreezeCallback(masks)])
    trainer.train()
    check(trainer, recorder, base, frozen)


def test_deepspeed_is_refused(tiny):
    callback = CoreFreezeCallback([])
    with pytest.raises(ParameterError, match="DeepSpeed ZeRO partitions gradients"):
        callback.on_train_begin(SimpleNamespace(deepspeed="ds_zero3.json"), None, None, model=torch.nn.Linear(2, 2))


def test_example_script_runs(setup, tiny, tmp_path):
    """examples/sft_frozen_cores.py as a user runs it (one process on the CPU)."""
    pytest.importorskip("trl", reason="TRL is optional (pip install 'cpift[trl]')")
    base, masks, frozen, _, _ = setup
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(16))
    script = Path(__file__).resolve().parents[2] / "examples" / "sft_frozen_cores.py"
    cmd = [sys.executable, str(script), "--model", str(tiny), "--train", str(data), "--out", str(tmp_path / "out"),
           "--steps", "2", *[x for m in masks for x in ("--mask", str(m))]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_state(tmp_path / "out")
    for name, f in frozen.items():
        assert torch.equal(got[name][f], base[name][f]), name
        assert not torch.equal(got[name][~f], base[name][~f]), name
