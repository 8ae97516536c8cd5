"""Tiny real checkpoints built with transformers: a base and three fine-tunes per architecture/dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _config(arch: str):
    from transformers import LlamaConfig, Qwen2Config

    kw = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaConfig(**kw) if arch == "llama" else Qwen2Config(**kw)


def build_family(root: Path, arch: str, dtype: torch.dtype, n_tasks: int = 3) -> dict[str, Path]:
    """base + task1..taskN: the same architecture, the tasks = base + seeded small perturbations."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(_config(arch)).to(dtype)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = {}
    for i in range(n_tasks + 1):
        name = "base" if i == 0 else f"task{i}"
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(base_state[k])
                if i and p.is_floating_point():
                    p.add_((0.01 * torch.randn(p.shape, generator=g)).to(dtype))
        path = root / f"{arch}-{str(dtype).removeprefix('torch.')}-{name}"
        model.save_pretrained(path, max_shard_size="20KB", safe_serialization=True)
        paths[name] = path
    return paths


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch in ("llama", "qwen2"):
        for dtype in (torch.float32, torch.bfloat16):
            out[(arch, dtype)] = build_family(root, arch, dtype)
    return out


@pytest.fixture
def llama(families) -> dict[str, Path]:
    return families[("llama", torch.bfloat16)]
