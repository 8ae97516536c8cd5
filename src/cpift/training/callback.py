"""Frozen cores in transformers' ``Trainer`` and TRL's ``SFTTrainer``: one callback, no subclass.

    trainer = SFTTrainer(model=model, args=args, train_dataset=data,
                         callbacks=[CoreFreezeCallback(["cores/math.safetensors"])])

At ``on_train_begin`` the model is prepared (wrapped in DDP, or sharded in place by accelerate's
FSDP2) and the optimizer built, so ``freeze_cores`` attaches its hooks there. The Trainer clips
gradients before ``on_pre_optimizer_step``, too late for a callback to mask them; the
post-accumulate-grad hook masks each gradient as soon as it is accumulated, so the clip norm (and
the logged ``grad_norm``) counts the trainable entries alone. The step post-hook sits on the torch
optimizer inside accelerate's wrapper and restores the frozen values after every step. DeepSpeed
ZeRO partitions gradients outside ``p.grad`` and is refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from transformers import TrainerCallback

from cpift.errors import ParameterError

from .freeze import Freezer, freeze_cores


class CoreFreezeCallback(TrainerCallback):
    """Keep every entry set in any of the core-mask files bit-identical through a Trainer's training.

    Args:
        masks: core-mask files (``cpift-merge cores`` output); an entry set in any of them is frozen.
        model_label: how error messages name the model.

    Raises (at ``trainer.train()``):
        ParameterError: DeepSpeed is enabled, or the run uses FSDP1.
        CheckpointError, MismatchError: a mask file is malformed or made for another model.

    Example:
        >>> trainer.add_callback(CoreFreezeCallback(["cores/math.safetensors"]))
    """

    def __init__(self, masks: Sequence[str | os.PathLike], *, model_label: str | os.PathLike = "the model"):
        self.masks = list(masks)
        self.model_label = model_label
        self.freezer: Freezer | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None):
            raise ParameterError("CoreFreezeCallback: DeepSpeed ZeRO partitions gradients outside p.grad, so frozen "
                                 "cores cannot be masked there yet; use FSDP2 (accelerate fsdp_version: 2) or DDP")
        if self.freezer is not None:  # a second train() call: the values to keep are the ones of now
            self.freezer.remove()
        self.freezer = freeze_cores(model, self.masks, optimizer, model_label=self.model_label)

    def on_train_end(self, args, state, control, **kwargs):
        if self.freezer is not None:
            self.freezer.remove()
            self.freezer = None
