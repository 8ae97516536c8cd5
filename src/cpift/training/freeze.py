"""Exact freezing of core entries (docs/cpi-ft.md#final-phase): bit-identical after any number of optimizer steps.

One mechanism for every training loop (cpift's own, transformers' Trainer, TRL, a hand-written
one), as two hooks that ``freeze_cores`` attaches and ``Freezer.remove`` detaches:

1. a post-accumulate-grad hook on each parameter holding frozen entries zeroes its gradient there
   as soon as the gradient is accumulated, so before any clipping. AdamW's moments start at zero
   and mix in only gradients, so they stay exactly zero there, the Adam update is
   0 / (sqrt(0) + eps) = 0, and the frozen entries do not count in the clipping norm (the trainable
   entries get the update they would get if the frozen ones were not parameters at all).
2. an optimizer step post-hook writes the frozen values back. Decoupled weight decay,
   p ← p·(1 − lr·wd), moves every entry whatever its gradient; this undoes it bit for bit.

Storage: per parameter, the flat int64 indices of its frozen entries and their values (12 bytes
per frozen float32 entry), so both guards cost O(frozen entries), not O(parameters). Masks from
several files are united.

Distributed: under DDP every rank holds the same indices, and a gradient masked before the
all-reduce on every rank is zero after it. Under FSDP2 (``fully_shard``) a parameter is a DTensor
sharded on dim 0, its gradient and AdamW state sharded the same way: the element mask is
distributed with the parameter's own placements (uneven shards included), so each rank keeps the
indices and values of its local shard only and the freeze state shrinks with the world size. The
hooks act on ``grad.to_local()`` (FSDP2 calls post-accumulate-grad hooks on the sharded parameter
after the reduce-scatter) and on ``p.to_local()``; no communication, since frozen entries never
change. DeepSpeed ZeRO partitions gradients outside ``p.grad`` and FSDP1 flattens parameters:
both are refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from cpift.errors import ParameterError
from cpift.merge.cpi.masks import load_core_mask


def _dtensor_type():
    """torch's DTensor class, or None on a build without torch.distributed."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own shard of a DTensor (a view that writes through), or the tensor itself."""
    dtensor = _dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


class Freezer:
    """Frozen entries of a model's parameters: their flat indices in the local shard and the values to keep."""

    def __init__(self, entries: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]]):
        self.entries = entries  # (parameter, int64 flat indices into its local shard, frozen values)
        self._handles: list = []

    @property
    def frozen(self) -> int:
        """Number of frozen entries over all parameters (of this rank's shards under FSDP2)."""
        return sum(idx.numel() for _, idx, _ in self.entries)

    @property
    def nbytes(self) -> int:
        """Bytes of freeze state held on this rank (indices and values)."""
        return sum(idx.numel() * idx.element_size() + v.numel() * v.element_size() for _, idx, v in self.entries)

    @torch.no_grad()
    def mask_grad(self, p: torch.Tensor, idx: torch.Tensor) -> None:
        """Zero ``p``'s gradient on the flat local indices ``idx`` (a post-accumulate-grad hook's work)."""
        if p.grad is not None:
            local(p.grad).view(-1).index_fill_(0, idx, 0)

    def mask_grads(self) -> None:
        """Zero the gradient on every frozen entry (a hand-written loop without hooks: after backward)."""
        for p, idx, _ in self.entries:
            self.mask_grad(p, idx)

    @torch.no_grad()
    def restore(self) -> None:
        """Write the frozen values back (the optimizer step post-hook's work)."""
        for p, idx, values in self.entries:
            local(p).view(-1).index_copy_(0, idx, values)

    def attach(self, optimizer: torch.optim.Optimizer | None) -> Freezer:
        """Register the gradient hooks, and the restoring step post-hook on ``optimizer`` (its innermost
        torch optimizer when wrapped, as accelerate does); returns self. Detach with ``remove()``."""
        if self._handles:
            raise ParameterError("freeze_cores: these hooks are attached already; call remove() first")
        for p, idx, _ in self.entries:
            self._handles.append(p.register_post_accumulate_grad_hook(
                lambda param, _idx=idx: self.mask_grad(param, _idx)))
        if optimizer is not None:
            self._handles.append(_innermost(optimizer).register_step_post_hook(lambda *_: self.restore()))
        return self

    def remove(self) -> None:
        """Detach every hook ``attach`` registered (the frozen values stay as they are)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Freezer:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _innermost(optimizer):
    """The torch optimizer inside wrappers such as accelerate's AcceleratedOptimizer."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DistributedDataParallel / torch.compile wrappers (names without their prefixes)."""
    while True:
        inner = getattr(model, "module", None) if type(model).__name__ == "DistributedDataParallel" else None
        inner = inner if inner is not None else getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def check_supported(model: torch.nn.Module, optimizer=None) -> None:
    """Refuse sharding schemes whose gradients cpift's hooks cannot see (DeepSpeed ZeRO, FSDP1)."""
    opt = _innermost(optimizer) if optimizer is not None else None
    if any(hasattr(p, "ds_id") for p in model.parameters()) or \
            type(optimizer).__module__.startswith("deepspeed") or type(opt).__module__.startswith("deepspeed"):
        raise ParameterError("freeze_cores: DeepSpeed ZeRO partitions gradients outside p.grad, so frozen cores "
                             "cannot be masked there yet; use FSDP2 (accelerate fsdp_version: 2) or DDP")
    if any(getattr(p, "_is_flat_param", False) for p in model.parameters()) or \
            any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise ParameterError("freeze_cores: FSDP1 flattens parameters; shard with fully_shard "
                             "(FSDP2, accelerate fsdp_version: 2) instead")


