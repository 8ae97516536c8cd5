"""`cpift-merge bench`: runs on a tiny synthetic model and on given models, writes JSON, markdown and a
PNG whose numbers agree with each other; bad arguments fail in one line before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_bad_input import assert_user_error, run_cli

from cpift.kernels.backend import HAS_NUMBA
from cpift.merge.tools.bench import COMPETITOR, competing, find_mergekit, parse_synthetic

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    """True while a process with this pid runs the bench's competitor (a reused pid does not count)."""
    import psutil

    try:
        return COMPETITOR in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def _size(dirs: list[Path]) -> int:
    return sum(f.stat().st_size for d in dirs for f in d.glob("*.safetensors"))


def check_rows(result: dict, inputs: dict[str, list[Path]]) -> None:
    """Every row's derived numbers follow from its samples, its floors and the input files on disk."""
    rows = {(r["op"], r["provider"], r["condition"]): r for r in result["rows"]}
    assert len(rows) == len(result["rows"])
    for (op, provider, condition), r in rows.items():
        w, k = r["wall_s"], r["work_s"]
        n = result["repeat"] if condition == "quiet" else result["busy"]["repeat"]
        assert (len(w["all"]) == len(k["all"]) == n and w["p20"] <= w["p50"] <= w["p80"]
                and k["p20"] <= k["p50"] <= k["p80"])
        files = inputs[op if op != "floor" else provider.rsplit("-", 1)[0]]
        assert r["input_bytes"] == _size(files) and r["inputs"] == len(files)
        assert r["gbps_input_wall"]["all"] == pytest.approx([r["input_bytes"] / x / 1e9 for x in w["all"]])
        assert r["gbps_input_work"]["all"] == pytest.approx([r["input_bytes"] / x / 1e9 for x in k["all"]])
        assert 0 < k["p50"] < w["p50"]
        assert 5e6 < r["peak_rss_bytes"] < 4e9  # the child's own, not its parent's
        assert (0 <= r["others_cpu_share_p50"] <= max(r["others_cpu_share_all"])
                <= result["load"]["others_cpu_share_max"] <= 1)
        assert (r["device"] == "cpu" and r["date"] == result["date"]
                and r["machine"].startswith(f"{os.cpu_count()} CPUs"))
        assert r["config"]["competitors"] == (0 if condition == "quiet" else result["busy"]["competitors"])
        if op == "floor":
            assert "ratios" not in r and r["config"]["backend"] is None
            continue
        assert r["config"]["backend"] == provider.removeprefix("cpift-")
        assert f"-c from cpift.cli.merge_cli import main; main() {op} " in r["config"]["command"]
        floors = ["floor-read"] if op == "cores" else ["floor-physical", "floor-python"]
        assert sorted(r["ratios"]) == sorted(floors)
        for f in floors:
            floor = rows[("floor", f"{f}-{r['inputs']}", condition)]
            assert r["ratios"][f]["wall"] == pytest.approx(w["p50"] / floor["wall_s"]["p50"])
            assert r["ratios"][f]["work"] == pytest.approx(k["p50"] / floor["work_s"]["p50"])
        if condition != "quiet":
            quiet = rows[(op, provider, "quiet")]
            assert r["slowdown_vs_quiet"]["wall"] == pytest.approx(w["p50"] / quiet["wall_s"]["p50"])
            assert r["slowdown_vs_quiet"]["work"] == pytest.approx(k["p50"] / quiet["work_s"]["p50"])
            assert 0 < r["competitors_cpu_share_p50"] <= 1


