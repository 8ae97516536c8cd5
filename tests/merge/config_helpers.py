"""Helpers shared by the mergekit-config tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

from cpift.merge.mergekit.config import load_config
from cpift.merge.mergekit.spec import MergeConfig

L4 = "model.layers.{}.self_attn.q_proj.weight"
OUTSIDE = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]


def write(tmp_path: Path, text: str, name: str = "merge.yml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def cfg_of(tmp_path: Path, text: str) -> MergeConfig:
    return load_config(write(tmp_path, text))


def value(p, name):
    return p(name) if callable(p) else p


SLERP = """
    slices:
      - sources:
          - model: other
            layer_range: [0, 4]
          - model: base
            layer_range: [0, 4]
    merge_method: slerp
    base_model: base
    parameters:
      t:
        - filter: self_attn
          value: [0, 0.5, 0.3, 0.7, 1]
        - filter: mlp
          value: [1, 0.5, 0.7, 0.3, 0]
        - value: 0.5
    dtype: bfloat16
"""