def _local_mask(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` (a bool mask shaped like the whole parameter) cut to the rank's own shard of ``p``."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(p, dtensor):
        return full.to(p.device)
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank read the same mask file, so each slices its shard without communication
    shard = distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                              src_data_rank=None)
    return shard.to_local()


def check_masks(model: torch.nn.Module, masks: Sequence[str | os.PathLike], *,
                model_label: str | os.PathLike = "the model") -> list:
    """Load the mask files and check each fits the model (names and whole shapes); returns the CoreMasks.

    Raises:
        CheckpointError, MismatchError: as ``load_freezer``.
    """
    loaded = [load_core_mask(path) for path in masks]
    # a DTensor's shape is the global one, so a sharded model is checked like a whole one
    shapes = {name: tuple(p.shape) for name, p in unwrap(model).named_parameters(remove_duplicate=False)}
    for mask in loaded:
        mask.check_matches(shapes, model_label)
    return loaded


def load_freezer(model: torch.nn.Module, masks: Sequence[str | os.PathLike], *,
                 model_label: str | os.PathLike = "the model") -> Freezer:
    """Freeze every entry set in any of the mask files (docs/cpi-ft.md#mask-files), at the model's current values.

    Args:
        model: the model to train, on its device, in its training dtype, already sharded when FSDP2 is used.
        masks: core-mask files; an entry set in any of them is frozen.
        model_label: how error messages name the model.

    Returns:
        A Freezer holding the indices and current values of the frozen entries (hooks not attached).

    Raises:
        CheckpointError: a mask file is missing or malformed.
        MismatchError: a mask names a tensor the model lacks or gives another shape
            (the mask was made for another model).
    """
    loaded = check_masks(model, masks, model_label=model_label)
    # remove_duplicate=False: a mask may name either alias of a tied weight (lm_head / embed_tokens)
    params = dict(unwrap(model).named_parameters(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}
    for name, p in params.items():
        aliases.setdefault(id(p), []).append(name)
    entries = []
    for names in aliases.values():
        if not any(name in mask.shapes for mask in loaded for name in names):
            continue
        p = params[names[0]]
        bits = torch.zeros(p.shape, dtype=torch.bool)
        for mask in loaded:
            for name in names:
                if name in mask.shapes:
                    bits |= mask.element_mask(name)
        idx = _local_mask(p, bits).reshape(-1).nonzero().squeeze(1)
        if idx.numel():
            entries.append((p, idx, local(p).detach().reshape(-1)[idx].clone()))
    return Freezer(entries)


def freeze_cores(model: torch.nn.Module, masks: Sequence[str | os.PathLike],
                 optimizer: torch.optim.Optimizer | None, *,
                 model_label: str | os.PathLike = "the model") -> Freezer:
    """Keep every entry set in any of the core-mask files bit-identical through training, by hooks.

    Attach after the model is wrapped or sharded (DDP, ``fully_shard``) and the optimizer built,
    before the first backward; the values kept are the ones the model holds now.

    Args:
        model: the model (plain, DDP-wrapped or FSDP2-sharded).
        masks: core-mask files; an entry set in any of them is frozen.
        optimizer: the optimizer that steps the model; its step post-hook restores the frozen values.
            None: gradients are masked only (call ``restore()`` after each step yourself).
        model_label: how error messages name the model.

    Returns:
        The Freezer, hooks attached; ``remove()`` (or leaving a ``with`` block) detaches them.

    Raises:
        ParameterError: DeepSpeed ZeRO or FSDP1, which cpift cannot mask.
        CheckpointError, MismatchError: a mask file is malformed or made for another model.

    Example:
        >>> handle = freeze_cores(model, ["cores/math.safetensors"], optimizer)
    """
    check_supported(model, optimizer)
    return load_freezer(model, masks, model_label=model_label).attach(optimizer)
