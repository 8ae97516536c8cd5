"""fp8 inputs (safetensors ``F8_E4M3``, ``F8_E5M2``) read as float32, block scales applied, so every
method and ``cores`` merge them through their float32 math like any other input.

A tensor ``W`` stored in fp8 with a companion ``W_scale_inv`` (the block-scaled layout of DeepSeek-V3
and transformers' ``fp8`` quantization: one float32 scale per ``b0 × b1`` block, ``b0, b1`` from
config.json ``quantization_config.weight_block_size``, default 128 × 128) is read as

    W32[i, j] = float32(W[i, j]) · scale_inv[i // b0, j // b1]

(one scale for the whole tensor when ``scale_inv`` holds one value); an fp8 tensor without a companion
is read as float32(W). The product is exact in float64 and float32 rounds it correctly, so W32 equals
the float64 dequantisation rounded to float32, bit for bit. The companions are consumed: the merged
output holds the dequantised tensors (float32, or ``--out-dtype``) and its config.json loses
``quantization_config``. A scale whose shape does not fit its tensor, or an fp8 tensor with any other
scale companion (``W_scale``: another scheme), is a CheckpointError naming the tensor.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from cpift.errors import CheckpointError
from cpift.merge.io.checkpoint import Checkpoint
from cpift.merge.io.safe_parse import load_json_bounded
from cpift.numbers import parse_number

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


def has_fp8(ckpt: Checkpoint) -> bool:
    return any(i.dtype in FP8 for i in ckpt.tensors.values())


def block_size(model_dir: Path) -> tuple[int, int]:
    """``quantization_config.weight_block_size`` of config.json, else 128 × 128."""
    file = Path(model_dir) / "config.json"
    conf = load_json_bounded(file.read_bytes(), source=file, error=CheckpointError) if file.is_file() else None
    q = conf.get("quantization_config") if isinstance(conf, dict) else None
    raw = q.get("weight_block_size") if isinstance(q, dict) else None
    if raw is None:
        return DEFAULT_BLOCK
    if not isinstance(raw, list) or len(raw) != 2:
        raise CheckpointError(f"{file}: quantization_config.weight_block_size: expected [rows, columns], got {raw!r}")
    b0, b1 = (parse_number(v, f"{file}: quantization_config.weight_block_size", integer=True, lo=1, hi=2**31,
                           error=CheckpointError) for v in raw)
    return b0, b1


class DequantizedCheckpoint(Checkpoint):
    """A checkpoint whose fp8 tensors read as float32, block scales applied (module docstring)."""

    dequantized = True  # the engine drops quantization_config from the output's config.json

    def __init__(self, inner: Checkpoint):
        self.inner = inner
        self.path, self.dir, self.ref, self.notes = inner.path, inner.dir, inner.ref, list(inner.notes)
        self.index_name, self._bin = inner.index_name, None
        self._lock, self._maps = inner._lock, inner._maps  # the inner files' maps, shared with the prefetch thread
        for attr in ("adapter_dir", "base_ref"):  # an AdaptedCheckpoint, for the card
            if hasattr(inner, attr):
                setattr(self, attr, getattr(inner, attr))
        block = block_size(inner.dir)
        fp8 = [n for n, i in inner.tensors.items() if i.dtype in FP8]
        self.scale_of = {n: n + SCALE for n in fp8 if n + SCALE in inner.tensors}
        self.blocks = {n: self._check(n, block) for n in self.scale_of}
        for n in fp8:
            if n.removesuffix(".weight") + ".weight_scale" in inner.tensors or n + "_scale" in inner.tensors:
                raise CheckpointError(f"{inner.path}: tensor '{n}' is fp8 with a '_scale' companion, a scheme cpift "
                                      f"does not dequantise (only '{SCALE}' block scales)")
        hidden = set(self.scale_of.values())
        self.tensors = {n: i for n, i in inner.tensors.items() if n not in hidden}
        for n in fp8:
            info = inner.tensors[n]
            self.tensors[n] = dataclasses.replace(info, dtype=torch.float32, end=info.begin + 4 * info.numel)
        self.notes.append(f"note: {inner.path}: {len(fp8)} fp8 tensors read as float32 ({len(self.scale_of)} with "
                          f"block scales {block[0]}×{block[1]} applied); the output stores them in float32 unless "
                          f"--out-dtype, without quantization_config")

    def _check(self, name: str, block: tuple[int, int]) -> tuple[int, int]:
        w, s = self.inner.tensors[name], self.inner.tensors[name + SCALE]
        if not s.dtype.is_floating_point or s.dtype in FP8:
            raise CheckpointError(f"{self.inner.path}: tensor '{name}{SCALE}' is {s.dtype}, expected float32 scales")
        if s.numel == 1:
            return (max(1, w.shape[0]) if w.shape else 1, max(1, w.shape[1]) if len(w.shape) > 1 else 1)
        want = [math.ceil(w.shape[0] / block[0]), math.ceil(w.shape[1] / block[1])] if len(w.shape) == 2 else None
        if want is None or list(s.shape) != want:
            raise CheckpointError(f"{self.inner.path}: tensor '{name}{SCALE}' has shape {list(s.shape)}, but "
                                  f"'{name}' {list(w.shape)} in blocks of {block[0]}×{block[1]} needs {want}")
        return block

    def names(self) -> list[str]:
        return [n for n in self.inner.names() if n in self.tensors]

    def get(self, name: str) -> torch.Tensor:
        w = self.inner.get(name)
        if w.dtype not in FP8:
            return w
        w = w.to(torch.float32)
        if name not in self.scale_of:
            return w
        s = self.inner.get(self.scale_of[name]).to(torch.float32)
        if s.numel() == 1:
            return w * s.reshape(())
        b0, b1 = self.blocks[name]
        full = s.repeat_interleave(b0, dim=0)[: w.shape[0]].repeat_interleave(b1, dim=1)[:, : w.shape[1]]
        return w * full

    def populate(self, name: str) -> None:
        self.inner.populate(name)
        if name in self.scale_of:
            self.inner.populate(self.scale_of[name])

    def release(self, name: str) -> None:
        self.inner.release(name)

    def input_paths(self) -> list[Path]:
        return self.inner.input_paths()

    def close(self) -> None:
        self.inner.close()


def dequantized(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` itself, or a DequantizedCheckpoint over it when it holds fp8 tensors."""
    return DequantizedCheckpoint(ckpt) if has_fp8(ckpt) else ckpt
