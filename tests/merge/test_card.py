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
from cpift.errors import ConfigError
from cpift.merge import methods
from cpift.merge.card import CardInput, card_files, input_hash
from cpift.merge.mergekit.config import load_config


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
    ("linear", ["linear", "task1", "task2", "task3", "--weights", "1,2,0.5", "--max-shard-size", "30000"],
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

    # Local inputs only: no base_model (the Hub accepts repo ids only there), no absolute path anywhere;
    # a mergekit method writes mergekit_config.yml, and its card is tagged mergekit for the Hub's filters.
    assert (out / "mergekit_config.yml").is_file()
    assert front_matter(out / "README.md") == {"tags": ["cpift", "merge", "mergekit"], "library_name": "transformers"}
    card = (out / "README.md").read_text()
    for text in shows:
        assert text in card, (text, card)
    for n in inputs:
        assert input_hash(llama[n]) in card
        assert f"`{os.path.relpath(llama[n], out)}`" in card
    assert str(models) not in card and str(tmp_path) not in card
    recipe = yaml.safe_load((out / "cpift_recipe.yml").read_text())
    assert recipe["cpift"]["relative_to_recipe"] is True
    named = [recipe["base_model"]] if "base_model" in recipe and method_has_base(recipe) else []
    named += [m["model"] for m in recipe["models"]]
    assert named == [os.path.relpath(llama[n], out) for n in inputs]
    mk = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert mk == {k: v for k, v in recipe.items() if k != "cpift"}

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(capsys, "config", out / "cpift_recipe.yml", "-o", tmp_path / "again", "-q",
                           "--threads", "1")
    assert code == 0, err
    assert files_of(tmp_path / "again") == files_of(out)  # a sibling: the same relative paths


def method_has_base(recipe: dict) -> bool:
    """slerp's base_model is also its first model; the delta methods' base is separate."""
    return recipe["merge_method"] != "slerp"


def test_recipe_parameters_matter(capsys, llama, tmp_path):
    """The byte-identity above is a real check: editing a recorded parameter changes the output."""
    base = ["dare-ties", "--base", llama["base"], llama["task1"], llama["task2"], "--density", "0.5", "-q"]
    assert run_cli(capsys, *base, "--seed", "11", "-o", tmp_path / "a")[0] == 0
    recipe = (tmp_path / "a" / "cpift_recipe.yml").read_text()
    (tmp_path / "e").mkdir()  # beside the output: the recipe's paths are relative to its directory
    (tmp_path / "e" / "edited.yml").write_text(recipe.replace("seed: 11", "seed: 12"))
    assert run_cli(capsys, "config", tmp_path / "e" / "edited.yml", "-o", tmp_path / "b", "-q")[0] == 0
    assert run_cli(capsys, *base, "--seed", "12", "-o", tmp_path / "c", "-q")[0] == 0
    a, b, c = (files_of(tmp_path / d) for d in "abc")
    shards = [k for k in a if k.endswith(".safetensors")]
    assert shards and any(a[k] != b[k] for k in shards)
    assert {k: b[k] for k in shards} == {k: c[k] for k in shards}


def test_config_with_gradients_records_itself_with_relative_paths(capsys, llama, tmp_path, monkeypatch):
    """A per-tensor t (filters, gradients) has no generated form: the config itself is the recipe, with
    its model paths relative to the output (and marked so), and it reproduces the output from another
    directory."""
    monkeypatch.chdir(llama["base"].parent)
    cfg = tmp_path / "slerp.yml"
    cfg.write_text(f"merge_method: slerp\nbase_model: {llama['task1'].name}\n"
                   f"models: [{{model: {llama['task1'].name}}}, {{model: {llama['task2'].name}}}]\n"
                   "parameters:\n  t:\n    - {filter: self_attn, value: [0, 0.5, 1]}\n    - value: 0.3\n"
                   "dtype: float32\n")
    assert run_cli(capsys, "config", cfg, "-o", tmp_path / "out", "-q")[0] == 0
    recipe = yaml.safe_load((tmp_path / "out" / "cpift_recipe.yml").read_text())
    rel = {n: os.path.relpath(llama[n], tmp_path / "out") for n in ("task1", "task2")}
    assert recipe["base_model"] == rel["task1"]
    assert [m["model"] for m in recipe["models"]] == [rel["task1"], rel["task2"]]
    assert recipe["parameters"]["t"][0] == {"filter": "self_attn", "value": [0, 0.5, 1]}
    assert recipe["cpift"] == {"max_shard_size": 5 * 10**9, "relative_to_recipe": True}
    assert yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text()) == \
        {k: v for k, v in recipe.items() if k != "cpift"}
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
    assert front_matter(tmp_path / "out" / "README.md") == {"tags": ["cpift", "merge"], "library_name": "transformers"}
    assert not (tmp_path / "out" / "mergekit_config.yml").exists()


