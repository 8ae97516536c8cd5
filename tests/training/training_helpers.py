"""A tiny random Llama and a character-level tokenizer (cpift.training.tiny), built in the tests (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cpift.kernels.masks import pack_bits
from cpift.merge.cpi.masks import block_size, mask_entries, save_core_mask
from cpift.training.tiny import (  # noqa: F401  (re-exported for the tests)
    arithmetic_rows, make_model, make_tokenizer, write_jsonl)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def write_mask(path, shapes: dict[str, tuple[int, ...]], *, granularity: str = "element", share: float = 0.3,
               seed: int = 0):
    """A core-mask file selecting a random share of each tensor's mask entries."""
    g = torch.Generator().manual_seed(seed)
    bits = {n: torch.rand(mask_entries(granularity, s), generator=g) < share for n, s in shapes.items()}
    counts = {n: int(b.sum()) for n, b in bits.items()}
    save_core_mask(path, {n: pack_bits(b) for n, b in bits.items()}, shapes, granularity=granularity, p=share * 100,
                   k=sum(counts.values()), threshold=0.0, counts=counts)
    return path, bits


def element_mask_of(bits: torch.Tensor, granularity: str, shape) -> torch.Tensor:
    """Expand mask entries to elements by hand (independent of CoreMask.element_mask)."""
    b = block_size(granularity, shape)
    numel = torch.Size(shape).numel()
    return torch.tensor([bool(bits[i // b]) for i in range(numel)]).reshape(shape)