def test_bench_synthetic_writes_json_png_markdown(capsys, tmp_path):
    """Physical, python and read floors, each method on both backends, a busy round beside a competitor
    that is gone afterwards, cold-compile rows, and JSON, markdown and PNG that agree."""
    backends = ["torch", "cpu"] if HAS_NUMBA else ["torch"]
    argv = ["bench", "--synthetic", "tiny", "--methods", "slerp,cores", "--backends", ",".join(backends),
            "--repeat", "2",
            "--busy", "1", "--busy-repeat", "1", "--threads", "1", "--workdir", tmp_path / "w",
            "--json", tmp_path / "r.json", "--plot", tmp_path / "r.png", "--markdown", tmp_path / "r.md"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    cpift = [f"cpift-{b}" for b in backends]
    want = [("floor", "floor-physical-2"), ("floor", "floor-python-2"), *[("slerp", c) for c in cpift],
            ("floor", "floor-read-3"), *[("cores", c) for c in cpift]]
    order = [(r["op"], r["provider"], r["condition"]) for r in result["rows"]]
    assert order == [(*x, "quiet") for x in want] + [(*x, "busy-1") for x in want]
    models = tmp_path / "w" / "models-tiny"
    base, a, b = models / "base", models / "task_a", models / "task_b"
    check_rows(result, {"floor-physical": [a, b], "floor-python": [a, b], "slerp": [a, b], "floor-read": [base, a, b],
                        "cores": [base, a, b]})
    assert result["model"].startswith("synthetic tiny") and result["dtype"] == "BF16" and result["threads"] == 2 - 1
    assert result["backends"] == backends and result["versions"]["torch"] == torch.__version__
    assert result["machine"]["cpus"] == os.cpu_count() and result["largest_tensor_bytes"] > 0
    # the busy round's competitor was started, ran, and is gone (checked by pid)
    busy = result["busy"]
    assert busy["competitors"] == 1 and busy["repeat"] == 1 and len(busy["pids"]) == 1
    assert not any(_alive(pid) for pid in busy["pids"])
    # cold compile: one run per fused-backend case, with an empty numba cache, when numba imports
    compiled = {(c["op"], c["provider"]): c for c in result["compile"]}
    assert set(compiled) == ({("slerp", "cpift-cpu"), ("cores", "cpift-cpu")} if HAS_NUMBA else set())
    for (op, provider), c in compiled.items():
        warm = next(r for r in result["rows"] if (r["op"], r["provider"], r["condition"]) == (op, provider, "quiet"))
        assert c["cold_wall_s"] > c["cold_work_s"] > 0 and c["warm_work_s_p50"] == warm["work_s"]["p50"]
        assert c["compile_s"] == pytest.approx(c["cold_work_s"] - c["warm_work_s_p50"])
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["models-tiny", "out"]  # its numba caches removed
    assert not (tmp_path / "w" / "out" / "cpift-cpu-slerp").exists()  # outputs are cleaned up
    runs = [line.split()[1:3] for line in err.splitlines() if line.startswith("run ")]
    assert runs == [["1/2", "quiet"]] * len(want) + [["1/1", "busy-1"]] * len(want) + [["2/2", "quiet"]] * len(want)
    assert sum(line.startswith("cold-compile ") for line in err.splitlines()) == len(compiled)
    md = (tmp_path / "r.md").read_text()
    assert md in out and "| slerp | cpift-torch | 2 |" in md and "| floor | floor-read-3 | 3 |" in md
    assert "With 1 competing CPU-bound processes" in md and ("Cold compile of the fused kernels" in md) == HAS_NUMBA
    png = (tmp_path / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "r.png").shape[0] > 300
    # the targets are read from the JSON: one work-ratio, one RSS and one busy line per cpift case
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_targets.py"), str(tmp_path / "r.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    targets = (tmp_path / "bench_targets.md").read_text()
    assert targets == r.stdout.rstrip("\n") + "\n"
    for c in cpift:
        assert f"| work / floor work | slerp | {c} |" in targets and f"| work / floor work | cores | {c} |" in targets
        assert f"| busy/quiet wall (1 competitors) | cores | {c} |" in targets
        assert f"| peak RSS GB (≤ 2 × largest tensor + 1 GB) | cores | {c} |" in targets


def test_competitors_are_killed_when_the_block_fails():
    """busy mode's competitors run during the block and are gone after it, even when it raises."""
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="a case failed"):
        with competing(2, pids=pids) as procs:
            assert len(procs) == len(pids) == 2 and all(_alive(pid) for pid in pids)
            raise RuntimeError("a case failed")
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)


