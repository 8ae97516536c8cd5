"""Model card and recipe: every merge output carries both, and `cpift-merge config cpift_recipe.yml`
writes the same bytes again, from another directory."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
import yaml

from cpift.cli.merge_cli import main
from cpift.merge import methods
from cpift.merge.card import CardInput, card_files, input_hash
from cpift.merge.config import load_config
from cpift.merge.errors import ConfigError


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def files_of(d: Path) -> dict[str, str]:
    """Relative path → sha256 of every file in a directory."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


# (id, argv after the command name, input names in the order the method reads them, extra checks)
CASES = [
    ("slerp", ["slerp", "task1", "task2", "--t", "0.3"], ["task1", "task2"], ["| t | 0.3 |"]),
    ("linear", ["linear", "task1", "task2", "task3", "--weights", "1,2,0.5", "--max-shard-size", "30KB"],
     ["task1", "task2", "task3"], ["| weights | 1.0, 2.0, 0.5 |"]),
    ("task-arithmetic", ["task-arithmetic", "--base", "base", "task1", "task2", "--weights", "0.5,0.7",
                         "--lambda", "0.8", "--dtype", "float32", "--out-dtype", "bfloat16"],
     ["base", "task1", "task2"], ["| lambda | 0.8 |", "| dtype | float32 |"]),
    ("ties", ["ties", "--base", "base", "task1", "task2", "task3", "--weights", "1,0.5,0.8", "--density", "0.3",
              "--copy-tokenizer-from", "task2"],
     ["base", "task1", "task2", "task3"], ["| density | 0.3, 0.3, 0.3 |", "copy_tokenizer_from"]),
    ("ties-global-trim", ["ties", "--base", "base", "task1", "task2", "--density", "0.4,0.2", "--global-trim"],
     ["base", "task1", "task2"], ["| global_trim | true |"]),
    ("dare-linear", ["dare-linear", "--base", "base", "task1", "task2", "--density", "0.6", "--seed", "3"],
     ["base", "task1", "task2"], ["| seed | 3 |"]),
    ("dare-ties", ["dare-ties", "--base", "base", "task1", "task2", "--density", "0.5", "--seed", "11",
                   "--weights", "1,0.3"], ["base", "task1", "task2"], ["| seed | 11 |", "| normalize | true |"]),
]


@pytest.mark.parametrize("argv,inputs,shows", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_recipe_reproduces_every_method_byte_for_byte(capsys, llama, tmp_path, monkeypatch, argv, inputs, shows):
    # Relative model paths in the first run: the recipe must still work from another directory.
    models = llama["base"].parent
    names = {p.name.rsplit("-", 1)[1]: p.name for p in llama.values()}
    argv = [names.get(a, a) for a in argv]
    monkeypatch.chdir(models)
    code, _, err = run_cli(capsys, *argv, "-o", tmp_path / "out", "-q", "--threads", "1")
    assert code == 0, err
    out = tmp_path / "out"
    assert (out / "README.md").is_file() and (out / "cpift_recipe.yml").is_file()

    meta = front_matter(out / "README.md")
    assert meta["base_model"] == [str(llama[n]) for n in inputs]
    assert meta["tags"] == ["cpift", "merge"] and meta["library_name"] == "transformers"
    card = (out / "README.md").read_text()
    for text in shows:
        assert text in card, (text, card)
    for n in inputs:
        assert input_hash(llama[n]) in card

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(capsys, "config", out / "cpift_recipe.yml", "-o", tmp_path / "again", "-q",
                           "--threads", "1")
    assert code == 0, err
    assert files_of(tmp_path / "again") == files_of(out)


def test_recipe_parameters_matter(capsys, llama, tmp_path):
    """The byte-identity above is a real check: editing a recorded parameter changes the output."""
    base = ["dare-ties", "--base", llama["base"], llama["task1"], llama["task2"], "--density", "0.5", "-q"]
    assert run_cli(capsys, *base, "--seed", "11", "-o", tmp_path / "a")[0] == 0
    recipe = (tmp_path / "a" / "cpift_recipe.yml").read_text()
    (tmp_path / "edited.yml").write_text(recipe.replace("seed: 11", "seed: 12"))
    assert run_cli(capsys, "config", tmp_path / "edited.yml", "-o", tmp_path / "b", "-q")[0] == 0
    assert run_cli(capsys, *base, "--seed", "12", "-o", tmp_path / "c", "-q")[0] == 0
    a, b, c = (files_of(tmp_path / d) for d in "abc")
    shards = [k for k in a if k.endswith(".safetensors")]
    assert shards and any(a[k] != b[k] for k in shards)
    assert {k: b[k] for k in shards} == {k: c[k] for k in shards}


def test_config_with_gradients_records_itself_with_absolute_paths(capsys, llama, tmp_path, monkeypatch):
    """A per-tensor t (filters, gradients) has no generated form: the config itself is the recipe, with
    its model paths made absolute, and it reproduces the output from another directory."""
    monkeypatch.chdir(llama["base"].parent)
    cfg = tmp_path / "slerp.yml"
    cfg.write_text(f"merge_method: slerp\nbase_model: {llama['task1'].name}\n"
                   f"models: [{{model: {llama['task1'].name}}}, {{model: {llama['task2'].name}}}]\n"
                   "parameters:\n  t:\n    - {filter: self_attn, value: [0, 0.5, 1]}\n    - value: 0.3\n"
                   "dtype: float32\n")
    assert run_cli(capsys, "config", cfg, "-o", tmp_path / "out", "-q")[0] == 0
    recipe = yaml.safe_load((tmp_path / "out" / "cpift_recipe.yml").read_text())
    assert recipe["base_model"] == str(llama["task1"])
    assert [m["model"] for m in recipe["models"]] == [str(llama["task1"]), str(llama["task2"])]
    assert recipe["parameters"]["t"][0] == {"filter": "self_attn", "value": [0, 0.5, 1]}
    assert recipe["cpift"] == {"max_shard_size": 5 * 10**9}
    assert "| t | per tensor" in (tmp_path / "out" / "README.md").read_text()
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "config", tmp_path / "out" / "cpift_recipe.yml", "-o", tmp_path / "again", "-q")[0] == 0
    assert files_of(tmp_path / "again") == files_of(tmp_path / "out")


