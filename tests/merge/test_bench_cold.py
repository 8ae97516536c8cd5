"""Cold-cache benchmarking without root (merge/tools/page_cache.py, ``cpift-merge bench --cold``): the
inputs are evicted file by file and shown to be out of the page cache, the O_DIRECT disk floor reads
every input byte and writes one model byte for byte, and a cold bench reports each case against it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_bad_input import run_cli

from cpift.merge.tools.bench_cases import DISK
from cpift.merge.tools.page_cache import evict, model_files, resident_fraction
from cpift.merge.tools.synthetic import PRESETS, make_checkpoint


@pytest.fixture
def models(tmp_path):
    return [make_checkpoint(tmp_path / n, PRESETS["tiny"], seed=i, base_seed=None if i == 0 else 0,
                            max_shard_size="100KB") for i, n in enumerate(["base", "a", "b"])]


def test_evict_drops_the_files_from_the_page_cache(models):
    files = model_files(models)
    for f in files:
        f.read_bytes()
    assert resident_fraction(files) == 1.0
    before = {f: f.read_bytes() for f in files}
    evict(files)
    assert resident_fraction(files) == 0.0
    files[0].read_bytes()  # one file read back: that file's share, exactly
    share = -(-files[0].stat().st_size // 4096) / sum(-(-f.stat().st_size // 4096) for f in files)
    assert resident_fraction(files) == pytest.approx(share)
    assert {f: f.read_bytes() for f in files} == before  # the files themselves are untouched


def test_disk_floor_reads_every_byte_and_writes_one_model(models, tmp_path):
    r = subprocess.run([sys.executable, "-c", DISK, str(tmp_path / "out"), *map(str, models)], capture_output=True,
                       text=True, check=True)
    fields = dict(kv.split("=") for kv in r.stdout.split())
    shards = sorted(models[0].glob("*.safetensors"))
    assert len(shards) > 1
    assert int(fields["read_bytes"]) == sum(f.stat().st_size for m in models for f in m.glob("*.safetensors"))
    assert int(fields["written_bytes"]) == sum(f.stat().st_size for f in shards)
    assert [f.name for f in sorted((tmp_path / "out").iterdir())] == [f.name for f in shards]
    assert all((tmp_path / "out" / f.name).read_bytes() == f.read_bytes() for f in shards)


def test_cold_bench_reports_each_case_against_the_disk_floor(capsys, tmp_path):
    argv = ["bench", "--synthetic", "tiny", "--methods", "slerp", "--backends", "torch", "--repeat", "1", "--cold",
            "--workdir", tmp_path / "w", "--json", tmp_path / "r.json", "--markdown", tmp_path / "r.md"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    cold = {r["provider"]: r for r in result["rows"] if "cold_wall_s" in r}
    assert set(cold) == {"floor-physical-2", "floor-python-2", "floor-disk-2", "cpift-torch"}
    assert all(r["cold_wall_s"] > 0 for r in cold.values())
    assert result["cold_cache"].startswith("inputs evicted") and "at most 0.0% of their pages" in result["cold_cache"]
    md = (tmp_path / "r.md").read_text()
    assert "× disk floor" in md and "| slerp | cpift-torch |" in md
    assert sum(line.startswith("cold ") and line.endswith("(inputs evicted)") for line in err.splitlines()) == 4


def test_cold_bench_with_busy_runs_each_case_beside_the_competitors_too(capsys, tmp_path):
    argv = ["bench", "--synthetic", "tiny", "--methods", "slerp", "--backends", "torch", "--repeat", "1", "--cold",
            "--busy", "1", "--workdir", tmp_path / "w", "--json", tmp_path / "r.json", "--markdown", tmp_path / "r.md"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    cold = {(r["provider"], r["condition"]): r for r in rows if "cold_wall_s" in r}
    providers = {"floor-physical-2", "floor-python-2", "floor-disk-2", "cpift-torch"}
    assert set(cold) == {(p, c) for p in providers for c in ("quiet", "busy-1")}
    for p in providers:
        busy, quiet = cold[(p, "busy-1")], cold[(p, "quiet")]
        assert busy["cold_slowdown_vs_quiet"] == pytest.approx(busy["cold_wall_s"] / quiet["cold_wall_s"])
        assert "cold_slowdown_vs_quiet" not in quiet
    md = (tmp_path / "r.md").read_text()
    assert "| slerp | cpift-torch | busy-1 |" in md and "| slerp | cpift-torch | quiet |" in md
    lines = [line for line in err.splitlines() if line.startswith("cold ") and line.endswith("(inputs evicted)")]
    assert sum(" busy-1 " in line for line in lines) == 4 and len(lines) == 8
