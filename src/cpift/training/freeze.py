"""Exact freezing of core entries (DESIGN §1.5): bit-identical after any number of optimizer steps.

Two guards, applied around every optimizer step:

1. ``mask_grads`` (after backward, before clipping and the step) zeroes the gradient on frozen
   entries. AdamW's moments start at zero and mix in only gradients, so they stay exactly zero
   there, the Adam update is 0 / (sqrt(0) + eps) = 0, and the frozen entries do not count in the
   clipping norm (the trainable entries get the update they would get if the frozen ones were not
   parameters at all).
2. ``restore`` (after the step) writes the frozen values back. Decoupled weight decay,
   p ← p·(1 − lr·wd), moves every entry whatever its gradient; this undoes it bit for bit.

Storage: per parameter, the flat int64 indices of its frozen entries and their values (12 bytes
per frozen float32 entry), so both guards cost O(frozen entries), not O(parameters): at p = 1% per
task that is far less than a bool mask per parameter. Masks from several files are united.

FSDP2 (not wired in here; DDP is): ``fully_shard`` turns each parameter into a DTensor sharded on
dim 0, and its gradient and AdamW state are sharded the same way. The mask shards with it: a rank
expands only its own rows of the packed mask (row-major bits, so rows are contiguous) into indices
relative to its local shard, masks its local gradient shard after the reduce-scatter and restores
its local shard after the step. No communication is needed, since frozen entries never change, and
the freeze state shrinks by the world size like everything else.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from cpift.merge.cpi.masks import load_core_mask


class Freezer:
    """Frozen entries of a model's parameters: their flat indices and the values to keep."""

    def __init__(self, entries: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]]):
        self.entries = entries  # (parameter, int64 flat indices, frozen values)

    @property
    def frozen(self) -> int:
        """Number of frozen entries over all parameters."""
        return sum(idx.numel() for _, idx, _ in self.entries)

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradient on frozen entries (call after backward, before clipping)."""
        for p, idx, _ in self.entries:
            if p.grad is not None:
                p.grad.view(-1).index_fill_(0, idx, 0)

    @torch.no_grad()
    def restore(self) -> None:
        """Write the frozen values back (call after optimizer.step())."""
        for p, idx, values in self.entries:
            p.view(-1).index_copy_(0, idx, values)


def load_freezer(model: torch.nn.Module, masks: Sequence[str | os.PathLike], *,
                 model_label: str | os.PathLike = "the model") -> Freezer:
    """Freeze every entry set in any of the mask files (DESIGN §4 format), at the model's current values.

    Args:
        model: the model to train, already on its device and in its training dtype.
        masks: core-mask files; an entry set in any of them is frozen.
        model_label: how error messages name the model.

    Returns:
        A Freezer holding the indices and current values of the frozen entries.

    Raises:
        CheckpointError: a mask file is missing or malformed.
        MismatchError: a mask names a tensor the model lacks or gives another shape
            (the mask was made for another model).
    """
    loaded = [load_core_mask(path) for path in masks]
    # remove_duplicate=False: a mask may name either alias of a tied weight (lm_head / embed_tokens)
    params = dict(model.named_parameters(remove_duplicate=False))
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    for mask in loaded:
        mask.check_matches(shapes, model_label)
    aliases: dict[int, list[str]] = {}
    for name, p in params.items():
        aliases.setdefault(id(p), []).append(name)
    entries = []
    for names in aliases.values():
        if not any(name in mask.shapes for mask in loaded for name in names):
            continue
        p = params[names[0]]
        bits = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
        for mask in loaded:
            for name in names:
                if name in mask.shapes:
                    bits |= mask.element_mask(name).to(p.device).view(-1)
        idx = bits.nonzero().squeeze(1)
        if idx.numel():
            entries.append((p, idx, p.detach().view(-1)[idx].clone()))
    return Freezer(entries)
