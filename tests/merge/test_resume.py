"""--resume: a merge killed (SIGKILL, a real process) at several points and resumed gives the same bytes
as an uninterrupted run; tampered shards are rewritten; changed options or inputs refuse; a write error
leaves only the resumable partial directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from kill_helpers import digest, killed_run
from test_bad_input import run_cli  # noqa: F401  (work: a fixture)
from test_bad_input import work as work

from cpift.merge import methods
from cpift.merge.io.models import open_models
from cpift.merge.io.resume import MANIFEST

SHARD = "30000"




def argv_of(method: str, m: dict, out: Path, *extra) -> list:
    args = {"slerp": ["slerp", m["task1"], m["task2"], "--t", "0.3"],
            "ties": ["ties", "--base", m["base"], m["task1"], m["task2"], "--density", "0.4"],
            "dare-ties": ["dare-ties", "--base", m["base"], m["task1"], m["task2"], "--seed", "3"]}[method]
    return [*args, "-o", out, "--max-shard-size", SHARD, *extra]


def reference(capsys, method: str, m: dict, tmp_path: Path) -> dict[str, str]:
    code, _, err = run_cli(capsys, *argv_of(method, m, tmp_path / "ref", "-q"))
    assert code == 0, err
    return digest(tmp_path / "ref")


def shard_plan(m: dict, tmp_path: Path) -> list:
    plan = methods.slerp(m["task1"], m["task2"], tmp_path / "plan", t=0.3, max_shard_size=SHARD, dry_run=True)
    assert len(plan.shards) >= 4 and plan.shards[1].tensors >= 2, plan.summary()
    return plan.shards


def resume(capsys, argv: list) -> tuple[str, str]:
    code, out, err = run_cli(capsys, *argv, "--resume")
    assert code == 0, err
    return out, err


def kept(err: str) -> tuple[int, int]:
    m = re.search(r"kept (\d+) of (\d+) output shards", err)
    assert m, err
    return int(m.group(1)), int(m.group(2))


def manifest(partial: Path) -> dict:
    return json.loads((partial / MANIFEST).read_text())


def test_resume_after_first_shard(capsys, llama, tmp_path):
    want = reference(capsys, "slerp", llama, tmp_path)
    out, partial = tmp_path / "out", tmp_path / ".out.cpift-partial"
    killed_run(argv_of("slerp", llama, out), "shard", 1)
    assert not out.exists() and len(manifest(partial)["shards"]) == 1
    stdout, err = resume(capsys, argv_of("slerp", llama, out))
    n_kept, n = kept(err)
    assert n_kept == 1
    total = len(open_models([llama["task1"]])[0].names())
    assert f"slerp: {total - shard_plan(llama, tmp_path)[0].tensors} tensors" in stdout  # shard 1 not recomputed
    assert digest(out) == want and not partial.exists()


@pytest.mark.parametrize("method", ["slerp", "ties", "dare-ties"])
def test_resume_mid_shard(capsys, llama, tmp_path, method):
    """Killed after the first tensor of shard 2 was written (shard 1 finished and recorded)."""
    want = reference(capsys, method, llama, tmp_path)
    first = shard_plan(llama, tmp_path)[0].tensors
    out = tmp_path / "out"
    killed_run(argv_of(method, llama, out), "tensor", first + 1, 1)
    _, err = resume(capsys, argv_of(method, llama, out))
    assert kept(err)[0] == 1
    assert digest(out) == want


def test_interrupt_keeps_the_partial_for_resume(capsys, llama, tmp_path):
    """Ctrl-C (SIGINT) mid-merge: exit 130, a one-line message pointing at --resume, the finished shards kept."""
    want = reference(capsys, "slerp", llama, tmp_path)
    first = shard_plan(llama, tmp_path)[0].tensors
    out, partial = tmp_path / "out", tmp_path / ".out.cpift-partial"
    r = killed_run(argv_of("slerp", llama, out, "-q"), "sigint", first + 1, 1)
    assert r.stderr.strip().splitlines() == ["cpift-merge: aborted; no output was written (rerun with --resume "
                                             "to keep the output shards already finished)"], r.stderr
    assert not out.exists() and len(manifest(partial)["shards"]) == 1
    _, err = resume(capsys, argv_of("slerp", llama, out))
    assert kept(err)[0] == 1
    assert digest(out) == want


def test_resume_inside_first_shard(capsys, llama, tmp_path):
    want = reference(capsys, "slerp", llama, tmp_path)
    out = tmp_path / "out"
    killed_run(argv_of("slerp", llama, out), "tensor", 1, 0)
    _, err = resume(capsys, argv_of("slerp", llama, out))
    assert kept(err)[0] == 0
    assert digest(out) == want


def test_resume_killed_before_final_rename(capsys, llama, tmp_path):
    """The manifest goes just before the rename: the resume starts over, and still writes the same bytes."""
    want = reference(capsys, "slerp", llama, tmp_path)
    out, partial = tmp_path / "out", tmp_path / ".out.cpift-partial"
    killed_run(argv_of("slerp", llama, out), "rename")
    assert not out.exists() and (partial / "model.safetensors.index.json").is_file()
    _, err = resume(capsys, argv_of("slerp", llama, out))
    assert "starting from the beginning" in err
    assert digest(out) == want and not partial.exists()


def test_resume_killed_inside_overwrite_swap(capsys, llama, tmp_path):
    """--overwrite: killed after the old output was moved aside, before the new one took its place."""
    want = reference(capsys, "slerp", llama, tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "linear", llama["task1"], llama["task2"], "-o", out, "-q")
    assert code == 0, err
    killed_run(argv_of("slerp", llama, out, "--overwrite"), "rename")
    assert not out.exists() and (tmp_path / ".out.cpift-old").is_dir()
    n_kept, n = kept(resume(capsys, argv_of("slerp", llama, out, "--overwrite"))[1])
    assert n_kept == n - 1  # every shard but the last, which is never hashed
    assert digest(out) == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref"]  # no trash, no partial left


def test_tampered_shard_is_rewritten(capsys, llama, tmp_path):
    want = reference(capsys, "slerp", llama, tmp_path)
    out, partial = tmp_path / "out", tmp_path / ".out.cpift-partial"
    killed_run(argv_of("slerp", llama, out), "shard", 2)
    first = sorted(manifest(partial)["shards"])[0]
    data = bytearray((partial / first).read_bytes())
    data[-3] ^= 0x40  # one bit of the last tensor: same size, different SHA-256
    (partial / first).write_bytes(bytes(data))
    _, err = resume(capsys, argv_of("slerp", llama, out))
    assert f"{partial / first} does not match its SHA-256" in err
    assert kept(err)[0] == 1
    assert digest(out) == want


@pytest.mark.parametrize("extra, fragment", [
    (["--t", "0.4"], "option 'params.t' changed (0.3 then, 0.4 now)"),
    (["--max-shard-size", "40000"], "option 'max_shard_size' changed"),
    (["--out-dtype", "float32"], "option 'out_dtype' changed"),
], ids=["t", "shard-size", "out-dtype"])
def test_changed_options_refuse(capsys, llama, tmp_path, extra, fragment):
    out, partial = tmp_path / "out", tmp_path / ".out.cpift-partial"
    killed_run(argv_of("slerp", llama, out), "shard", 1)
    before = digest(partial)
    code, _, err = run_cli(capsys, *argv_of("slerp", llama, out), *extra, "--resume")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{out}: cannot resume: {fragment}" in err and "run without --resume" in err
    assert digest(partial) == before and not out.exists()


def test_changed_inputs_refuse(capsys, work, tmp_path):
    out = tmp_path / "out"
    killed_run(argv_of("slerp", work, out), "shard", 1)
    cfg = work["task2"] / "config.json"
    original = cfg.read_text()
    cfg.write_text(original.replace("{", '{\n  "cpift_test": 1,', 1))
    code, _, err = run_cli(capsys, *argv_of("slerp", work, out), "--resume")
    assert code == 2 and f"cannot resume: {cfg} changed since the interrupted merge" in err, err
    cfg.write_text(original)
    shard = sorted(work["task1"].glob("*.safetensors"))[1]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # rewritten in place
    code, _, err = run_cli(capsys, *argv_of("slerp", work, out), "--resume")
    assert code == 2 and f"cannot resume: {shard} changed since the interrupted merge" in err, err
    code, _, err = run_cli(capsys, *argv_of("slerp", work, out), "-q")  # without --resume: starts over
    assert code == 0, err


def test_resume_with_nothing_to_resume(capsys, llama, tmp_path):
    want = reference(capsys, "slerp", llama, tmp_path)
    _, err = resume(capsys, argv_of("slerp", llama, tmp_path / "out"))
    assert "no unfinished merge" in err
    assert digest(tmp_path / "out") == want


def test_write_error_leaves_resumable_partial(capsys, llama, tmp_path):
    """A file-size limit below the largest shard: one line naming the output, exit 2, no output, the
    partial directory kept; --resume after the limit is lifted finishes with the right bytes."""
    want = reference(capsys, "slerp", llama, tmp_path)
    shards = shard_plan(llama, tmp_path)
    limit = max(s.nbytes for s in shards) - 1
    code = (f"import resource, signal, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}));"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
            "from cpift.cli.merge_cli import main; main(sys.argv[1:])")
    out, partial = tmp_path / "out", tmp_path / ".out.cpift-partial"
    r = subprocess.run([sys.executable, "-c", code, *map(str, argv_of("slerp", llama, out, "-q"))],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"cpift-merge: error: {out}: cannot write the output: File too large"), r.stderr
    assert "--resume" in r.stderr
    assert not out.exists() and (partial / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [partial.name]
    resume(capsys, argv_of("slerp", llama, out))
    assert digest(out) == want
