"""Llama-shaped checkpoints built from random numbers, for the demo, tests and benchmarks.

Written with the safetensors library itself (not cpift's writer), with a config.json that
transformers' LlamaForCausalLM loads. "Fine-tuned" variants are the base plus a small seeded
perturbation, so deltas look like the small, dense updates of real fine-tuning.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from cpift.errors import BenchError, ParameterError
from cpift.merge.io.sizes import size_bytes
from cpift.numbers import parse_number, shown


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensor names and shapes in transformers' LlamaForCausalLM state-dict order."""
        h, hd = self.hidden, self.hidden // self.heads
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out[p + "self_attn.q_proj.weight"] = (h, h)
            out[p + "self_attn.k_proj.weight"] = (self.kv_heads * hd, h)
            out[p + "self_attn.v_proj.weight"] = (self.kv_heads * hd, h)
            out[p + "self_attn.o_proj.weight"] = (h, h)
            out[p + "mlp.gate_proj.weight"] = (self.intermediate, h)
            out[p + "mlp.up_proj.weight"] = (self.intermediate, h)
            out[p + "mlp.down_proj.weight"] = (h, self.intermediate)
            out[p + "input_layernorm.weight"] = (h,)
            out[p + "post_attention_layernorm.weight"] = (h,)
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (self.vocab, h)
        return out

    def numel(self) -> int:
        total = 0
        for shape in self.tensors().values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def config(self, dtype: torch.dtype) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
            "bos_token_id": 1, "eos_token_id": 2,
        }


PRESETS = {
    "tiny": LlamaShape(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, vocab=256),
    "small": LlamaShape(hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=4, vocab=32000),
    # ≈0.97 GB in bf16: TinyLlama's widths with 8 layers.
    "1b": LlamaShape(hidden=2048, intermediate=5632, layers=8, heads=32, kv_heads=4, vocab=32000),
    # Llama-2-7B and Llama-3-8B (13.5 and 16.1 GB in bf16); dataclasses.replace(shape, layers=4)
    # keeps their tensor sizes with fewer layers (cpift-merge bench --synthetic 7b-layers:4).
    # ≈7.2 GB in bf16: Llama-3.2-3B's widths, embeddings untied (3b-layers:20 ≈ 5.6 GB).
    "3b": LlamaShape(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, vocab=128256),
    "7b": LlamaShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    "8b": LlamaShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
}


