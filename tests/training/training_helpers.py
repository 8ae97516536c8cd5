"""A tiny random Llama and a character-level tokenizer (cpift.training.tiny), built in the tests (no network)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from cpift.cli.train_cli import main
from cpift.kernels.masks import pack_bits
from cpift.merge.cpi.masks import block_size, mask_entries, save_core_mask
from cpift.training.tiny import arithmetic_rows, make_model, make_tokenizer, write_jsonl  # noqa: F401  (re-exported for the tests)


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


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """cpift-train in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def digest(*paths: Path) -> dict[str, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
