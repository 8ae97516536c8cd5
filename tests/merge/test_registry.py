"""The method registry (merge/methods/registry.py) is where methods are listed: every method is
registered, and the CLI, YAML planning, the model card and the bench derive from it, so a method
registered in a test is a command, plans from a mergekit config and is benchmarked."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from references import load_state
from test_bad_input import run_cli

import cpift
from cpift.merge import methods
from cpift.merge.card import MERGEKIT_METHODS, card_files
from cpift.merge.mergekit.config import METHODS as CONFIG_METHODS
from cpift.merge.methods.registry import METHODS, Inputs, MergekitSpec, MethodSpec, ParamSpec, delta_methods
from cpift.merge.tools.bench_cases import METHODS as BENCH_METHODS

REGISTERED = {"linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties", "model_stock", "breadcrumbs",
         "breadcrumbs_ties", "della", "della_linear", "passthrough",
         "nuslerp", "multislerp", "karcher", "sce", "nearswap",
         "arcee_fusion", "ram", "ramplus_tl", "consensus_ta", "consensus_ties"}


def test_every_method_is_registered_with_its_function_and_parameters():
    assert set(METHODS) == REGISTERED
    for name, spec in METHODS.items():
        assert spec.function is getattr(methods, name) is getattr(cpift, name)
        signature = inspect.signature(spec.function).parameters
        for p in spec.params:
            assert p.name in signature and signature[p.name].kind is inspect.Parameter.KEYWORD_ONLY, (name, p.name)
        assert spec.definition and spec.paper and spec.summary
    assert set(delta_methods()) == {"task_arithmetic", "ties", "dare_linear", "dare_ties", "model_stock",
                                    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce",
                                    "ram", "ramplus_tl", "consensus_ta", "consensus_ties"}


def test_cli_config_card_and_bench_list_the_registered_methods(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for spec in METHODS.values():
        assert spec.cli in out
    assert set(CONFIG_METHODS) == set(MERGEKIT_METHODS) == REGISTERED
    assert set(BENCH_METHODS) == {s.cli for s in METHODS.values()} | {"fuse", "cores"}


@pytest.fixture
def negate(monkeypatch):
    """A test method, 'negated_slerp' = slerp with 1 − t, registered only for the test."""
    spherical = importlib.import_module("cpift.merge.methods.slerp")  # the module (the package's name is the function)

    def negated_slerp(model_a, model_b, out, *, u: float = 0.25, **common):
        return methods.slerp(model_a, model_b, out, t=1.0 - u, **common)

    monkeypatch.setattr(spherical, "negated_slerp", negated_slerp, raising=False)
    spec = MethodSpec("negated_slerp", "negated-slerp", "cpift.merge.methods.slerp", Inputs("pair"),
                      (ParamSpec("u", "--u", "number", 0.25, "1 − t.", lo=0.0, hi=1.0, mergekit="t"),),
                      "slerp at t = 1 − u", "a test", "SLERP with t = 1 − u (a test method).",
                      MergekitSpec((), ("t", "int8_mask"), normalize=None, cpift_normalize=None), bench={"--u": "0.7"})
    monkeypatch.setitem(METHODS, spec.name, spec)
    return spec


def test_a_method_registered_in_a_test_is_a_command_with_its_options(negate, llama, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert "negated-slerp" in out
    code, out, _ = run_cli(capsys, "negated-slerp", "--help")
    assert code == 0 and "--u" in out and "MODEL_A" in out
    code, _, err = run_cli(capsys, "negated-slerp", llama["task1"], llama["task2"], "--u", "0.7", "-o",
                           tmp_path / "neg", "-q", "--threads", "1")
    assert code == 0, err
    code, _, err = run_cli(capsys, "slerp", llama["task1"], llama["task2"], "--t", "0.3", "-o", tmp_path / "ref",
                           "-q", "--threads", "1")
    assert code == 0, err
    got, want = load_state(tmp_path / "neg"), load_state(tmp_path / "ref")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_registered_method_derives_its_card_definition_and_bench_case(negate, llama, tmp_path):
    from cpift.merge.card import CardInput
    from cpift.merge.tools.bench_cases import cpift_args

    files = card_files(method="negated_slerp", params={"u": 0.7},
                       inputs=[CardInput(str(llama["task1"]), llama["task1"], "model"),
                               CardInput(str(llama["task2"]), llama["task2"], "model")], settings={})
    assert "slerp at t = 1 − u" in files["README.md"]
    assert "merge_method: negated_slerp" in files["cpift_recipe.yml"] and "t: 0.7" in files["cpift_recipe.yml"]
    args, inputs = cpift_args("negated-slerp", tmp_path / "base", [tmp_path / "t1", tmp_path / "t2"],
                              [tmp_path / "t1", tmp_path / "t2"])
    assert args == [str(tmp_path / "t1"), str(tmp_path / "t2"), "--u", "0.7"] and len(inputs) == 2


def test_merge_options_are_typed_checked_and_a_dry_run_returns_the_plan(llama, tmp_path):
    import dataclasses
    import inspect

    from cpift.merge.io.dryrun import MergePlan
    from cpift.merge.options import MergeOptions

    # a declared method lists every option in its signature, with MergeOptions' defaults, and no options=
    params = inspect.signature(methods.slerp).parameters
    for f in dataclasses.fields(MergeOptions):
        assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY and params[f.name].default == f.default
    assert "options" not in params
    with pytest.raises(TypeError, match="progres"):
        methods.slerp(llama["task1"], llama["task2"], tmp_path / "out", progres=False)
    with pytest.raises(TypeError, match="options"):
        methods.slerp(llama["task1"], llama["task2"], tmp_path / "out", options=MergeOptions(dry_run=True))
    assert not (tmp_path / "out").exists()
    plan = methods.ties(llama["base"], [llama["task1"]], tmp_path / "out", density=0.3, dry_run=True, progress=False)
    assert isinstance(plan, MergePlan) and not (tmp_path / "out").exists()
    plan = methods.slerp(llama["task1"], llama["task2"], tmp_path / "out", t=0.3, dry_run=True, progress=False)
    assert isinstance(plan, MergePlan) and not (tmp_path / "out").exists()
    result = methods.slerp(llama["task1"], llama["task2"], tmp_path / "out", t=0.3, dry_run=False, progress=False)
    assert result.out == tmp_path / "out" and (tmp_path / "out").is_dir()
