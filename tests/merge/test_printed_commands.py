"""Every `$ cpift-merge ...` line the demo prints runs as typed, in the order printed, and writes the
same model the demo wrote under the -o it names."""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

import pytest

from cpift.cli.merge_cli import main


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def test_demo_commands_run_as_typed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, ["demo", "--size", "tiny", "--workdir", "w"])
    assert code == 0, err
    commands = [line[2:] for line in out.splitlines() if line.startswith("$ ")]
    assert len(commands) == 8 and all(c.startswith("cpift-merge ") for c in commands)
    for command in commands:
        argv = shlex.split(command)[1:]
        target = Path(argv[argv.index("-o") + 1]) if "-o" in argv else None
        before = _hashes(target) if target is not None else None
        code, stdout, err = _run(capsys, argv)
        assert code == 0, (command, err)
        if target is None:
            assert "groups (Jaccard" in stdout, command
            continue
        assert target.is_dir() and not target.is_absolute(), command
        assert _hashes(target) == before, f"{command}: not what the demo wrote"
        assert str(tmp_path) not in command
