"""Nothing of cpift can shadow another distribution, whatever the working directory.

``python -m ...`` and ``python -c ...`` put the working directory first on ``sys.path``. From a clone's
root, a folder there holding an ``__init__.py`` would be imported in place of any installed package of
the same name: cpift's old top-level ``kernels/`` hid Hugging Face's ``kernels``, which transformers
imports, and every model load from the root failed. The package now lives under ``src/cpift/``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BARE_NAMES = ("kernels", "merge", "training", "cli")


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` with the repository root as the working directory (so first on sys.path)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_no_folder_at_the_root_is_a_regular_package() -> None:
    """A folder without ``__init__.py`` is at most a namespace portion, and any regular package wins."""
    packages = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert packages == [], f"regular packages at the repository root would shadow installed ones: {packages}"


@pytest.mark.parametrize("name", BARE_NAMES)
def test_bare_names_do_not_resolve_inside_the_repository(name: str) -> None:
    code = (f"import importlib.util, json; s = importlib.util.find_spec({name!r}); "
            "print(json.dumps(None if s is None else [s.origin, list(s.submodule_search_locations or [])]))")
    run = _run_from_root(code)
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout)
    if found is None:
        return  # fails to import: nothing shadowed
    places = [p for p in [found[0], *found[1]] if p and p not in ("namespace", "built-in", "frozen")]
    inside = [p for p in places if Path(p).resolve().is_relative_to(ROOT) and not Path(p).resolve()
              .is_relative_to(ROOT / "src")]
    assert not inside, f"`import {name}` from the repository root resolves inside it: {inside}"


def test_installed_kernels_distribution_wins_from_the_root() -> None:
    """Where Hugging Face's ``kernels`` is installed (transformers >= 5 requires it), the root finds it."""
    pytest.importorskip("kernels", reason="Hugging Face's kernels distribution is not installed")
    run = _run_from_root("import kernels; print(kernels.__file__)")
    assert run.returncode == 0, run.stderr[-2000:]
    assert not Path(run.stdout.strip()).resolve().is_relative_to(ROOT)


def test_transformers_loads_a_model_from_the_repository_root(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    code = f"""
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1)
LlamaForCausalLM(cfg).save_pretrained({str(tmp_path / 'tiny')!r})
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'tiny')!r})
print(m(torch.tensor([[1, 2, 3]])).logits.shape)
"""
    run = _run_from_root(code)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("torch.Size([1, 3, 64])")