def test_config_shard_size_option_overrides_the_recipe_only_when_given(capsys, llama, tmp_path):
    argv = ["slerp", llama["task1"], llama["task2"], "--max-shard-size", "30000", "-q"]
    assert run_cli(capsys, *argv, "-o", tmp_path / "a")[0] == 0
    recipe = tmp_path / "a" / "cpift_recipe.yml"
    assert run_cli(capsys, "config", recipe, "-o", tmp_path / "b", "-q", "--max-shard-size", "5GB")[0] == 0
    assert sorted(files_of(tmp_path / "b")) == [".cpift-output", "README.md", "config.json", "cpift_recipe.yml",
                                                 "generation_config.json", "mergekit_config.yml",
                                                 "model.safetensors"]
    assert "model.safetensors.index.json" in files_of(tmp_path / "a")


def test_card_lists_hub_inputs_by_id_and_pins_the_commit_in_the_recipe(tmp_path, llama):
    """A Hub input: base_model gives the repo id (the local one is left out of the front matter), with
    base_model_relation: merge; the recipe names it org/name@<commit read>, the local one relative to
    the output."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / "models--org--base" / "snapshots" / commit
    snap.parent.mkdir(parents=True)
    os.symlink(llama["base"], snap)
    inputs = [CardInput("org/base@main", snap, "base"), CardInput(str(llama["task1"]), llama["task1"])]
    out = tmp_path / "out"
    files = card_files(method="task_arithmetic", params={"weights": [1.0], "lambda": 1.0}, inputs=inputs,
                       settings={"max_shard_size": 10**9}, out=out)
    assert files["README.md"].startswith("---\nbase_model:\n- org/base\nbase_model_relation: merge\ntags:\n"
                                         "- cpift\n- merge\n- mergekit\nlibrary_name: transformers\n---\n")
    assert f"| base | `org/base` | {commit} |" in files["README.md"]
    assert str(llama["task1"]) not in files["README.md"]
    recipe = yaml.safe_load(files["cpift_recipe.yml"])
    assert recipe["base_model"] == f"org/base@{commit}"
    rel = os.path.relpath(llama["task1"], out)
    assert recipe["models"] == [{"model": rel, "parameters": {"weight": 1.0}}]
    assert yaml.safe_load(files["mergekit_config.yml"])["models"] == recipe["models"]


def test_card_names_no_home_directory(tmp_path, llama, monkeypatch):
    """An input under the home directory and an output outside it: the relative path would spell the
    home directory's name, so the card and recipe give the input's base name only."""
    home = tmp_path / "home" / "alice"
    (home / "models").mkdir(parents=True)
    os.symlink(llama["task1"], home / "models" / "m1")
    monkeypatch.setenv("HOME", str(home))
    files = card_files(method="slerp", params={"t": 0.5},
                       inputs=[CardInput(str(home / "models" / "m1"), home / "models" / "m1"),
                               CardInput(str(llama["task2"]), llama["task2"])],
                       out=tmp_path / "srv" / "out")
    assert all("alice" not in text and "home" not in text for text in files.values())
    assert yaml.safe_load(files["cpift_recipe.yml"])["models"][0] == {"model": "m1"}
    assert yaml.safe_load(files["cpift_recipe.yml"])["models"][1] == \
        {"model": os.path.relpath(llama["task2"], tmp_path / "srv" / "out")}


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
    ("cpift: {seed: 3}", "cpift.seed: only dare_linear, dare_ties, della, della_linear draw random masks"),
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


def test_fuse_card_names_masks_relative_to_the_output_never_absolute_or_home(llama, tmp_path, monkeypatch):
    """The card's mask paths are written as the recipe's: relative to the output; a mask under the home
    directory of a user publishing from outside it is named by its file name alone."""
    from cpift.merge.cpi.cores import compute_cores
    from cpift.merge.cpi.fuse import fuse

    home = tmp_path / "home" / "someone"
    masks = home / "cores"
    home.mkdir(parents=True)
    compute_cores(llama["base"], [("a", llama["task1"]), ("b", llama["task2"])], masks, p=5, progress=False)
    tasks = [("a", llama["task1"], masks / "a.safetensors"), ("b", llama["task2"], masks / "b.safetensors")]
    fuse(llama["base"], tasks, tmp_path / "near", progress=False)
    card = (tmp_path / "near" / "README.md").read_text()
    assert "| masks | ../home/someone/cores/a.safetensors, ../home/someone/cores/b.safetensors |" in card
    assert str(tmp_path) not in card and "mergekit" not in front_matter(tmp_path / "near" / "README.md")["tags"]

    monkeypatch.setenv("HOME", str(home))  # the masks now lie in the home directory, the output outside it
    fuse(llama["base"], tasks, tmp_path / "far", progress=False)
    card = (tmp_path / "far" / "README.md").read_text()
    assert "| masks | a.safetensors, b.safetensors |" in card
    assert "someone" not in card and str(tmp_path) not in card and not re.search(r"\| /|`/", card)