def make_checkpoint(path: str | os.PathLike, shape: LlamaShape, *, dtype: torch.dtype = torch.bfloat16,
                    seed: int = 0, base_seed: int | None = None, delta_scale: float = 0.1,
                    max_shard_size: int | str = "5GB") -> Path:
    """Write a random Llama-shaped checkpoint; with ``base_seed``, a fine-tune of that base.

    Weights ~ N(0, 0.02²) (norms ~ 1); a fine-tune adds N(0, (delta_scale·0.02)²) drawn from ``seed``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = size_bytes(max_shard_size)
    base_gen = torch.Generator().manual_seed(seed if base_seed is None else base_seed)
    delta_gen = torch.Generator().manual_seed(seed) if base_seed is not None else None
    # Shards planned from the shapes first, so each is generated and saved on its own: memory holds
    # one shard, not the model (a 7b preset is 13.5 GB).
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in shape.tensors().items():
        nbytes = math.prod(shp) * dtype.itemsize
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, shp))
        size += nbytes
    n = len(groups)
    weight_map = {}
    total = 0
    for i, group in enumerate(groups):
        tensors = {}
        for name, shp in group:
            if name.endswith("norm.weight"):
                w = 1.0 + 0.02 * torch.randn(shp, generator=base_gen)
            else:
                w = 0.02 * torch.randn(shp, generator=base_gen)
            if delta_gen is not None:
                w += (0.02 * delta_scale) * torch.randn(shp, generator=delta_gen)
            tensors[name] = w.to(dtype)
            total += tensors[name].nbytes
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
        del tensors
    if n > 1:
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
    return path


def describe(shape: LlamaShape, dtype: torch.dtype) -> str:
    gb = shape.numel() * dtype.itemsize / 1e9
    return f"Llama-shaped {asdict(shape)}, {shape.numel() / 1e6:.1f}M parameters, {gb:.2f} GB in {dtype}"



_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


MAX_LAYERS = 256  # of a synthetic model: more is a disk filled by mistake


def parse_synthetic(spec: str) -> tuple[str, LlamaShape, torch.dtype]:
    """``PRESET[-layers:N][:DTYPE]`` (``1b``, ``7b-layers:4``, ``1b:bf16``) → (label, shape, dtype).

    Raises:
        ParameterError: unknown preset or dtype, or a bad layer count.
    """
    parts = spec.strip().split(":")
    name, layers = parts[0], None
    if name.endswith("-layers"):
        name = name.removesuffix("-layers")
        if len(parts) < 2:
            raise ParameterError(f"--synthetic: '{spec}': expected a layer count after '-layers:' (e.g. 7b-layers:4)")
        layers = parse_number(parts[1], f"--synthetic: {shown(spec)}: the layer count", integer=True, lo=1,
                              hi=MAX_LAYERS, error=ParameterError)
        parts = parts[1:]
    if name not in PRESETS or len(parts) > 2:
        raise ParameterError(f"--synthetic: '{spec}' is not PRESET[-layers:N][:DTYPE] with a preset among "
                             f"{', '.join(PRESETS)} (e.g. 1b, 1b:bf16, 7b-layers:4)")
    dtype_name = parts[1].lower() if len(parts) == 2 else "bf16"
    if dtype_name not in _DTYPES:
        raise ParameterError(f"--synthetic: '{spec}': unknown dtype '{parts[1]}' (use bf16, fp16 or fp32)")
    dtype = _DTYPES[dtype_name]
    shape = PRESETS[name] if layers is None else replace(PRESETS[name], layers=layers)
    label = name + (f"-layers{layers}" if layers is not None else "") + \
        ("" if dtype == torch.bfloat16 else "-" + str(dtype).removeprefix("torch."))
    return label, shape, dtype


# Marks a model the bench built, so that it only ever rebuilds (removes) its own models.
SYNTHETIC_MARKER = ".cpift-bench-model"


def synthetic_models(workdir: Path, spec: str, *, echo: Callable[[str], None] = print) -> list[Path]:
    """base, task_a, task_b of a synthetic preset under ``workdir/models-LABEL``; built once, reused
    when their config.json matches. A stale model is rebuilt only if the bench built it (it carries
    the SYNTHETIC_MARKER file); anything else at that path is refused, never removed."""
    label, shape, dtype = parse_synthetic(spec)
    root = workdir / f"models-{label}"
    out = []
    for i, name in enumerate(["base", "task_a", "task_b"]):
        path = root / name
        cfg = path / "config.json"
        if not (cfg.is_file() and json.loads(cfg.read_text()) == shape.config(dtype)):
            if path.exists() or path.is_symlink():
                if not (path.is_dir() and (path / SYNTHETIC_MARKER).is_file()):
                    raise BenchError(f"{path}: exists and was not built by cpift-merge bench; move it away "
                                     f"or pick another --workdir")
                shutil.rmtree(path)
            echo(f"building {path}: {describe(shape, dtype)}")
            # Sharded as the Hub ships models (5 GB shards) from 2 GB up; smaller presets in 500 MB shards.
            shard = "5GB" if shape.numel() * dtype.itemsize > 2e9 else "500MB"
            make_checkpoint(path, shape, dtype=dtype, seed=i, base_seed=None if i == 0 else 0, max_shard_size=shard)
            (path / SYNTHETIC_MARKER).write_text("built by cpift-merge bench\n")
        out.append(path)
    return out
