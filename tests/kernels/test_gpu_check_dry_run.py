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
    """Every case runs (each in its own process) and passes under the interpreter, the tie and NaN cases
    included; the JSON is complete and each case's result is in it."""
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    cases = report["cases"]
    assert list(cases) == ["magnitude_cut", "global_topk", "ties", "dare", "nan", "sce", "nearswap",
                           "crowded_histogram", "device_tests", "bandwidth", "staged_merge"]
    assert report["dry_run"] is True
    assert all(r["status"] == "ok" for r in cases.values()), {n: r["status"] for n, r in cases.items()}
    assert cases["magnitude_cut"]["tie_split"] is True  # the realistic deltas split a tie at the cut
    assert cases["nan"]["ties"]["nan_at_input"] and cases["nan"]["dare"]["nan_at_input"]
    crowded = cases["crowded_histogram"]  # both passes exact on ulp-step deltas, with few global atomics
    assert all(crowded[p]["mismatches"] == 0 and sum(crowded[p]["atomics"]) < crowded["entries"] // 10
               for p in ("high", "low_in_busiest", "low_in_zeros")) and crowded["cut_exact"]
    assert all(cases[c]["mismatches"] == 0 and cases[c]["entries"] > 4096 for c in ("ties", "dare", "sce", "nearswap"))
    rows = cases["bandwidth"]["rows"]
    assert all(r["bytes"] > 0 and r["s"] > 0 for r in rows.values())
    assert "ties N=3" in rows and "histogram, one bin" in rows and "histogram, ulp steps" in rows
    assert cases["staged_merge"]["exit"] == 0 and cases["staged_merge"]["input_bytes"] > 0
    for name in cases:
        assert name in proc.stdout


def test_a_failing_case_is_recorded_and_the_run_fails(tmp_path, monkeypatch):
    """A case that raises is recorded as crashed (with its traceback) and the others still run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(gpu_check, "CASE_LIMIT_S", 60)
    row = gpu_check._child("no_such_case", dry=True)
    assert row["status"] == "crashed" and "KeyError" in row["stderr"]
    report = {"cases": {"x": row}}
    gpu_check._write(tmp_path / "r.json", report)
    assert json.loads((tmp_path / "r.json").read_text()) == report
