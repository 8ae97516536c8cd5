"""Determinism: the same inputs and options give byte-identical output directories run after run and
across torch thread counts; --seed fixes every random choice (DARE's drop masks)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kill_helpers import digest
from test_bad_input import run_cli

from cpift.merge.tools.synthetic import LlamaShape, make_checkpoint

# Odd sizes above torch's parallel grain (32768 elements): with 2 or 3 threads a tensor's range is
# split at points that are no multiple of the vector width, so any thread-dependent reduction or
# vector/scalar tail shows up in the bytes.
SHAPE = LlamaShape(hidden=72, intermediate=1411, layers=2, heads=4, kv_heads=2, vocab=3001)


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("odd")
    return {n: make_checkpoint(root / n, SHAPE, seed=i, base_seed=None if i == 0 else 0, max_shard_size="400KB")
            for i, n in enumerate(["base", "a", "b"])}


CASES = {
    "slerp": ["slerp", "{a}", "{b}", "--t", "0.3"],
    "linear": ["linear", "{a}", "{b}", "{base}", "--weights", "1,0.5,0.25"],
    "task-arithmetic": ["task-arithmetic", "--base", "{base}", "{a}", "{b}", "--weights", "1,0.5", "--lambda", "0.8"],
    "ties": ["ties", "--base", "{base}", "{a}", "{b}", "--density", "0.3"],
    "ties-global-trim": ["ties", "--base", "{base}", "{a}", "{b}", "--density", "0.3", "--global-trim"],
    "ties-float32": ["ties", "--base", "{base}", "{a}", "{b}", "--density", "0.3", "--dtype", "float32"],
    "dare-linear": ["dare-linear", "--base", "{base}", "{a}", "{b}", "--seed", "7"],
    "dare-ties": ["dare-ties", "--base", "{base}", "{a}", "{b}", "--density", "0.4", "--seed", "7"],
}


def fill(argv: list[str], models: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in models.items()}) for a in argv]


@pytest.mark.parametrize("method", list(CASES))
def test_identical_across_runs_and_thread_counts(capsys, odd, tmp_path, method):
    digests = []
    for i, threads in enumerate(["1", "2", "3", "2"]):
        out = tmp_path / f"out{i}"
        code, _, err = run_cli(capsys, *fill(CASES[method], odd), "-o", out, "--threads", threads,
                               "--max-shard-size", "300000", "-q")
        assert code == 0, err
        digests.append(digest(out))
    assert len(digests[0]) > 3  # shards, index, config, card
    assert all(d == digests[0] for d in digests[1:]), [sorted(k for k in d if d[k] != digests[0].get(k))
                                                       for d in digests[1:]]


def test_seed_fixes_the_drop_masks(capsys, odd, tmp_path):
    def run(name: str, seed: str) -> dict[str, str]:
        code, _, err = run_cli(capsys, *fill(CASES["dare-ties"][:-1], odd), seed, "-o", tmp_path / name, "-q")
        assert code == 0, err
        return {k: v for k, v in digest(tmp_path / name).items() if k.endswith(".safetensors")}

    assert run("s7", "7") == run("s7-again", "7")
    assert run("s8", "8") != run("s7-third", "7")


def test_config_seed_option(capsys, odd, tmp_path):
    """`config --seed` sets the drop masks' seed, over the config's own cpift.seed."""
    cfg = tmp_path / "dare.yml"
    body = (f"merge_method: dare_ties\nbase_model: {odd['base']}\nmodels:\n"
            f"  - {{model: {odd['a']}, parameters: {{weight: 1.0, density: 0.5}}}}\n"
            f"  - {{model: {odd['b']}, parameters: {{weight: 0.5, density: 0.5}}}}\ndtype: bfloat16\n")
    cfg.write_text(body)
    seeded = tmp_path / "seeded.yml"
    seeded.write_text(body + "cpift:\n  seed: 9\n")

    def shards(config: Path, name: str, *extra) -> dict[str, str]:
        code, _, err = run_cli(capsys, "config", config, "-o", tmp_path / name, "-q", *extra)
        assert code == 0, err
        return {k: v for k, v in digest(tmp_path / name).items() if k.endswith(".safetensors")}

    five = shards(cfg, "five", "--seed", "5")
    assert shards(cfg, "five-again", "--seed", "5") == five
    assert shards(cfg, "six", "--seed", "6") != five
    assert shards(seeded, "nine-overridden", "--seed", "5") == five
    assert shards(seeded, "nine") == shards(cfg, "nine-flag", "--seed", "9")
