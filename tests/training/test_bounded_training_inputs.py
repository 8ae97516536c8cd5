"""Bounded numbers and files on the training side: every number (options, recipe, environment) through
cpift.numbers' bounded parser, JSONL text that is no text, chat templates that raise or never end.
Each refusal: exit 2, one line naming the field or file, no traceback, inputs byte-identical, nothing at -o,
and the hang cases end in under 10 s."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from training_helpers import digest, run_cli

from cpift.training.tiny import make_tokenizer

BIG = "9" * 400


def refused(capsys, tmp_path, argv, *fragments, inputs=()) -> str:
    before = digest(*inputs)
    start = time.perf_counter()
    code, out, err = run_cli(capsys, *argv)
    assert time.perf_counter() - start < 10
    assert code == 2 and out == "", (code, out, err)
    assert err.count("\n") == 1 and err.startswith("cpift-train: error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in err, (f, err)
    assert digest(*inputs) == before, "inputs were modified"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    return err


@pytest.mark.parametrize("extra,fragment", [
    (["--epochs", "inf"], "--epochs"),
    (["--epochs", "nan"], "--epochs"),
    (["--epochs", "1e300"], "epochs: 1e+300 is outside (0, 1000000]"),
    (["--seed", str(2**70)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--steps", BIG], "--steps"),
    (["--steps", str(10**12)], "steps: 1000000000000 is outside [1, 1000000000]"),
    (["--lr", BIG + ".0"], "--lr"),
    (["--batch-size", str(2**63)], "--batch-size"),
    (["--threads", "100000"], "--threads"),
    (["--warmup", "1e400"], "--warmup"),
], ids=["epochs-inf", "epochs-nan", "epochs-1e300", "seed-2**70", "seed-negative", "steps-400-digits",
        "steps-1e12", "lr-400-digits", "batch-int64", "threads-100000", "warmup-1e400"])
def test_sft_numbers_bounded(capsys, tiny, train_file, tmp_path, extra, fragment):
    argv = ["sft", "--model", tiny, "--train", train_file, "-o", tmp_path / "out", "-q", *extra]
    if "--steps" not in extra and "--epochs" not in extra:
        argv += ["--steps", 1]
    refused(capsys, tmp_path, argv, fragment, inputs=[tiny, train_file])


@pytest.mark.parametrize("extra,fragment", [
    (["--max-new-tokens", str(2**40)], "max_new_tokens: 1099511627776 is outside [1, 1048576]"),
    (["--max-new-tokens", BIG], "'--max-new-tokens': "),
    (["--batch-size", "0"], "batch_size: 0 is outside [1, 2147483648]"),
    (["--threads", "100000"], "'--threads'"),
], ids=["max-new-tokens-2**40", "max-new-tokens-400-digits", "batch-zero", "threads-100000"])
def test_eval_numbers_bounded(capsys, tiny, train_file, tmp_path, extra, fragment):
    refused(capsys, tmp_path, ["eval", "--model", tiny, "--data", train_file, "--json", tmp_path / "out", "-q",
                               *extra], fragment, inputs=[tiny, train_file])


@pytest.mark.parametrize("env,fragment", [
    ({"WORLD_SIZE": "two"}, "environment variable WORLD_SIZE: expected an integer, got 'two'"),
    ({"WORLD_SIZE": BIG}, "environment variable WORLD_SIZE"),
    ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE"),
    ({"WORLD_SIZE": "2"}, "MASTER_ADDR is unset; start the run with torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "environment variable RANK"),
    ({"LOCAL_RANK": "-1"}, "environment variable LOCAL_RANK"),
], ids=["world-word", "world-400-digits", "world-zero", "world-without-torchrun", "rank-outside", "local-rank"])
def test_torchrun_environment_checked(capsys, tiny, train_file, tmp_path, monkeypatch, env, fragment):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    refused(capsys, tmp_path, ["sft", "--model", tiny, "--train", train_file, "-o", tmp_path / "out", "-q",
                               "--steps", 1, "--batch-size", 4], fragment, inputs=[tiny, train_file])


def test_jsonl_lone_surrogate(capsys, tiny, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "a\\ud800b", "response": "2"}\n')
    refused(capsys, tmp_path, ["sft", "--model", tiny, "--train", data, "-o", tmp_path / "out", "-q", "--steps", 1,
                               "--batch-size", 2], "train.jsonl:2: turn 0 content: a lone surrogate '\\ud800'",
            inputs=[tiny, data])


def _with_template(src: Path, dst: Path, template: str) -> Path:
    shutil.copytree(src, dst)
    tok = make_tokenizer(chat=True)
    tok.chat_template = template
    tok.save_pretrained(dst)
    return dst


LOOPS = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
         "{% for m in messages %}{{ m.content }}{% endfor %}")


@pytest.mark.parametrize("template,fragment", [
    (LOOPS, "ran for over"),
    ("{% for m in messages %}{{ m.content / 0 }}{% endfor %}", "failed on this conversation (TypeError"),
    ("{% for m in messages %}{{ (1 / 0) ~ m.content }}{% endfor %}", "(ZeroDivisionError"),
    ("{{ raise_exception('no system turns here') }}", "no system turns here"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "failed on this conversation"),
], ids=["nested-range-loops", "type-error", "zero-division", "raise-exception", "endless-recursion"])
def test_chat_template_bounded(capsys, tiny_chat, train_file, tmp_path, template, fragment):
    model = _with_template(tiny_chat, tmp_path / "model", template)
    err = refused(capsys, tmp_path, ["sft", "--model", model, "--train", train_file, "-o", tmp_path / "out",
                                     "-q", "--steps", 1, "--batch-size", 2], fragment, inputs=[model, train_file])
    assert "train.jsonl:1: the tokenizer's chat template " in err and f"the template of {model})" in err


@pytest.mark.parametrize("line,fragment", [
    ("seed: " + BIG, "recipe.yml: seed: "),
    ("seed: -3", "recipe.yml: seed: -3 is not ≥ 0"),
    ("p: " + BIG, "recipe.yml: p: expected a finite number"),
    ("p: .inf", "recipe.yml: p: expected a finite number, got inf"),
    ("tau: 1e999", "recipe.yml: tau: expected a finite number"),
    ("probe: {steps: " + BIG + "}", "recipe.yml: probe.steps: "),
], ids=["seed-400-digits", "seed-negative", "p-400-digits", "p-inf", "tau-1e999", "probe-steps-400-digits"])
def test_pipeline_recipe_numbers_bounded(capsys, tiny, train_file, tmp_path, line, fragment):
    recipe = tmp_path / "recipe.yml"
    key = line.split(":")[0]
    body = {"base": f"base: {tiny}", "tasks": f"tasks:\n  - {{name: a, train: {train_file}, eval: {train_file}}}\n"
            f"  - {{name: b, train: {train_file}, eval: {train_file}}}"}
    recipe.write_text("\n".join([*body.values(), line]) + "\n")
    assert key not in body
    before = digest(recipe, train_file, tiny)
    code, out, err = run_cli(capsys, "pipeline", recipe, "-o", tmp_path / "work", "-q")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and fragment in err, err
    assert not (tmp_path / "work").exists() and digest(recipe, train_file, tiny) == before


def test_render_limit_keeps_an_outer_timer():
    """The template's time limit nests: an outer ITIMER_REAL (a bench's limit) still fires, on time."""
    import signal

    from cpift.training import data

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(time.monotonic()))
    try:
        start = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 1.5)
        with pytest.raises(data._RenderTimeout):
            with data._time_limit(0.3):
                while True:
                    pass
        assert time.monotonic() - start < 1.0
        while not fired and time.monotonic() - start < 5:
            time.sleep(0.01)
        assert fired and 1.4 <= fired[0] - start < 3
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
