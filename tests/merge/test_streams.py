"""Config and recipe files named on the command line: one rule,
merge/io/safe_parse.py ``read_user_text``. A FIFO with no writer ends in one line naming it within
10 s (never a hang); a process substitution ``<(cat good.yml)`` works (read once, its text kept for the
second reader); a device is refused before reading."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_output_safety import sha

from cpift.cli.merge_cli import main as merge_main
from cpift.cli.train_cli import main as train_main
from cpift.errors import ConfigError
from cpift.merge.io.safe_parse import read_user_text

SRC = str(Path(__file__).resolve().parents[2] / "src")


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (not stall) a test whose code blocks: SIGALRM raises out of a blocking system call."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _run(main, capsys, *argv) -> tuple[int, str, float]:
    t0 = time.monotonic()
    with deadline(20), pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    return exc.value.code, capsys.readouterr().err, time.monotonic() - t0


@pytest.mark.parametrize("main, argv", [
    (merge_main, ["config", "{fifo}", "-o", "{out}"]),
    (train_main, ["pipeline", "{fifo}", "-o", "{out}"]),
], ids=["merge-config", "train-pipeline"])
def test_fifo_without_a_writer_ends_in_one_line(capsys, tmp_path, main, argv):
    fifo = tmp_path / "config.yml"
    os.mkfifo(fifo)
    code, err, took = _run(main, capsys, *(a.format(fifo=fifo, out=tmp_path / "out") for a in argv))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and str(fifo) in lines[0] and "FIFO" in lines[0], err
    assert "Traceback" not in err and took < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yml"]  # nothing at -o


@pytest.mark.parametrize("main, argv", [
    (merge_main, ["config", "/dev/zero", "-o", "{out}"]),
    (train_main, ["pipeline", "/dev/zero", "-o", "{out}"]),
], ids=["merge-config", "train-pipeline"])
def test_device_as_config_is_refused(capsys, tmp_path, main, argv):
    code, err, took = _run(main, capsys, *(a.format(out=tmp_path / "out") for a in argv))
    assert code == 2 and err.count("\n") == 1 and "/dev/zero" in err and "device" in err, err
    assert took < 10 and not (tmp_path / "out").exists()


def test_config_from_a_process_substitution_runs(llama, tmp_path):
    """``config <(cat good.yml)``: the YAML is looked at twice (a cores/fuse recipe? a mergekit config?)."""
    good = tmp_path / "good.yml"
    good.write_text(f"merge_method: linear\nmodels:\n  - model: {llama['task1']}\n    parameters: {{weight: 1.0}}\n"
                    f"  - model: {llama['task2']}\n    parameters: {{weight: 3.0}}\ndtype: float32\n")
    before = sha(good, llama["task1"], llama["task2"])
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for out, arg in (("piped", f"<(cat {shlex.quote(str(good))})"), ("plain", shlex.quote(str(good)))):
        script = f"{shlex.quote(sys.executable)} -m cpift.cli.merge_cli config {arg} -q -o {tmp_path / out}"
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
    piped, plain = (tmp_path / d / "model.safetensors" for d in ("piped", "plain"))
    assert piped.read_bytes() == plain.read_bytes()
    assert sha(good, llama["task1"], llama["task2"]) == before


def test_stream_is_read_once_and_bounded(tmp_path):
    fifo = tmp_path / "f.yml"
    os.mkfifo(fifo)

    def writer(path: Path, text: bytes, hold: float) -> None:
        with open(path, "wb") as f:
            f.write(text)
            f.flush()
            time.sleep(hold)  # a writer that keeps its end open

    t = threading.Thread(target=writer, args=(fifo, b"a: 1\n", 0.0))
    t.start()
    assert read_user_text(fifo) == "a: 1\n"
    t.join()
    assert read_user_text(fifo) == "a: 1\n"  # the second reader of the same stream: the same text, no wait
    stalled = tmp_path / "g.yml"
    os.mkfifo(stalled)
    t = threading.Thread(target=writer, args=(stalled, b"a: 2\n", 3.0))
    t.start()
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="no writer finished"):
        read_user_text(stalled, wait=1.0)
    assert time.monotonic() - t0 < 2.5
    t.join()
