"""`cpift-merge bench`: runs on a tiny synthetic model and on given models, writes JSON, markdown and a
PNG whose numbers agree with each other; bad arguments fail in one line before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpift.merge.tools.bench import find_mergekit, parse_synthetic

from test_bad_input import assert_user_error, run_cli

ROOT = Path(__file__).resolve().parents[2]


def _fuse_available() -> bool:
    try:
        from cpift.merge.cpi.fuse import fuse  # noqa: F401
    except ImportError:
        return False
    return True


def check_rows(result: dict, inputs: dict[str, list[Path]]) -> None:
    """Every row's derived numbers follow from its samples and the input files on disk."""
    rows = {(r["op"], r["provider"]): r for r in result["rows"]}
    for (op, provider), r in rows.items():
        w = r["wall_s"]
        assert len(w["all"]) == result["repeat"] and w["p20"] <= w["p50"] <= w["p80"]
        files = inputs[op if op != "floor" else provider]
        assert r["input_bytes"] == sum(f.stat().st_size for d in files for f in d.glob("*.safetensors"))
        assert r["inputs"] == len(files)
        assert r["gbps_input_wall"] == pytest.approx(r["input_bytes"] / w["p50"] / 1e9)
        floor = rows[("floor", f"floor-{r['inputs']}")]
        assert r["ratio_to_floor_wall"] == pytest.approx(w["p50"] / floor["wall_s"]["p50"])
        assert 20e6 < r["peak_rss_bytes"] < 4e9  # a Python process holding torch, not its parent's
        assert r["work_s_p50"] is not None and 0 < r["work_s_p50"] < w["p50"]
        assert 0 <= r["others_cpu_share_p50"] <= max(r["others_cpu_share_all"]) <= result["load"]["others_cpu_share_max"] <= 1


def test_bench_synthetic_writes_json_png_markdown(capsys, tmp_path):
    methods = "slerp,ties" + (",fuse" if _fuse_available() else "")
    argv = ["bench", "--synthetic", "tiny", "--methods", methods, "--repeat", "2", "--threads", "2", "--workdir", tmp_path / "w",
            "--json", tmp_path / "r.json", "--plot", tmp_path / "r.png", "--markdown", tmp_path / "r.md"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    order = [(r["op"], r["provider"]) for r in result["rows"]]
    want = [("floor", "floor-2"), ("slerp", "cpift"), ("floor", "floor-3"), ("ties", "cpift")]
    assert order == want + ([("fuse", "cpift")] if "fuse" in methods else [])
    models = tmp_path / "w" / "models-tiny"
    base, a, b = models / "base", models / "task_a", models / "task_b"
    check_rows(result, {"floor-2": [a, b], "slerp": [a, b], "floor-3": [base, a, b], "ties": [base, a, b],
                        "fuse": [base, a, b]})
    assert result["model"].startswith("synthetic tiny") and result["dtype"] == "BF16" and result["threads"] == 2
    assert json.loads((models / "base" / "config.json").read_text())["hidden_size"] == 64
    # one run per case per repeat, alternating
    runs = [line.split()[1:4] for line in err.splitlines() if line.startswith("run ")]
    assert [r[0] for r in runs] == ["1/2"] * len(order) + ["2/2"] * len(order)
    md = (tmp_path / "r.md").read_text()
    assert md in out and "| slerp | cpift | 2 |" in md and "| floor | floor-3 | 3 |" in md
    png = (tmp_path / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "r.png").shape[0] > 300
    assert not (tmp_path / "w" / "out" / "cpift-slerp").exists()  # outputs are cleaned up


def test_bench_on_given_models(capsys, llama, tmp_path):
    code, out, err = run_cli(capsys, "bench", llama["base"], llama["task1"], llama["task2"], "--methods",
                             "task-arithmetic,linear", "--repeat", "1", "--json", tmp_path / "r.json")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    base, t1, t2 = llama["base"], llama["task1"], llama["task2"]
    check_rows(result, {"floor-3": [base, t1, t2], "task-arithmetic": [base, t1, t2], "floor-2": [t1, t2],
                        "linear": [t1, t2]})
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # the default workdir is temporary


def test_bench_threads_reach_both_tools(tmp_path):
    """--threads N goes to cpift (--threads) and mergekit (-j) alike, and into the results."""
    from cpift.merge.tools.bench_cases import plan_cases
    from cpift.merge.tools.synthetic import PRESETS, make_checkpoint

    models = [make_checkpoint(tmp_path / n, PRESETS["tiny"], seed=i, base_seed=None if i == 0 else 0)
              for i, n in enumerate(["base", "a", "b"])]
    cases = plan_cases(models, ["ties"], tmp_path, mergekit="mergekit-yaml", max_shard_size="5GB", threads=1)
    cmds = {c.provider: c.cmd for c in cases}
    assert cmds["cpift"][-2:] == ("--threads", "1") and cmds["mergekit"][-2:] == ("-j", "1")
    assert "--threads" not in cmds["floor-3"]
    yml = (tmp_path / "mergekit-ties.yml").read_text()
    assert "merge_method: ties" in yml and f"base_model: {models[0]}" in yml and "density: 0.3" in yml


@pytest.mark.skipif(find_mergekit() is None, reason="mergekit-yaml not found (set CPIFT_MERGEKIT_YAML)")
def test_bench_compares_mergekit(capsys, tmp_path):
    code, out, err = run_cli(capsys, "bench", "--synthetic", "tiny", "--methods", "slerp", "--repeat", "1",
                             "--compare-mergekit", "--workdir", tmp_path, "--json", tmp_path / "r.json")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    rows = {(r["op"], r["provider"]): r for r in result["rows"]}
    assert set(rows) == {("floor", "floor-2"), ("slerp", "cpift"), ("slerp", "mergekit")}
    cpift, mk = rows[("slerp", "cpift")], rows[("slerp", "mergekit")]
    assert cpift["speedup_vs_mergekit_wall"] == pytest.approx(mk["wall_s"]["p50"] / cpift["wall_s"]["p50"])
    assert result["mergekit"].startswith("mergekit ")
    parity = result["slerp_parity_vs_mergekit"]
    assert parity["same_names"] and parity["within_1_ulp_fraction"] > 0.999


@pytest.mark.parametrize("argv, fragment", [
    (["bench"], "give MODEL arguments (base first) or --synthetic"),
    (["bench", "{base}", "--synthetic", "tiny"], "not both or neither"),
    (["bench", "{base}"], "at least one task model"),
    (["bench", "--synthetic", "2b"], "--synthetic: '2b' is not PRESET"),
    (["bench", "--synthetic", "7b-layers:x"], "expected a layer count"),
    (["bench", "--synthetic", "1b:int8"], "unknown dtype 'int8'"),
    (["bench", "--synthetic", "tiny", "--methods", "slerp,magic"], "--methods: unknown method 'magic'"),
    (["bench", "--synthetic", "tiny", "--repeat", "0"], "--repeat"),
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
                        "--methods", "slerp", "--repeat", "1", "--workdir", str(tmp_path / "w"),
                        "--results", str(tmp_path / "res"), "--mergekit", ""], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "res" / "merge_throughput.json").read_text())
    assert [(x["op"], x["provider"]) for x in result["rows"]] == [("floor", "floor-2"), ("slerp", "cpift")]
    assert (tmp_path / "res" / "merge_throughput.md").read_text().startswith("# Merge throughput")