ORPHAN = """
import sys
from cpift.merge.tools.bench import competing
with competing(2, pids=(pids := [])):
    print(*pids, flush=True)
    sys.stdin.read()  # until the test kills this process
"""


def test_competitors_end_when_the_bench_is_killed():
    """A bench killed by SIGKILL runs no cleanup: its competitors notice the lost parent and exit."""
    import time

    proc = subprocess.Popen([sys.executable, "-c", ORPHAN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


def test_a_competitor_whose_bench_died_before_it_started_exits():
    """The race of a bench killed before its competitor's interpreter is up: the competitor is told its
    parent's pid, finds another parent (init), and exits at once instead of looping forever."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that is no competitor's parent any more
    done = subprocess.run([sys.executable, "-S", "-c", COMPETITOR, str(gone.pid)], timeout=60)
    assert done.returncode == 0


def test_a_run_past_the_case_timeout_is_killed_and_marked(tmp_path):
    """--case-timeout: the command is killed at the limit (not left running) and its sample says so."""
    from cpift.merge.tools.bench import run_case
    from cpift.merge.tools.bench_cases import Case

    flag = tmp_path / "finished"
    slow = Case("floor", "floor-read-1",
                (sys.executable, "-c", f"import time; time.sleep(30); open({str(flag)!r}, 'w')"),
                (tmp_path,), tmp_path / "out")
    s = run_case(slow, timeout=1.0)
    assert s["timed_out"] and s["work"] is None and 1.0 <= s["wall"] < 25
    quick = Case("floor", "floor-read-1", (sys.executable, "-c", "print('work_seconds=0.5')"), (tmp_path,),
                 tmp_path / "o")
    s = run_case(quick, timeout=20.0)
    assert not s["timed_out"] and s["work"] == 0.5
    failing = Case("floor", "floor-read-1", (sys.executable, "-c", "raise SystemExit(3)"), (tmp_path,), tmp_path / "o")
    from cpift.errors import BenchError

    with pytest.raises(BenchError, match="exited with 3"):
        run_case(failing, timeout=20.0)
    assert not flag.exists()


def test_physical_floor_reads_every_byte_and_writes_one_model(tmp_path):
    """The physical floor copies the first input's files byte for byte and reads all of the others;
    with '-' it only reads."""
    from cpift.merge.tools.bench_cases import PHYSICAL
    from cpift.merge.tools.synthetic import PRESETS, make_checkpoint

    models = [make_checkpoint(tmp_path / n, PRESETS["tiny"], seed=i, base_seed=None if i == 0 else 0,
                              max_shard_size="100KB") for i, n in enumerate(["base", "a", "b"])]
    files = sorted(models[0].glob("*.safetensors"))
    assert len(files) > 1  # several shards, each copied
    r = subprocess.run([sys.executable, "-c", PHYSICAL, str(tmp_path / "out"), *map(str, models)], capture_output=True,
                       text=True, check=True)
    fields = dict(kv.split("=") for kv in r.stdout.split())
    assert int(fields["read_bytes"]) == _size(models) and int(fields["written_bytes"]) == _size(models[:1])
    assert [f.name for f in sorted((tmp_path / "out").iterdir())] == [f.name for f in files]
    assert all((tmp_path / "out" / f.name).read_bytes() == f.read_bytes() for f in files)
    r = subprocess.run([sys.executable, "-c", PHYSICAL, "-", *map(str, models)], capture_output=True, text=True,
                       check=True, cwd=tmp_path)
    fields = dict(kv.split("=") for kv in r.stdout.split())
    assert int(fields["read_bytes"]) == _size(models) and int(fields["written_bytes"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "base", "out"]


def test_bench_on_given_models(capsys, llama, tmp_path):
    methods = "task-arithmetic,fuse"
    backend = "cpu" if HAS_NUMBA else "torch"
    code, out, err = run_cli(capsys, "bench", llama["base"], llama["task1"], llama["task2"], "--methods", methods,
                             "--backends", backend, "--repeat", "1", "--threads", "1", "--json", tmp_path / "r.json")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    base, t1, t2 = llama["base"], llama["task1"], llama["task2"]
    check_rows(result, {"floor-physical": [base, t1, t2], "floor-python": [base, t1, t2],
                        "task-arithmetic": [base, t1, t2], "fuse": [base, t1, t2]})
    assert {r["provider"] for r in result["rows"]} == {"floor-physical-3", "floor-python-3", f"cpift-{backend}"}
    assert result["busy"] == {"competitors": 0, "repeat": 0, "command": COMPETITOR, "pids": [], "pinned": False}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # the default workdir is temporary


def test_bench_plans_each_backend_and_threads_reach_both_tools(tmp_path):
    """Each method runs on each backend ($CPIFT_BACKEND of the child); --threads N goes to cpift
    (--threads) and mergekit (-j) alike; --mergekit-methods limits mergekit's cases; cores has a read floor."""
    from cpift.merge.tools.bench_cases import plan_cases
    from cpift.merge.tools.synthetic import PRESETS, make_checkpoint

    models = [make_checkpoint(tmp_path / n, PRESETS["tiny"], seed=i, base_seed=None if i == 0 else 0)
              for i, n in enumerate(["base", "a", "b"])]
    cases = plan_cases(models, ["ties", "slerp", "cores"], tmp_path, mergekit="mergekit-yaml", max_shard_size="5GB",
                       threads=1, mergekit_methods=["ties"])
    got = [(c.op, c.provider) for c in cases]
    assert got == [("floor", "floor-physical-3"), ("floor", "floor-python-3"), ("ties", "cpift-torch"),
                   ("ties", "cpift-cpu"), ("ties", "mergekit"), ("floor", "floor-physical-2"),
                   ("floor", "floor-python-2"), ("slerp", "cpift-torch"), ("slerp", "cpift-cpu"),
                   ("floor", "floor-read-3"), ("cores", "cpift-torch"), ("cores", "cpift-cpu")]
    cmds = {(c.op, c.provider): c.cmd for c in cases}
    assert cmds[("ties", "cpift-cpu")][-2:] == ("--threads", "1") and cmds[("ties", "mergekit")][-2:] == ("-j", "1")
    assert ("--threads" not in cmds[("floor", "floor-python-3")]
            and "--threads" not in cmds[("floor", "floor-physical-3")])
    assert cmds[("floor", "floor-read-3")][3] == "-" and "--max-shard-size" not in cmds[("cores", "cpift-cpu")]
    assert [c.backend for c in cases if c.op == "cores"] == ["torch", "cpu"]
    assert {c.params for c in cases if c.op == "ties"} == {"weights=1.0,0.5 density=0.3"}
    yml = (tmp_path / "mergekit-ties.yml").read_text()
    assert "merge_method: ties" in yml and f"base_model: {models[0]}" in yml and "density: 0.3" in yml
    assert not (tmp_path / "mergekit-slerp.yml").exists()


@pytest.mark.skipif(find_mergekit() is None, reason="mergekit-yaml not found (set CPIFT_MERGEKIT_YAML)")
def test_bench_compares_mergekit(capsys, tmp_path):
    code, out, err = run_cli(capsys, "bench", "--synthetic", "tiny", "--methods", "slerp", "--repeat", "1",
                             "--threads", "1", "--compare-mergekit", "--workdir", tmp_path,
                             "--json", tmp_path / "r.json")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    rows = {(r["op"], r["provider"]): r for r in result["rows"]}
    assert set(rows) == {("floor", "floor-physical-2"), ("floor", "floor-python-2"), ("slerp", "cpift-torch"),
                         ("slerp", "cpift-cpu"), ("slerp", "mergekit")}
    mk = rows[("slerp", "mergekit")]
    for provider in ("cpift-torch", "cpift-cpu"):
        cpift = rows[("slerp", provider)]
        assert cpift["speedup_vs_mergekit_wall"] == pytest.approx(mk["wall_s"]["p50"] / cpift["wall_s"]["p50"])
    assert result["mergekit"].startswith("mergekit ") and result["versions"]["mergekit"] == result["mergekit"]
    parity = result["slerp_parity_vs_mergekit"]
    assert parity["same_names"] and parity["within_1_ulp_fraction"] > 0.999 and parity["cpift"] == "cpift-cpu"


@pytest.mark.parametrize("argv, fragment", [
    (["bench"], "give MODEL arguments (base first) or --synthetic"),
    (["bench", "{base}", "--synthetic", "tiny"], "not both or neither"),
    (["bench", "{base}"], "at least one task model"),
    (["bench", "--synthetic", "2b"], "--synthetic: '2b' is not PRESET"),
    (["bench", "--synthetic", "7b-layers:x"], "the layer count: expected an integer, got 'x'"),
    (["bench", "--synthetic", "1b:int8"], "unknown dtype 'int8'"),
    (["bench", "--synthetic", "tiny", "--methods", "slerp,magic"], "--methods: unknown method 'magic'"),
    (["bench", "--synthetic", "tiny", "--repeat", "0"], "--repeat"),
    (["bench", "--synthetic", "tiny", "--backends", "torch,gpu"], "--backends: 'torch,gpu' is not a list"),
    (["bench", "--synthetic", "tiny", "--backends", "cpu,cpu"], "--backends: 'cpu,cpu' is not a list of distinct"),
    (["bench", "--synthetic", "tiny", "--busy", "-1"], "--busy"),
    (["bench", "--synthetic", "tiny", "--busy", "2", "--busy-repeat", "4"],
     "--busy-repeat: must be between 1 and --repeat (3)"),
    (["bench", "--synthetic", "tiny", "--mergekit-repeat", "0"], "--mergekit-repeat"),
    (["bench", "--synthetic", "tiny", "--case-timeout", "0"], "'--case-timeout': 0 is not > 0"),
    (["bench", "--synthetic", "tiny", "--json", "/nonexistent-dir/r.json"], "--json: /nonexistent-dir does not exist"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bench_bad_arguments(capsys, llama, tmp_path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    assert_user_error(capsys, [a.format(base=llama["base"]) for a in argv], fragment)
    assert list(tmp_path.iterdir()) == []


def test_bench_mergekit_not_found(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CPIFT_MERGEKIT_YAML", str(tmp_path / "no-mergekit"))
    assert_user_error(capsys, ["bench", "--synthetic", "tiny", "--compare-mergekit", "--workdir", tmp_path / "w"],
                      "--compare-mergekit", "no-mergekit is not an executable")
    assert not (tmp_path / "w").exists()


def test_bench_cpu_backend_needs_numba(capsys, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba" else real(name, *a))
    assert_user_error(capsys, ["bench", "--synthetic", "tiny", "--workdir", tmp_path / "w"],
                      "--backends: cpu (the fused CPU kernels) needs numba")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("spec, label, hidden, layers, dtype", [
    ("1b", "1b", 2048, 8, torch.bfloat16),
    ("1b:bf16", "1b", 2048, 8, torch.bfloat16),
    ("7b-layers:4", "7b-layers4", 4096, 4, torch.bfloat16),
    ("8b-layers:2:fp16", "8b-layers2-float16", 4096, 2, torch.float16),
    ("tiny:fp32", "tiny-float32", 64, 2, torch.float32),
])
def test_parse_synthetic(spec, label, hidden, layers, dtype):
    got_label, shape, got_dtype = parse_synthetic(spec)
    assert (got_label, shape.hidden, shape.layers, got_dtype) == (label, hidden, layers, dtype)


def test_benchmark_script_uses_the_library(tmp_path):
    """benchmarks/merge_throughput.py is a wrapper: same rows, written to its results directory."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "merge_throughput.py"), "--preset", "tiny",
                        "--methods", "slerp", "--backends", "torch", "--repeat", "1", "--workdir", str(tmp_path / "w"),
                        "--results", str(tmp_path / "res"), "--mergekit", ""], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "res" / "merge_throughput.json").read_text())
    assert [(x["op"], x["provider"]) for x in result["rows"]] == [
        ("floor", "floor-physical-2"), ("floor", "floor-python-2"), ("slerp", "cpift-torch")]
    assert (tmp_path / "res" / "merge_throughput.md").read_text().startswith("# Merge throughput")
