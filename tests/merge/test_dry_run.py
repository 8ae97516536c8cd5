"""--dry-run: validates like a real run, writes nothing (checked on the filesystem), and its byte counts,
shard files and memory estimate match what the real run then reads, writes and uses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from kill_helpers import digest, killed_run
from test_bad_input import assert_user_error, run_cli

from cpift.merge import methods
from cpift.merge.tools.synthetic import LlamaShape, make_checkpoint


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and mtime: a dry run must change none of them."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


CASES = {
    "slerp": lambda m: ["slerp", m["task1"], m["task2"], "--t", "0.3"],
    "linear": lambda m: ["linear", m["task1"], m["task2"], m["task3"], "--weights", "1,2,3"],
    "task-arithmetic": lambda m: ["task-arithmetic", "--base", m["base"], m["task1"], m["task2"]],
    "ties": lambda m: ["ties", "--base", m["base"], m["task1"], m["task2"], "--density", "0.3", "--global-trim"],
    "dare-ties": lambda m: ["dare-ties", "--base", m["base"], m["task1"], m["task2"], "--out-dtype", "float32"],
}


@pytest.mark.parametrize("method", list(CASES))
def test_dry_run_writes_nothing_and_counts_match(capsys, llama, tmp_path, method):
    argv = [*CASES[method](llama), "-o", tmp_path / "out", "--max-shard-size", "40000"]
    before = snapshot(tmp_path), {k: snapshot(v) for k, v in llama.items()}
    code, out, err = run_cli(capsys, *argv, "--dry-run")
    assert code == 0, err
    assert (snapshot(tmp_path), {k: snapshot(v) for k, v in llama.items()}) == before
    assert out.startswith(f"dry run of {method.replace('-', '_')}, nothing written")
    assert "expected peak memory: at most" in out

    fn = {"slerp": "slerp", "linear": "linear", "task-arithmetic": "task_arithmetic", "ties": "ties",
          "dare-ties": "dare_ties"}[method]
    plan = _library_plan(fn, llama, tmp_path)
    assert snapshot(tmp_path) == before[0]
    code, out, err = run_cli(capsys, *argv, "-q")
    assert code == 0, err
    real = _library_result(fn, llama, tmp_path)
    files = {p.name: p.stat().st_size for p in (tmp_path / "real").glob("*.safetensors")}
    assert {s.file: s.nbytes for s in plan.shards} == files
    assert plan.bytes_written == real.bytes_written == sum(files.values())
    assert plan.bytes_read == real.bytes_read
    assert plan.tensors == real.tensors and plan.kept == []


def _kwargs(fn: str, m: dict) -> tuple[tuple, dict]:
    return {"slerp": ((m["task1"], m["task2"]), {"t": 0.3}),
            "linear": (([m["task1"], m["task2"], m["task3"]],), {"weights": [1, 2, 3]}),
            "task_arithmetic": ((m["base"], [m["task1"], m["task2"]]), {}),
            "ties": ((m["base"], [m["task1"], m["task2"]]), {"density": 0.3, "global_trim": True}),
            "dare_ties": ((m["base"], [m["task1"], m["task2"]]), {"out_dtype": "float32"})}[fn]


def _library_plan(fn, m, tmp_path):
    args, kw = _kwargs(fn, m)
    return getattr(methods, fn)(*args, tmp_path / "real", max_shard_size="40000", dry_run=True, progress=False, **kw)


def _library_result(fn, m, tmp_path):
    args, kw = _kwargs(fn, m)
    return getattr(methods, fn)(*args, tmp_path / "real", max_shard_size="40000", progress=False, **kw)


def test_dry_run_validates_like_a_real_run(capsys, llama, tmp_path):
    """Bad input fails the dry run with the real run's one-line error; nothing is created."""
    assert_user_error(capsys, ["slerp", llama["task1"], tmp_path / "nope", "-o", tmp_path / "out", "--dry-run"],
                      "nope", "does not exist")
    assert_user_error(capsys, ["ties", "--base", llama["base"], llama["task1"], "--density", "2", "-o",
                               tmp_path / "out", "--dry-run"], "density: 2.0 is outside")
    (tmp_path / "exists").mkdir()
    assert_user_error(capsys, ["slerp", llama["task1"], llama["task2"], "-o", tmp_path / "exists", "--dry-run"],
                      "already exists")
    assert_user_error(capsys, ["slerp", llama["task1"], llama["task2"], "-o", tmp_path / "out", "--dry-run",
                               "--push-to-hub", "org/name"], "--push-to-hub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_dry_run_of_a_resume_reports_kept_shards(capsys, llama, tmp_path):
    out, partial = tmp_path / "out", tmp_path / ".out.cpift-partial"
    argv = ["slerp", llama["task1"], llama["task2"], "-o", out, "--max-shard-size", "30000"]
    killed_run(argv, "shard", 2)
    before = digest(partial)
    plan = methods.slerp(llama["task1"], llama["task2"], out, max_shard_size="30000", dry_run=True, resume=True)
    assert digest(partial) == before and not out.exists()
    assert len(plan.kept) == 2
    code, stdout, err = run_cli(capsys, *argv, "--dry-run", "--resume")
    assert code == 0 and "2 kept from the interrupted merge" in stdout and "(kept)" in stdout, stdout
    result = methods.slerp(llama["task1"], llama["task2"], out, max_shard_size="30000", resume=True, progress=False)
    assert (result.bytes_written, result.bytes_read, result.tensors) == (plan.bytes_written, plan.bytes_read,
                                                                          plan.tensors)


PEAK = """
import sys
from cpift.merge import methods
out, base, tasks = sys.argv[1], sys.argv[2], sys.argv[3:]
if out == "plan":
    print(methods.ties(base, tasks, "unused-out", density=0.3, dry_run=True).peak_memory)
else:
    methods.ties(base, tasks, out, density=0.3, progress=False)
"""


def test_peak_memory_estimate_bounds_the_real_peak(tmp_path):
    """The estimate is an upper bound of the real run's peak RSS, and not a loose one."""
    from cpift.merge.tools.bench import measure  # peak RSS of a child not inflated by pytest's own

    shape = LlamaShape(hidden=256, intermediate=704, layers=2, heads=4, kv_heads=2, vocab=32000)
    models = [make_checkpoint(tmp_path / n, shape, seed=i, base_seed=None if i == 0 else 0)
              for i, n in enumerate(["base", "a", "b"])]
    plan = measure([sys.executable, "-c", PEAK, "plan", *map(str, models)])
    assert plan["code"] == 0, plan["output"]
    estimate = int(plan["output"])
    real = measure([sys.executable, "-c", PEAK, str(tmp_path / "out"), *map(str, models)])
    assert real["code"] == 0 and (tmp_path / "out" / "model.safetensors").is_file(), real["output"]
    assert real["rss"] <= estimate <= 1.5 * real["rss"], (real["rss"], estimate)
