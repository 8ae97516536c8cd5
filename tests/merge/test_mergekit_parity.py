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

from cpift.merge import methods
from references import load_state

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
