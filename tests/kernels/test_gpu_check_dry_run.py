"""benchmarks/gpu_check.py --dry-run: the GPU script's timing and reporting code, on the CPU interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cpift.kernels.backend import HAS_TRITON

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    kernels = [r["kernel"] for r in report["rows"]]
    assert kernels == ["score+histogram", "compare+pack", "slerp reduce", "slerp blend", "ties N=3", "popcount overlap"]
    assert report["dry_run"] is True and report["copy_gbps"] > 0
    assert all(r["cpift_s"] > 0 and r["torch_s"] > 0 and r["bytes"] > 0 for r in report["rows"])
    for k in kernels:
        assert k in proc.stdout