def test_library_call_with_a_function_parameter_gets_a_card_without_recipe(llama, tmp_path):
    methods.linear([llama["task1"], llama["task2"]], tmp_path / "out", progress=False,
                   weights=[lambda name: 2.0 if "mlp" in name else 1.0, 1.0])
    assert not (tmp_path / "out" / "cpift_recipe.yml").exists()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "No recipe: 'weights' is a per-tensor Python function" in card
    assert front_matter(tmp_path / "out" / "README.md")["base_model"] == [str(llama["task1"]), str(llama["task2"])]


def test_config_shard_size_option_overrides_the_recipe_only_when_given(capsys, llama, tmp_path):
    argv = ["slerp", llama["task1"], llama["task2"], "--max-shard-size", "30KB", "-q"]
    assert run_cli(capsys, *argv, "-o", tmp_path / "a")[0] == 0
    recipe = tmp_path / "a" / "cpift_recipe.yml"
    assert run_cli(capsys, "config", recipe, "-o", tmp_path / "b", "-q", "--max-shard-size", "5GB")[0] == 0
    assert sorted(files_of(tmp_path / "b")) == [".cpift-output", "README.md", "config.json", "cpift_recipe.yml",
                                                 "generation_config.json", "model.safetensors"]
    assert "model.safetensors.index.json" in files_of(tmp_path / "a")


def test_card_lists_hub_inputs_by_id_and_pins_the_commit_in_the_recipe(tmp_path, llama):
    """A Hub input: base_model gives the repo id, the recipe org/name@<commit read>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / "models--org--base" / "snapshots" / commit
    snap.parent.mkdir(parents=True)
    os.symlink(llama["base"], snap)
    inputs = [CardInput("org/base@main", snap, "base"), CardInput(str(llama["task1"]), llama["task1"])]
    files = card_files(method="task_arithmetic", params={"weights": [1.0], "lambda": 1.0}, inputs=inputs,
                       settings={"max_shard_size": 10**9})
    meta = yaml.safe_load(files["README.md"].split("---\n")[1])
    assert meta["base_model"] == ["org/base", str(llama["task1"])]
    assert f"| base | `org/base` | {commit} |" in files["README.md"]
    recipe = yaml.safe_load(files["cpift_recipe.yml"])
    assert recipe["base_model"] == f"org/base@{commit}"
    assert recipe["models"] == [{"model": str(llama["task1"]), "parameters": {"weight": 1.0}}]


def test_fingerprint_tells_fine_tunes_apart_and_is_stable(llama, tmp_path):
    hashes = {n: input_hash(p) for n, p in llama.items()}
    assert len(set(hashes.values())) == len(hashes)
    assert input_hash(llama["base"]) == hashes["base"]
    methods.slerp(llama["task1"], llama["task2"], tmp_path / "single", max_shard_size="1GB", progress=False)
    single = tmp_path / "single" / "model.safetensors"
    raw = single.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert input_hash(tmp_path / "single") == hashlib.sha256(raw[:8 + n + 65536]).hexdigest()
    assert input_hash(single) == input_hash(tmp_path / "single")


@pytest.mark.parametrize("block,fragment", [
    ("cpift: {seed: 3}", "cpift.seed: only dare_linear and dare_ties"),
    ("cpift: {global_trim: true}", "cpift.global_trim: only ties"),
    ("cpift: {max_shard_size: lots}", "cpift.max_shard_size: expected a positive size"),
    ("cpift: {shard: 1}", "cpift.shard: unknown key"),
    ("cpift: [1]", "cpift: expected a mapping"),
    ("cpift: {copy_tokenizer_from: 3}", "cpift.copy_tokenizer_from: expected a model directory"),
], ids=["seed-on-linear", "global-trim-on-linear", "bad-size", "unknown-key", "not-a-mapping", "bad-donor"])
def test_cpift_block_is_validated(tmp_path, block, fragment):
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: linear\nmodels: [{{model: a, parameters: {{weight: 1}}}}, "
                   f"{{model: b, parameters: {{weight: 1}}}}]\n{block}\n")
    with pytest.raises(ConfigError, match=r"c\.yml: " + re.escape(fragment)):
        load_config(cfg)


def test_cpift_block_values_are_read(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("merge_method: dare_ties\nbase_model: a\nmodels: [{model: b, parameters: {weight: 1}}]\n"
                   "cpift: {seed: 5, max_shard_size: 2GB, copy_tokenizer_from: b}\n")
    assert load_config(cfg).cpift == {"seed": 5, "max_shard_size": 2 * 10**9, "copy_tokenizer_from": "b"}


def test_bad_cpift_block_is_one_line_through_the_cli(capsys, tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("merge_method: ties\nbase_model: a\nmodels: [{model: b, parameters: {weight: 1}}]\n"
                   "cpift: {seed: 5}\n")
    code, _, err = run_cli(capsys, "config", cfg, "-o", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and "cpift.seed" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
