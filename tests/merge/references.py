"""Helpers of the merge tests: the float64 comparison and a checkpoint read through the safetensors library
(the float64 oracles themselves are in tests/oracles.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def assert_matches(result: torch.Tensor, ref: torch.Tensor, name: str = "", scale: torch.Tensor | None = None) -> None:
    """result (in its dtype) may be at most twice as far from the float64 reference as the correctly
    rounded value, plus float32 rounding of the intermediates: a few float32 eps times ``scale``
    (the magnitude of the inputs at each entry; float32 math cannot do better than that)."""
    dtype = result.dtype
    ref = ref.reshape(result.shape).double()
    res = result.double()
    rounding = (ref.to(dtype).double() - ref).abs()
    scale = ref.abs() if scale is None else scale.reshape(result.shape).double()
    tol = 2 * rounding + 4 * torch.finfo(torch.float32).eps * scale + 1e-12
    err = (res - ref).abs()
    bad = ~(err <= tol)
    if bad.any():
        idx = bad.reshape(-1).nonzero()[:5].reshape(-1).tolist()
        r, f, e = res.reshape(-1), ref.reshape(-1), err.reshape(-1)
        detail = ", ".join(f"[{i}] got {r[i].item():.9g} want {f[i].item():.9g} err {e[i].item():.3g}"
                           for i in idx)
        raise AssertionError(f"{name}: {int(bad.sum())} of {res.numel()} entries off: {detail}")


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, through the safetensors library (not cpift's reader)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    state = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state
