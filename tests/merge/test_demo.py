"""``cpift-merge demo`` writes only into directories it created.

A user's model in the workdir (single file or sharded) is refused in one line naming it, exit 2,
left byte-identical, and nothing is added next to it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from test_bad_input import run_cli
from test_output_safety import refused, sha

from cpift.merge.tools.demo import DEMO_MARKER, METHODS


def _user_model(path: Path, src: Path, *, sharded: bool) -> Path:
    """A real model of the user's (transformers-saved), sharded as saved or joined into one file."""
    if sharded:
        shutil.copytree(src, path)
        return path
    path.mkdir(parents=True)
    state = {}
    for shard in sorted(src.glob("*.safetensors")):
        state.update(load_file(shard))
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(src / "config.json", path / "config.json")
    return path


@pytest.mark.parametrize("sub", ["base", "task_a"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_demo_refuses_a_user_model_in_its_workdir(capsys, llama, tmp_path, sub, sharded):
    proj = tmp_path / "proj"
    mine = _user_model(proj / "models" / sub, llama["base"], sharded=sharded)
    before = sorted(p.relative_to(proj) for p in proj.rglob("*"))
    refused(capsys, ["demo", "--workdir", proj], [mine, "not created by cpift-merge demo"], watch=[proj])
    assert sorted(p.relative_to(proj) for p in proj.rglob("*")) == before  # nothing added beside it
    assert (mine / "config.json").is_file()


def test_demo_refuses_a_user_model_put_into_its_own_workdir(capsys, llama, tmp_path):
    """After a demo, the user replaces its models/task_b by their own model: the next demo refuses it
    before writing anything (not after rebuilding base and task_a)."""
    proj = tmp_path / "proj"
    code, _, err = run_cli(capsys, "demo", "--workdir", proj)
    assert code == 0, err
    shutil.rmtree(proj / "models" / "task_b")
    _user_model(proj / "models" / "task_b", llama["base"], sharded=True)
    refused(capsys, ["demo", "--workdir", proj], [proj / "models" / "task_b", "cpift did not write"], watch=[proj])


def test_demo_reruns_in_its_own_workdir_and_in_an_empty_one(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    for _ in range(2):
        code, out, err = run_cli(capsys, "demo", "--workdir", tmp_path / "empty")
        assert code == 0, err
    assert (tmp_path / "empty" / DEMO_MARKER).is_file()
    before = sha(tmp_path / "empty" / "models")
    code, _, err = run_cli(capsys, "demo", "--workdir", tmp_path / "empty")
    assert code == 0 and sha(tmp_path / "empty" / "models") == before, err  # same seeds, same bytes


def test_demo_refuses_a_workdir_holding_anything_else(capsys, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "notes.txt").write_text("mine")
    refused(capsys, ["demo", "--workdir", proj], [proj, "not created by cpift-merge demo"], watch=[proj])
    assert sorted(p.name for p in proj.iterdir()) == ["notes.txt"]


def test_demo_without_workdir_names_no_deleted_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    code, out, err = run_cli(capsys, "demo")
    assert code == 0, err
    assert list(tmp_path.iterdir()) == []  # removed
    assert str(tmp_path) not in out and "$ cpift-merge" not in out and "from_pretrained" not in out
    assert "rerun with --workdir DIR" in out
    assert "'hidden': 64" in out  # the tiny preset, the fast one, by default


def test_demo_help_names_the_methods_it_runs_and_defaults_to_tiny(capsys):
    code, out, _ = run_cli(capsys, "demo", "--help")
    assert code == 0
    text = " ".join(out.split())
    assert "every method" not in text and "default: tiny" in text
    assert f"{', '.join(METHODS[:-1])} and {METHODS[-1]}" in text


def test_merge_help_names_every_kind_of_model_argument(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    text = " ".join(out.split())
    for kind in ("model.safetensors", "pytorch_model.bin", "ORG/NAME[@REVISION]", "LoRA adapter directories",
                 "BASE+ADAPTER"):
        assert kind in text, kind
