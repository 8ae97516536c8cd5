"""SLERP parity with mergekit itself, where a mergekit install is at hand.

mergekit pulls its own torch and many packages, so it lives in a separate venv and this test is skipped
unless `mergekit-yaml` is on PATH or CPIFT_MERGEKIT_YAML names it (here: /opt/mkvenv/bin/mergekit-yaml).
The benchmark (benchmarks/merge_throughput.py) reports the same comparison on 1 GB models.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
from references import load_state

from cpift.merge import methods

MERGEKIT = os.environ.get("CPIFT_MERGEKIT_YAML") or shutil.which("mergekit-yaml")


@pytest.mark.skipif(not MERGEKIT, reason="mergekit-yaml not found (set CPIFT_MERGEKIT_YAML)")
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_agrees_with_mergekit(llama, tmp_path, t):
    cfg = tmp_path / "slerp.yml"
    cfg.write_text(f"merge_method: slerp\nbase_model: {llama['task1']}\nmodels:\n  - model: {llama['task1']}\n"
                   f"  - model: {llama['task2']}\nparameters:\n  t: {t}\ndtype: bfloat16\n")
    subprocess.run([MERGEKIT, str(cfg), str(tmp_path / "mk"), "--no-copy-tokenizer", "--quiet",
                    "--no-write-model-card"], check=True, capture_output=True)
    methods.slerp(llama["task1"], llama["task2"], tmp_path / "cpift", t=t, progress=False)
    ours, theirs = load_state(tmp_path / "cpift"), load_state(tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name, x in ours.items():
        y = theirs[name]
        # one bf16 ulp of the tensor's scale: the two sum the dot products in different orders
        ulp = 2.0 ** (torch.floor(torch.log2(x.float().abs().max())) - 7)
        assert float((x.float() - y.float()).abs().max()) <= ulp, name
        if t in (0.0, 1.0):
            assert torch.equal(x, y), name


# Every case of cpift.merge.tools.parity (the table benchmarks/mergekit_parity.py writes) within its bound.

from cpift.merge.tools.parity import CASES, ParityCase, compare, make_family, run_both, tool_command  # noqa: E402


@pytest.fixture(scope="module")
def tiny_families(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return {dt: make_family(root / dt, dt) for dt in ("float32", "bfloat16")}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_config_agrees_with_mergekit(case, tiny_families, tmp_path):
    tool = tool_command(case.tool)
    if tool is None:
        pytest.skip(f"{case.tool}-yaml not found (set CPIFT_{case.tool.upper()}_YAML)")
    fam = tiny_families[case.dtype]
    ours, theirs = run_both(case, fam, tmp_path, tool)
    row = compare(case, ours, theirs, fam["base"])
    assert row["ok"], row


def _save(d, tensors):
    from safetensors.torch import save_file

    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("bound,change,holds", [
    (("exact", 0), 0, True), (("exact", 0), 1, False), (("ulp", 1), 1, True), (("ulp", 1), 2, False),
    (("agree", 0.9), 2, True), (("agree", 0.999), 2, False)])
def test_compare_detects_what_misses_the_bound(tmp_path, bound, change, holds):
    """The checker itself: `change` ulps added to 1% of the entries of a float32 tensor (scale 1)."""
    g = torch.Generator().manual_seed(5)
    y = torch.rand(1001, generator=g) * 0.5 + 0.5
    y[0] = 1.5  # the tensor's scale: ulp 2^-23
    x = y.clone()
    x[1:11] += change * 2.0 ** -23
    base = _save(tmp_path / "base", {"w": torch.zeros(1001)})
    case = ParityCase("t", "", "float32", bound)
    row = compare(case, _save(tmp_path / "x", {"w": x}), _save(tmp_path / "y", {"w": y}), base)
    assert row["ok"] is holds, row


def test_compare_random_bound_uses_the_moved_share(tmp_path):
    n = 20000
    g = torch.Generator().manual_seed(6)
    base = torch.randn(n, generator=g)
    half = base.clone()
    half[: n // 2] += 1.0
    quarter = base.clone()
    quarter[: n // 4] += 1.0
    shuffled = base.clone()
    shuffled[n // 2:] += 1.0  # other entries, the same share
    b = _save(tmp_path / "b", {"w": base})
    case = ParityCase("t", "", "float32", ("random", 0))
    assert compare(case, _save(tmp_path / "s", {"w": shuffled}), _save(tmp_path / "h", {"w": half}), b)["ok"]
    assert not compare(case, _save(tmp_path / "q", {"w": quarter}), tmp_path / "h", b)["ok"]


def test_compare_refuses_other_names_or_shapes(tmp_path):
    b = _save(tmp_path / "b", {"w": torch.zeros(3)})
    case = ParityCase("t", "", "float32", ("exact", 0))
    row = compare(case, _save(tmp_path / "x", {"v": torch.zeros(3)}), b, b)
    assert not row["ok"] and "names differ" in row["why"]
    row = compare(case, _save(tmp_path / "y", {"w": torch.zeros(4)}), b, b)
    assert not row["ok"] and "float32[4]" in row["why"]
