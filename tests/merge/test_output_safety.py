"""Outputs never destroy anything cpift did not write (docs/safety.md#data-safety, merge/io/publish.py).

Every refusal: exit code 2, one line on stderr naming the path, no traceback, every input file
byte-identical, nothing finished-looking at -o, an old output intact where one existed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kill_helpers import killed_run
from safetensors import safe_open
from test_bad_input import run_cli

from cpift.errors import OutputBusyError, OutputError, UnsafeOutputError
from cpift.merge import methods
from cpift.merge.io import publish
from cpift.merge.io.publish import MARKER, Publication, check_output, check_side_file, write_atomic


def sha(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file under (or at) each path; FIFOs and other non-files are listed by kind."""
    out = {}
    for root in paths:
        items = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
        for p in items:
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.exists() and not p.is_dir():
                out[str(p)] = "special"
    return out


@pytest.fixture
def own(llama, tmp_path):
    """Private copies of the tiny llama family (some tests aim -o at them)."""
    out = {}
    for name in ("base", "task1", "task2"):
        out[name] = tmp_path / "in" / name
        shutil.copytree(llama[name], out[name])
    return out


def refused(capsys, argv, fragments, *, watch, prog_main=None) -> str:
    before = sha(*watch)
    code, out, err = run_cli(capsys, *argv) if prog_main is None else prog_main(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and ": error: " in lines[0], err
    assert "Traceback" not in err
    for f in fragments:
        assert str(f) in err, (f, err)
    assert sha(*watch) == before, "an input or an old output changed"
    return err


@pytest.mark.parametrize("method", ["slerp", "ties"])
def test_out_is_an_input_with_overwrite(capsys, own, method):
    target = own["task1"] if method == "slerp" else own["base"]
    argv = (["slerp", own["task1"], own["task2"]] if method == "slerp"
            else ["ties", "--base", own["base"], own["task1"], own["task2"]])
    refused(capsys, [*argv, "-o", target, "--overwrite", "-q"], [target, "is the input"], watch=own.values())
    assert not any(p.name.startswith(".") for p in target.parent.iterdir())  # no partial, no trash


def test_out_dotdot_spelling_of_an_input(capsys, own):
    out = own["task1"] / ".." / "task1"
    refused(capsys, ["slerp", own["task1"], own["task2"], "-o", out, "--overwrite"], [out, "is the input"],
            watch=own.values())
    assert own["task1"].is_dir()


def test_out_inside_an_input(capsys, own):
    out = own["task1"] / "merged"
    refused(capsys, ["slerp", own["task1"], own["task2"], "-o", out], [out, "lies inside the input"],
            watch=own.values())
    assert not out.exists()


def test_out_contains_an_input(capsys, own, tmp_path):
    out = tmp_path / "in"
    (out / MARKER).write_text("{}")  # even a directory marked as cpift's is refused while it holds an input
    refused(capsys, ["slerp", own["task1"], own["task2"], "-o", out, "--overwrite"], [out, "contains the input"],
            watch=own.values())


def test_out_is_a_symlink_to_an_input(capsys, own, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(own["task2"], target_is_directory=True)
    refused(capsys, ["slerp", own["task1"], own["task2"], "-o", link, "--overwrite"], [link, "is the input"],
            watch=[*own.values(), link])
    assert link.is_symlink()


def test_out_is_the_tokenizer_donor(capsys, own, tmp_path):
    donor = tmp_path / "donor"
    shutil.copytree(own["base"], donor)
    (donor / MARKER).write_text("{}")
    refused(capsys, ["slerp", own["task1"], own["task2"], "--copy-tokenizer-from", donor, "-o", donor,
                     "--overwrite"], [donor, "is the input"], watch=[*own.values(), donor])


def test_out_is_a_regular_file(capsys, own, tmp_path):
    out = tmp_path / "file"
    out.write_text("user data")
    for extra in ([], ["--overwrite"]):
        refused(capsys, ["slerp", own["task1"], own["task2"], "-o", out, *extra], [out], watch=[*own.values(), out])
    with pytest.raises(UnsafeOutputError, match="is a file, not a directory"):
        check_output(out, overwrite=True)
    assert out.read_text() == "user data"


def test_out_is_a_fifo(capsys, own, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused(capsys, ["slerp", own["task1"], own["task2"], "-o", fifo, "--overwrite"], [fifo, "is a FIFO"],
            watch=own.values())
    assert fifo.exists() and not fifo.is_dir() and not fifo.is_file()


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_user_directory_is_never_replaced(capsys, own, tmp_path, overwrite):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "data.bin").write_bytes(os.urandom(64))
    extra = ["--overwrite"] if overwrite else []
    err = refused(capsys, ["slerp", own["task1"], own["task2"], "-o", out, *extra], [out],
                  watch=[*own.values(), out])
    assert ("cpift did not write" if overwrite else "--overwrite") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "mine"]


def test_overwrite_replaces_a_previous_cpift_output(capsys, own, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "linear", own["task1"], own["task2"], "-o", out, "-q")
    assert code == 0, err
    assert (out / MARKER).is_file()
    code, _, err = run_cli(capsys, "slerp", own["task1"], own["task2"], "-o", out, "--overwrite", "-q")
    assert code == 0, err
    ref = tmp_path / "ref"
    methods.slerp(own["task1"], own["task2"], ref, progress=False)
    assert sha(out) == {k.replace(str(ref), str(out)): v for k, v in sha(ref).items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out", "ref"]


@pytest.mark.parametrize("where", ["notes.txt", "sub/notes.txt"], ids=["top", "nested"])
def test_overwrite_never_deletes_a_file_the_user_added(capsys, own, tmp_path, where):
    """The marker proves the directory is cpift's, its file list which files are."""
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "linear", own["task1"], own["task2"], "-o", out, "-q")
    assert code == 0, err
    (out / where).parent.mkdir(exist_ok=True)
    (out / where).write_text("the user's own notes")
    refused(capsys, ["slerp", own["task1"], own["task2"], "-o", out, "--overwrite"],
            [out / where.split("/")[0], "not written by cpift"], watch=[*own.values(), out])
    assert (out / where).read_text() == "the user's own notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_output_of_a_cpift_that_listed_nothing_is_not_replaced(capsys, own, tmp_path):
    """A marker without a file list (older cpift) cannot tell the user's files from cpift's: refused."""
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "linear", own["task1"], own["task2"], "-o", out, "-q")
    assert code == 0, err
    (out / MARKER).write_text(publish.MARKER_TEXT)
    refused(capsys, ["slerp", own["task1"], own["task2"], "-o", out, "--overwrite"], ["not written by cpift"],
            watch=[*own.values(), out])


