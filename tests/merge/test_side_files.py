"""Side files: every file read from a model directory passes one rule
(merge/io/model_files.py): no link out of the directory, no FIFO or device, and every file copied into
an output is validated as the format it claims. Each refusal: exit 2, one line naming the file, no
traceback, inputs byte-identical, nothing at -o; a FIFO never blocks (each case ends in < 10 s)."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_bad_input import assert_user_error, no_output, run_cli

from cpift.errors import CheckpointError

SECRET = b'{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"top-secret": 0}, "unk_token": "top-secret"}}'


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    return Tokenizer(WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]")).to_str()


def _model(d: Path, seed: int) -> Path:
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g)}, d / "model.safetensors")
    (d / "config.json").write_text('{"model_type": "llama"}')
    return d


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    return _model(tmp_path / "a", 0), _model(tmp_path / "b", 1)


def _refused(capsys, tmp_path, pair, *fragments, watch=()):
    t0 = time.monotonic()
    err = assert_user_error(capsys, ["linear", *pair, "-o", tmp_path / "out", "-q"], *fragments,
                            inputs=[*pair, *watch])
    assert time.monotonic() - t0 < 10
    no_output(tmp_path)
    return err


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "generation_config.json", "chat_template.jinja"])
def test_side_file_linked_out_of_the_model_directory_is_refused(capsys, tmp_path, pair, name):
    """The leak: a tokenizer.json linking to a file elsewhere was copied into the output (and pushed)."""
    secret = tmp_path / "elsewhere" / "secret.json"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    target = pair[0] / name
    target.unlink(missing_ok=True)
    target.symlink_to(secret)
    _refused(capsys, tmp_path, pair, str(target), "outside", watch=[secret.parent])


def test_side_file_linked_inside_the_model_directory_is_copied(capsys, tmp_path, pair):
    (pair[0] / "real-tokenizer.json").write_text(_tokenizer_json())
    (pair[0] / "tokenizer.json").symlink_to("real-tokenizer.json")
    code, _, err = run_cli(capsys, "linear", *pair, "-o", tmp_path / "out", "-q")
    assert code == 0, err
    assert (tmp_path / "out" / "tokenizer.json").read_text() == _tokenizer_json()
    assert not (tmp_path / "out" / "tokenizer.json").is_symlink()


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "model.safetensors", "tokenizer_config.json"])
def test_fifo_in_the_model_directory_is_refused_without_blocking(capsys, tmp_path, pair, name):
    target = pair[0] / name
    target.unlink(missing_ok=True)
    os.mkfifo(target)
    _refused(capsys, tmp_path, pair, str(target), "FIFO")


def test_device_as_a_side_file_is_refused(capsys, tmp_path, pair):
    (pair[0] / "tokenizer.json").symlink_to("/dev/zero")  # a link out, and a device: refused either way
    _refused(capsys, tmp_path, pair, "tokenizer.json")
    (pair[0] / "tokenizer.json").unlink()
    try:
        os.mknod(pair[0] / "tokenizer.json", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    _refused(capsys, tmp_path, pair, "tokenizer.json", "a device")


@pytest.mark.parametrize("text, why", [
    ("{not json", "not valid JSON"),
    ('{"version": "1.0"}', "no 'model' object"),
    ('{"version": "1.0", "model": {"type": "NoSuchModel"}}', "tokenizers library cannot load it"),
    ("[1, 2]", "JSON object"),
], ids=["invalid-json", "no-model", "unknown-model", "not-object"])
def test_malformed_tokenizer_json_fails_the_merge(capsys, tmp_path, pair, text, why):
    (pair[0] / "tokenizer.json").write_text(text)
    _refused(capsys, tmp_path, pair, "tokenizer.json", why)


@pytest.mark.parametrize("name, data", [
    ("generation_config.json", b"{"), ("special_tokens_map.json", b"[]"), ("merges.txt", b"\xff\xfe#"),
    ("chat_template.jinja", b"{{ \xc3 }}"), ("tokenizer.model", b""),
], ids=["generation-config", "special-tokens", "merges", "template", "sentencepiece"])
def test_every_side_file_is_validated_before_it_is_copied(capsys, tmp_path, pair, name, data):
    (pair[0] / name).write_bytes(data)
    _refused(capsys, tmp_path, pair, name)


def test_tokenizer_loading_is_vetted_as_the_merge_is(tmp_path, pair):
    """Training and tokenizer merges load through transformers, which follows links: vetted first."""
    from cpift.training.evaluate import load_tokenizer

    secret = tmp_path / "secret.json"
    secret.write_bytes(SECRET)
    (pair[0] / "tokenizer.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match="outside"):
        load_tokenizer(pair[0])


def test_adapter_config_linked_out_is_refused(capsys, tmp_path, pair):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (tmp_path / "cfg.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                   "target_modules": ["w"]}))
    (adapter / "adapter_config.json").symlink_to(tmp_path / "cfg.json")
    err = assert_user_error(capsys, ["linear", f"{pair[0]}+{adapter}", pair[1], "-o", tmp_path / "out", "-q"],
                            "adapter_config.json", "outside", inputs=[*pair, adapter])
    assert "Traceback" not in err
    no_output(tmp_path)
