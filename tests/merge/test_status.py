"""Exit status, leftovers and advice: an option whose optional package is missing
is refused before anything is written; a finished merge whose stdout reader left exits 141 (128 +
SIGPIPE, the Unix convention for a writer whose reader went away) with no traceback; a write error
advises --resume only where a rerun with the same shard plan can succeed."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_input import assert_user_error, no_output, run_cli
from test_output_safety import sha

from cpift.merge.cpi.cores import compute_cores
from cpift.merge.io.writer import write_error_remedy

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def no_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError


def test_cluster_plot_without_matplotlib_writes_nothing(capsys, llama, tmp_path, no_matplotlib):
    compute_cores(llama["base"], [("a", llama["task1"]), ("b", llama["task2"])], tmp_path / "cores", p=5,
                  progress=False)
    masks = [tmp_path / "cores" / "a.safetensors", tmp_path / "cores" / "b.safetensors"]
    assert_user_error(capsys, ["cluster", *masks, "--json", tmp_path / "j.json", "--plot", tmp_path / "p.png"],
                      "--plot", "matplotlib", inputs=[tmp_path / "cores"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cores"]


def test_bench_plot_without_matplotlib_writes_nothing(capsys, tmp_path, no_matplotlib):
    assert_user_error(capsys, ["bench", "--synthetic", "tiny", "--workdir", tmp_path / "w", "--json", tmp_path / "j",
                               "--plot", tmp_path / "p.png"], "--plot", "matplotlib")
    assert list(tmp_path.iterdir()) == []


def test_finished_merge_with_a_closed_stdout_exits_141_quietly(llama, tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the merge prints its summary
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "cpift.cli.merge_cli", "slerp", str(llama["task1"]),
                           str(llama["task2"]), "-o", str(out)], stdout=write_end, stderr=subprocess.PIPE,
                          text=True, env=env, timeout=600)
    os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()  # the merge was published


def test_output_larger_than_its_file_system_does_not_advise_resume(capsys, llama, tmp_path, monkeypatch):
    class TinyFS:
        f_blocks, f_frsize, f_bavail = 2, 4096, 0

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    monkeypatch.setattr(os, "statvfs", lambda path: TinyFS)
    before = sha(*llama.values())
    err = assert_user_error(capsys, ["slerp", llama["task1"], llama["task2"], "-o", tmp_path / "out"],
                            str(tmp_path / "out"), "more than its file system holds", "choose another -o")
    assert "--resume" not in err
    assert sha(*llama.values()) == before
    no_output(tmp_path)  # no partial directory left for a resume that cannot succeed


@pytest.mark.parametrize("code, limit, sizes, fragment, resumable", [
    (errno.ENOSPC, None, [10**18], "more than its file system holds", False),
    (errno.ENOSPC, None, [10], "free", True),
    (errno.EFBIG, "unlimited", [10**6], "larger than this file system allows", False),
    (errno.EFBIG, 1000, [10**6], "`ulimit -f`", True),
], ids=["enospc-too-large", "enospc-free-space", "efbig-file-system", "efbig-ulimit"])
def test_resume_advised_only_where_it_can_succeed(tmp_path, monkeypatch, code, limit, sizes, fragment, resumable):
    import resource

    if limit is not None:
        soft = resource.RLIM_INFINITY if limit == "unlimited" else limit
        monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, resource.RLIM_INFINITY))
    hint, ok = write_error_remedy(OSError(code, os.strerror(code)), tmp_path, sizes)
    assert fragment in hint and ok is resumable


def test_bench_does_not_mention_cold_runs_unasked(capsys, tmp_path):
    code, out, err = run_cli(capsys, "bench", "--synthetic", "tiny", "--methods", "slerp", "--backends", "torch",
                             "--repeat", "1", "--threads", "1", "--workdir", tmp_path / "w")
    assert code == 0, err
    assert "cold=True" not in out + err and "needs root" not in out + err
