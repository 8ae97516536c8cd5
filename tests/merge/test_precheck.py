"""The checks a merge command runs before torch is imported (merge/precheck.py) refuse nothing the merge
accepts and say what the merge says: a parameter's declared range (the registry) is the range the method
itself enforces, and a header or shape refusal reads the same from either."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import cpift
from cpift.errors import MismatchError, ParameterError
from cpift.merge.io.checkpoint import Checkpoint
from cpift.merge.methods.registry import METHODS, ParamSpec
from cpift.merge.precheck import check_models, check_params


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("precheck")
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(4):
        (root / f"m{i}").mkdir()
        save_file({"w": torch.randn(6, 5, generator=g), "v": torch.randn(7, generator=g) + 1},
                  str(root / f"m{i}" / "model.safetensors"))
        out.append(str(root / f"m{i}"))
    (root / "wide").mkdir()
    save_file({"w": torch.randn(6, 4), "v": torch.randn(7)}, str(root / "wide" / "model.safetensors"))
    return root, out


def _inputs(spec, paths: list[str]) -> list:
    n = max(spec.inputs.min_models, 2)
    if spec.inputs.base == "pair":
        return paths[:2]
    if spec.inputs.positional == ("model",):
        return paths[:1]
    if spec.inputs.base != "required":
        return [paths[:n]]
    return [paths[0], paths[1:1 + n]]


def _outside(p: ParamSpec) -> list[float]:
    """A value just beyond each finite bound of the declared range."""
    out = []
    if math.isfinite(p.lo):
        out.append(p.lo if p.lo_open else p.lo - 0.25)
    if math.isfinite(p.hi):
        out.append(p.hi + 0.25)
    return out


CASES = [(name, p, v) for name, spec in METHODS.items() for p in spec.params
         if p.kind in ("number", "per_model", "number_or_per_model") for v in _outside(p)]


@pytest.mark.parametrize("name,p,bad", CASES, ids=[f"{n}-{p.name}-{v:g}" for n, p, v in CASES])
def test_a_value_outside_the_declared_range_is_refused_by_the_method_too(models, tmp_path, name, p, bad):
    spec = METHODS[name]
    inputs = _inputs(spec, models[1])
    given = [bad] * len(inputs[-1]) if p.kind == "per_model" else bad  # per model: one value per fine-tune
    with pytest.raises(ParameterError) as pre:
        check_params(spec, {p.name: given})
    with pytest.raises(ParameterError) as merge:
        spec.function(*inputs, tmp_path / "out", **{p.name: given}, dry_run=True, progress=False)
    # The same words up to the range shown (karcher's max_iter declares [0, inf) but the method says [0, 1e6]).
    assert str(pre.value).split(" is outside")[0] == str(merge.value).split(" is outside")[0] == f"{p.name}: {bad}"
    assert not (tmp_path / "out").exists()


def test_a_value_inside_the_declared_range_passes_the_precheck():
    for spec in METHODS.values():
        for p in spec.params:
            if p.kind in ("number", "number_or_per_model") and p.default is not None:
                check_params(spec, {p.name: p.default})  # the defaults lie in their ranges


def test_headers_and_shapes_are_refused_in_the_words_of_the_merge(models, tmp_path):
    root, paths = models
    with pytest.raises(MismatchError) as pre:
        check_models([paths[0], str(root / "wide")])
    with pytest.raises(MismatchError) as merge:
        cpift.slerp(paths[0], root / "wide", tmp_path / "out", progress=False)
    assert str(pre.value) == str(merge.value) and "tensor 'w': shape [6, 5]" in str(pre.value)
    light, full = Checkpoint(paths[0], typed=False), Checkpoint(paths[0])
    assert {n: (i.shape, i.begin, i.end) for n, i in light.tensors.items()} == \
        {n: (i.shape, i.begin, i.end) for n, i in full.tensors.items()}
    assert {n: i.dtype for n, i in light.tensors.items()} == {"w": "F32", "v": "F32"}
    assert {i.dtype for i in full.tensors.values()} == {torch.float32}