def test_empty_directory_may_be_overwritten(capsys, own, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    refused(capsys, ["slerp", own["task1"], own["task2"], "-o", out], [out, "--overwrite"], watch=own.values())
    code, _, err = run_cli(capsys, "slerp", own["task1"], own["task2"], "-o", out, "--overwrite", "-q")
    assert code == 0 and (out / "model.safetensors").is_file(), err


def test_cores_out_is_a_task_model(capsys, own):
    refused(capsys, ["cores", "--base", own["base"], "--model", f"a={own['task1']}", "-o", own["task1"],
                     "--overwrite", "-q"], [own["task1"], "is the input"], watch=own.values())


def test_fuse_and_config_recipe_inside_the_output(capsys, own, tmp_path):
    cores = tmp_path / "cores"
    code, _, err = run_cli(capsys, "cores", "--base", own["base"], "--model", f"a={own['task1']}", "--model",
                           f"b={own['task2']}", "-o", cores, "-q")
    assert code == 0, err
    tasks = ["--task", f"a={own['task1']}:{cores / 'a.safetensors'}",
             "--task", f"b={own['task2']}:{cores / 'b.safetensors'}"]
    # the masks directory is a cpift output, but fuse reads its masks: refused, even with --overwrite
    refused(capsys, ["fuse", "--backbone", own["base"], *tasks, "-o", cores, "--overwrite"],
            [cores, "contains the input"], watch=[*own.values(), cores])
    # replaying a recipe into the directory that holds it
    refused(capsys, ["config", cores / "cpift_recipe.yml", "-o", cores, "--overwrite"],
            [cores, "contains the input"], watch=[*own.values(), cores])


def test_cluster_json_and_plot_never_over_a_mask(capsys, own, tmp_path):
    cores = tmp_path / "cores"
    code, _, err = run_cli(capsys, "cores", "--base", own["base"], "--model", f"a={own['task1']}", "--model",
                           f"b={own['task2']}", "-o", cores, "-q")
    assert code == 0, err
    masks = [cores / "a.safetensors", cores / "b.safetensors"]
    for option in ("--json", "--plot"):
        refused(capsys, ["cluster", *masks, option, masks[0]], [masks[0], "is the input"], watch=[cores])
    refused(capsys, ["cluster", *masks, "--json", tmp_path], [tmp_path, "is a directory"], watch=[cores])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cores", "in"]


def test_side_files_are_atomic_and_refuse_non_files(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    write_atomic(target, "new\n")
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for bad, kind in ((fifo, "a FIFO"), (tmp_path, "a directory")):
        with pytest.raises(UnsafeOutputError, match=kind):
            check_side_file(bad)
    with pytest.raises(UnsafeOutputError, match="is the input"):
        write_atomic(target, "x", inputs=[target])
    assert target.read_text() == "new\n"


def test_protected_paths_are_refused_before_anything_is_touched(tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "work" / "cwd"
    home.mkdir()
    cwd.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    before = sha(tmp_path)
    listing = sorted(str(p) for p in tmp_path.rglob("*"))
    for path in (home, tmp_path, cwd, Path("."), cwd.parent, Path("/")):
        for overwrite in (False, True):
            with pytest.raises(UnsafeOutputError, match="current directory|home directory"):
                check_output(path, overwrite=overwrite)
    with pytest.raises(UnsafeOutputError):
        check_side_file(home)
    assert sha(tmp_path) == before and sorted(str(p) for p in tmp_path.rglob("*")) == listing


def test_cwd_as_output_on_the_cli(capsys, own, tmp_path, monkeypatch):
    work = tmp_path / "w"
    work.mkdir()
    (work / MARKER).write_text("{}")  # even a cpift output is not replaced while it is the cwd
    monkeypatch.chdir(work)
    refused(capsys, ["slerp", own["task1"], own["task2"], "-o", ".", "--overwrite"], ["current directory"],
            watch=[*own.values(), work])


def test_second_run_on_a_locked_partial_is_refused(tmp_path):
    out = tmp_path / "out"
    first = Publication(out, overwrite=False)
    first.begin()
    try:
        with pytest.raises(OutputBusyError, match="in use by another cpift run"):
            Publication(out, overwrite=False).begin()
    finally:
        first.abort()
    assert list(tmp_path.iterdir()) == []


def test_stale_aside_path_not_written_by_cpift(capsys, own, tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.cpift-old"
    stale.mkdir()
    (stale / "mine.txt").write_text("x")
    refused(capsys, ["slerp", own["task1"], own["task2"], "-o", out], [stale, "not written by cpift"],
            watch=[*own.values(), stale])


def test_crash_between_aside_and_in_is_recoverable(capsys, own, tmp_path):
    """Killed after the old output went aside: OUT is absent, the old output sits complete in .OUT.cpift-old
    and the new complete one in .OUT.cpift-partial. Rerunning the command finishes the swap."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    methods.slerp(own["task1"], own["task2"], ref, t=0.3, progress=False)
    code, _, err = run_cli(capsys, "linear", own["task1"], own["task2"], "-o", out, "-q")
    assert code == 0, err
    old = {k.replace(str(out), ""): v for k, v in sha(out).items()}
    argv = ["slerp", own["task1"], own["task2"], "--t", "0.3", "-o", out, "--overwrite", "-q"]
    killed_run(argv, "rename")
    aside, partial = tmp_path / ".out.cpift-old", tmp_path / ".out.cpift-partial"
    assert not out.exists()
    assert {k.replace(str(aside), ""): v for k, v in sha(aside).items()} == old  # the old output, complete
    assert (partial / "model.safetensors").is_file() and (partial / "README.md").is_file()
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert {k.replace(str(out), ""): v for k, v in sha(out).items()} == \
        {k.replace(str(ref), ""): v for k, v in sha(ref).items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out", "ref"]


SLOW = """
import os, sys, time
import cpift.merge.io.writer as writer
gate = sys.argv[1]
written = writer.ShardWriter.written
def held(self, name):
    written(self, name)
    while not os.path.exists(gate):  # the merge waits, lock held, until the test opens the gate
        time.sleep(0.02)
writer.ShardWriter.written = held
from cpift.cli.merge_cli import main
main(sys.argv[2:])
"""


def test_two_real_processes_on_one_output(own, tmp_path):
    out, partial = tmp_path / "out", tmp_path / ".out.cpift-partial"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    gate = tmp_path / "go"
    slow = subprocess.Popen([sys.executable, "-c", SLOW, str(gate), "slerp", str(own["task1"]), str(own["task2"]),
                             "--t", "0.3",
                             "-o", str(out), "-q", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.monotonic() + 120
    while not (partial / "model.safetensors").exists():  # the first run holds the lock once its shards exist
        assert slow.poll() is None and time.monotonic() < deadline, slow.communicate()
        time.sleep(0.02)
    start = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "cpift.cli.merge_cli", "linear", str(own["task1"]),
                             str(own["task2"]), "-o", str(out), "-q", "--threads", "1"],
                            capture_output=True, text=True, env=env)
    assert slow.poll() is None, "the first run ended before the second was refused; the test proves nothing"
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by another cpift run" in lines[0] and str(out) in lines[0]
    assert "Traceback" not in second.stderr and time.monotonic() - start < 60
    gate.write_text("")
    _, err = slow.communicate(timeout=300)
    assert slow.returncode == 0, err
    ref = tmp_path / "ref"
    methods.slerp(own["task1"], own["task2"], ref, t=0.3, progress=False)
    assert {k.replace(str(out), ""): v for k, v in sha(out).items()} == \
        {k.replace(str(ref), ""): v for k, v in sha(ref).items()}  # tensors, card and recipe all slerp's
    with safe_open(out / "model.safetensors" if (out / "model.safetensors").exists()
                   else sorted(out.glob("model-*.safetensors"))[0], "pt") as f:
        assert f.metadata()["cpift_method"] == "slerp"
    assert "slerp" in (out / "cpift_recipe.yml").read_text()


def test_commit_refuses_an_output_published_meanwhile(tmp_path):
    out = tmp_path / "out"
    pub = Publication(out, overwrite=False)
    tmp = pub.begin()
    (tmp / "a").write_text("new")
    out.mkdir()
    (out / "user.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        pub.commit()
    assert (out / "user.txt").read_text() == "mine" and (tmp / "a").read_text() == "new"
    assert publish.is_cpift_output(tmp)


def test_bench_workdir_never_removes_what_it_did_not_build(tmp_path):
    """A stale model or an output folder in --workdir that the bench did not make is refused, not removed."""
    from cpift.errors import BenchError
    from cpift.merge.tools.bench import OUT_MARKER, run_bench
    from cpift.merge.tools.synthetic import SYNTHETIC_MARKER, synthetic_models

    work = tmp_path / "work"
    user_model = work / "models-tiny" / "base"
    user_model.mkdir(parents=True)
    (user_model / "notes.txt").write_text("mine")
    with pytest.raises(BenchError, match="not built by cpift-merge bench"):
        synthetic_models(work, "tiny", echo=lambda s: None)
    assert (user_model / "notes.txt").read_text() == "mine"

    work2 = tmp_path / "work2"
    built = synthetic_models(work2, "tiny", echo=lambda s: None)
    assert all((p / SYNTHETIC_MARKER).is_file() for p in built)
    (built[0] / "config.json").write_text("{}")  # stale: rebuilt, since the bench built it
    again = synthetic_models(work2, "tiny", echo=lambda s: None)
    assert again == built and (built[0] / "config.json").read_text() != "{}"

    (work2 / "out").mkdir()
    (work2 / "out" / "keep.txt").write_text("mine")
    with pytest.raises(BenchError, match="not made by cpift-merge bench"):
        run_bench(synthetic="tiny", workdir=work2, methods=["slerp"], repeat=1, echo=lambda s: None)
    assert (work2 / "out" / "keep.txt").read_text() == "mine"
    assert not (work2 / "out" / OUT_MARKER).exists()
