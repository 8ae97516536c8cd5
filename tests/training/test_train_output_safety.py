"""cpift-train never writes over what it did not write: sft -o, eval --json, pipeline -o (merge/io/publish.py).

Every refusal: exit code 2, one line on stderr naming the path, no traceback, inputs byte-identical.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from training_helpers import run_cli, write_jsonl

from cpift.merge.io.publish import MARKER


def sha(*paths: Path) -> dict[str, str]:
    out = {}
    for root in paths:
        for p in ([root] if root.is_file() else sorted(root.rglob("*"))):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(capsys, argv, fragments, *, watch) -> str:
    before = sha(*watch)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "", (code, out, err)
    assert err.count("\n") == 1 and err.startswith("cpift-train: error: ") and "Traceback" not in err, err
    for f in fragments:
        assert str(f) in err, (f, err)
    assert sha(*watch) == before, "an input changed"
    return err


@pytest.fixture
def model(tiny, tmp_path) -> Path:
    path = tmp_path / "model"
    shutil.copytree(tiny, path)
    return path


SFT = ("--steps", 1, "--batch-size", 2, "-q", "--threads", 1)


def test_sft_out_is_the_model(capsys, model, train_file):
    refused(capsys, ["sft", "--model", model, "--train", train_file, "-o", model, "--overwrite", *SFT],
            [model, "is the input"], watch=[model, train_file])
    assert not any(p.name.startswith(".") for p in model.parent.iterdir())


def test_sft_out_inside_the_model_or_around_the_data(capsys, model, train_file, tmp_path):
    refused(capsys, ["sft", "--model", model, "--train", train_file, "-o", model / "ft", *SFT],
            [model / "ft", "lies inside the input"], watch=[model, train_file])
    (tmp_path / "d").mkdir()
    data = write_jsonl(tmp_path / "d" / "train.jsonl", [{"prompt": "1+1=", "response": "2"}] * 4)
    (tmp_path / "d" / MARKER).write_text("{}")
    refused(capsys, ["sft", "--model", model, "--train", data, "-o", tmp_path / "d", "--overwrite", *SFT],
            [tmp_path / "d", "contains the input"], watch=[model, data])


def test_sft_overwrite_replaces_only_its_own_output(capsys, model, train_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    refused(capsys, ["sft", "--model", model, "--train", train_file, "-o", out, "--overwrite", *SFT],
            [out, "cpift did not write"], watch=[model, train_file, out])
    (out / "mine.txt").unlink()
    for _ in range(2):  # an empty directory, then the previous run's output
        code, _, err = run_cli(capsys, "sft", "--model", model, "--train", train_file, "-o", out, "--overwrite", *SFT)
        assert code == 0, err
        assert (out / MARKER).is_file() and (out / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]


def test_eval_json_never_over_its_inputs(capsys, model, tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "1+1=", "response": "2"}])
    refused(capsys, ["eval", "--model", model, "--data", data, "--json", data], [data, "is the input"],
            watch=[model, data])
    refused(capsys, ["eval", "--model", model, "--data", data, "--json", model / "config.json"],
            [model / "config.json", "lies inside the input"], watch=[model, data])


def test_pipeline_workdir_refusals(capsys, model, train_file, tmp_path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"base: {model}\ntasks:\n  - {{name: a, train: {train_file}, eval: {train_file}}}\n"
                      f"  - {{name: b, train: {train_file}, eval: {train_file}}}\n"
                      "probe: {steps: 1, batch_size: 2}\ntrain: {steps_per_task: 1, batch_size: 2}\n"
                      "calibration: {examples: 2, steps_per_task: 1, batch_size: 2}\n")
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    for wd, fragment in ((tmp_path, "contains the input"), (model / "wd", "lies inside the input"),
                         (user, "not a pipeline WORKDIR"), (recipe, "is a file")):
        refused(capsys, ["pipeline", recipe, "-o", wd, "-q"], [wd, fragment], watch=[model, recipe, user])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "recipe.yml", "user"]
