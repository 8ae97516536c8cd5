"""Shard sizes as users write them: mergekit's K/M/B (B = 10^9), transformers' KB/GB and KiB/GiB,
plain bytes; under 1 MB only in plain bytes."""

from __future__ import annotations

import pytest
import yaml

from cpift.cli.merge_cli import main
from cpift.merge.errors import ConfigError, ParameterError
from cpift.merge.sizes import parse_size, size_bytes


@pytest.mark.parametrize("text, expected", [
    ("1B", 10**9), ("500M", 5 * 10**8), ("2K", 2000), ("5GB", 5 * 10**9), ("1GiB", 2**30),
    ("2KB", 2000), ("3MiB", 3 * 2**20), ("1.5GB", 1_500_000_000), ("2tb", 2 * 10**12), ("7", 7),
    (12345, 12345), (" 40MB ", 40 * 10**6),
], ids=str)
def test_size_bytes(text, expected):
    assert size_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "5XB", "-3", "0", "1.5.2GB", "", "GB"], ids=repr)
def test_size_bytes_refuses(text):
    with pytest.raises(ParameterError, match="max_shard_size"):
        size_bytes(text)


def test_under_one_megabyte_needs_plain_bytes():
    assert parse_size("999999") == 999999 and parse_size(4096) == 4096 and parse_size("1M") == 10**6
    for text in ("2KB", "999KB", "0.5M", "100K"):
        with pytest.raises(ParameterError, match="under 1 MB.*plain bytes"):
            parse_size(text)


def test_cli_refuses_tiny_suffixed_size(capsys, llama, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["slerp", str(llama["task1"]), str(llama["task2"]), "-o", str(tmp_path / "o"),
              "--max-shard-size", "2KB", "-q"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("cpift-merge: error: max_shard_size: '2KB' is 2,000 bytes, under 1 MB")
    assert not (tmp_path / "o").exists()


def test_cli_1b_is_a_billion_bytes(capsys, llama, tmp_path):
    """mergekit's 1B: one shard for this tiny model, not one per tensor."""
    with pytest.raises(SystemExit) as exc:
        main(["slerp", str(llama["task1"]), str(llama["task2"]), "-o", str(tmp_path / "o"),
              "--max-shard-size", "1B", "-q"])
    assert exc.value.code == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()
    assert not (tmp_path / "o" / "model.safetensors.index.json").exists()
    assert yaml.safe_load((tmp_path / "o" / "cpift_recipe.yml").read_text())["cpift"]["max_shard_size"] == 10**9


def test_config_refuses_tiny_suffixed_size(tmp_path, llama):
    from cpift.merge.config import load_config

    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n- model: {llama['task1']}\n- model: {llama['task2']}\n"
                   "parameters: {weight: 1.0}\ncpift: {max_shard_size: 30KB}\n")
    with pytest.raises(ConfigError, match=r"c.yml: cpift.max_shard_size: '30KB' is 30,000 bytes, under 1 MB"):
        load_config(cfg)
    cfg.write_text(cfg.read_text().replace("30KB", "30000"))
    assert load_config(cfg).cpift["max_shard_size"] == 30000


def test_help_documents_sizes(capsys):
    with pytest.raises(SystemExit):
        main(["slerp", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "1B" in text and "10^9" in text and "mergekit" in text and "1GiB" in text and "plain bytes" in text
