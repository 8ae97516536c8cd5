"""cpift-train example: the tiny model and data the README's training sessions start from; it writes only
new files (an existing one is refused in one line, exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest
from training_helpers import run_cli

from cpift.training.recipe import load_recipe
from cpift.training.tiny import TASKS, example_files


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_example_writes_the_model_data_and_a_recipe_that_loads(tmp_path, capsys):
    code, out, err = run_cli(capsys, "example", "--workdir", tmp_path)
    assert code == 0, err
    names = list(example_files())
    assert out == f"wrote {', '.join(names)} in {tmp_path}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no partial left behind
    assert ({"config.json", "model.safetensors", "tokenizer.json"}
            <= {p.name for p in (tmp_path / "tiny-llama").iterdir()})
    sums = rows(tmp_path / "sums.jsonl")
    assert len(sums) == 512 and len(rows(tmp_path / "sums-test.jsonl")) == 64
    assert all(int(r["prompt"][0]) + int(r["prompt"][2]) == int(r["response"]) for r in sums)
    for task, make in TASKS.items():
        for name, n in ((f"{task}.jsonl", 256), (f"{task}-test.jsonl", 32)):
            data = rows(tmp_path / name)
            assert len(data) == n and len({r["prompt"] for r in data}) > 1
            for r in data:
                digits = [int(c) for c in r["prompt"] if c.isdigit()]
                assert (r["prompt"], r["response"]) == make(*digits)
    recipe = load_recipe(tmp_path / "recipe.yml")
    assert [t.name for t in recipe.tasks] == list(TASKS)


@pytest.mark.parametrize("existing", ["sums.jsonl", "recipe.yml", "tiny-llama"])
def test_example_refuses_an_existing_name_and_writes_nothing(tmp_path, capsys, existing):
    target = tmp_path / existing
    if existing == "tiny-llama":
        target.mkdir()
        (target / "mine.txt").write_text("user data")
    else:
        target.write_text("user data\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out, err = run_cli(capsys, "example", "--workdir", tmp_path)
    assert code == 2 and out == ""
    assert err == (f"cpift-train: error: {target}: already exists; cpift-train example writes only new files "
                   f"(use an empty directory)\n")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    kept = target / "mine.txt" if existing == "tiny-llama" else target
    assert kept.read_text().startswith("user data")


def test_example_needs_an_existing_directory(tmp_path, capsys):
    code, out, err = run_cli(capsys, "example", "--workdir", tmp_path / "missing")
    assert (code, out) == (2, "")
    assert err == f"cpift-train: error: {tmp_path / 'missing'}: not a directory (create it first)\n"
    assert not (tmp_path / "missing").exists()
