"""cpift-train from the command line: help, a real run, and bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest
from training_helpers import load_state, make_model, run_cli, write_jsonl, write_mask


@pytest.mark.parametrize("command", [[], ["sft"], ["eval"]], ids=["group", "sft", "eval"])
def test_help_explains_every_option(capsys, command):
    code, out, _ = run_cli(capsys, *command, "--help")
    assert code == 0 and "Usage: cpift-train" in out
    if command == ["sft"]:
        for option in ("--model", "--train", "--out", "--eval", "--steps", "--epochs", "--lr", "--weight-decay",
                       "--batch-size", "--grad-accum", "--max-length", "--warmup", "--max-grad-norm", "--seed",
                       "--freeze", "--overwrite", "--device", "--threads"):
            assert option in out, option
        flat = " ".join(out.split())  # the help wraps with the width of the longest option
        assert "all torchrun processes" in flat and "Tokens kept per example" in flat
        for option in ("--fsdp", "--activation-checkpointing", "--save-dtype"):
            assert option in out, option
    if command == ["eval"]:
        assert "--json" in out and "--max-new-tokens" in out


def test_sft_then_eval(capsys, tiny, train_file, tmp_path):
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "1+2=", "response": "3"},
                                               {"prompt": "4+4=", "response": "8"}])
    code, out, err = run_cli(capsys, "sft", "--model", tiny, "--train", train_file, "--eval", ev, "-o",
                             tmp_path / "out", "--steps", 3, "--lr", 1e-3, "--batch-size", 4, "-q")
    assert code == 0 and out.startswith("sft: 3 steps on 32 examples (0 truncated)") and "(n=2)" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    code, out, _ = run_cli(capsys, "eval", "--model", tmp_path / "out", "--data", ev, "--json", tmp_path / "e.json",
                           "-q")
    assert code == 0 and json.loads(out) == json.loads((tmp_path / "e.json").read_text())
    assert json.loads(out) == pytest.approx(metrics["eval"], rel=1e-6)


def assert_nothing_written(tmp_path, out="out"):
    assert not (tmp_path / out).exists()
    assert not list(tmp_path.glob(f".{out}*"))


def bad_run(capsys, model, data, tmp_path, *extra) -> str:
    code, out, err = run_cli(capsys, "sft", "--model", model, "--train", data, "-o", tmp_path / "out",
                             "--steps", 2, "--batch-size", 2, "-q", *extra)
    assert code == 2 and out == "", (code, out, err)
    assert err.count("\n") == 1 and err.startswith("cpift-train: error: ") and "Traceback" not in err
    assert_nothing_written(tmp_path)
    return err


@pytest.mark.parametrize("lines,message", [
    (['{"prompt": "1+1=", "response": "2"}', '{"prompt": "1+1=", "response": "2"', '{}'],
     "train.jsonl:2: not valid JSON"),
    (['{"prompt": "1+1=", "response": "2"}', '{"prompt": "1+1="}'], "train.jsonl:2: no 'response' field"),
    ([], "train.jsonl: no examples"),
    (['{"prompt": "1+1=", "response": "2"}', '{"prompt": "12345678901234567890", "response": "2"}'],
     "train.jsonl:2: the prompt takes 20 tokens, so max length 16 leaves no response token"),
], ids=["malformed-line", "no-response", "empty", "prompt-too-long"])
def test_bad_data(capsys, tiny, tmp_path, lines, message):
    data = write_jsonl(tmp_path / "train.jsonl", lines) if lines else tmp_path / "train.jsonl"
    if not lines:
        data.write_text("")
    err = bad_run(capsys, tiny, data, tmp_path, "--max-length", 16)
    assert message in err


def test_long_prompt_truncated_and_counted(capsys, tiny, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "1234567890123", "response": "45678"},
                                                  {"prompt": "1+1=", "response": "2"}])
    code, out, _ = run_cli(capsys, "sft", "--model", tiny, "--train", data, "-o", tmp_path / "out", "--steps", 1,
                           "--batch-size", 2, "--max-length", 16, "-q")
    assert code == 0 and "(1 truncated)" in out
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["truncated"] == 1


def test_freeze_mask_for_another_model(capsys, tiny, train_file, tmp_path):
    other = make_model(tmp_path / "other", hidden=48)
    name = "model.layers.0.mlp.up_proj.weight"
    mask, _ = write_mask(tmp_path / "other.safetensors", {name: tuple(load_state(other)[name].shape)})
    err = bad_run(capsys, tiny, train_file, tmp_path, "--freeze", mask)
    assert f"mask tensor '{name}' has shape [96, 48]" in err and "made for another model" in err


@pytest.mark.parametrize("extra,message", [
    (["--steps", 2, "--epochs", 1], "give one of them, not both"),
    (["--lr", 0], "lr: 0 is not > 0"),
    (["--grad-accum", 3], "batch_size: 2 examples cannot fill 3 micro-batch(es)"),
    (["--warmup", 1], "warmup"),
    (["--freeze", "missing.safetensors"], "missing.safetensors: mask file not found"),
    (["--model-typo", "x"], "No such option '--model-typo'"),
], ids=["steps-and-epochs", "lr", "accum", "warmup", "missing-mask", "unknown-option"])
def test_bad_options(capsys, tiny, train_file, tmp_path, extra, message):
    assert message in bad_run(capsys, tiny, train_file, tmp_path, *extra)


def test_missing_model_and_existing_output(capsys, tiny, train_file, tmp_path):
    assert "model directory does not exist" in bad_run(capsys, tmp_path / "nope", train_file, tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "sft", "--model", tiny, "--train", train_file, "-o", tmp_path / "out", "-q")
    assert code == 2 and "output already exists (pass --overwrite" in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_eval_bad_input(capsys, tiny, tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", ['{"prompt": "1+1=", "response": "2"}', "not json"])
    code, out, err = run_cli(capsys, "eval", "--model", tiny, "--data", data, "--json", tmp_path / "r.json")
    assert code == 2 and out == "" and err.count("\n") == 1 and "eval.jsonl:2: not valid JSON" in err
    assert not (tmp_path / "r.json").exists()


def test_sft_progress_is_silent_when_stderr_is_not_a_terminal(capsys, tiny, train_file, tmp_path):
    """No carriage-return progress redraws (a ~10 kB line) in logs and pipes."""
    code, out, err = run_cli(capsys, "sft", "--model", tiny, "--train", train_file, "-o", tmp_path / "out",
                             "--steps", 3, "--batch-size", 4)  # progress not turned off with -q
    assert code == 0, err
    assert "\r" not in err and len(err) < 1000, err[:2000]
