"""The CPI steps cores → cluster → fuse on tiny real checkpoints, against float64 / set-arithmetic oracles."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from oracles import fuse64
from references import load_state
from safetensors.torch import save_file
from test_bad_input import assert_user_error, run_cli

from cpift.kernels.scores import score_deltas
from cpift.merge.cpi.masks import block_size, load_core_mask


def _cores(capsys, base, tasks: dict, out: Path, *extra) -> str:
    argv = ["cores", "--base", base, *[a for n, p in tasks.items() for a in ("--model", f"{n}={p}")], "-o", out, *extra]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    return stdout


def _oracle_masks(base: dict, task: dict, names: list[str], p: float, granularity: str) -> dict[str, torch.Tensor]:
    """Exact global top-k by a stable sort of all scores (names in order, then flat index)."""
    scores = []
    for n in names:
        d = (task[n].double() - base[n].double()).abs().reshape(-1)
        b = block_size(granularity, tuple(base[n].shape))
        if b == 1:
            scores.append(d.float().double())  # the float32 score |x − b|, exactly
        else:
            # Block means are float32 sums in the kernel's order (checked against float64 in
            # tests/kernels/test_scores_kernel.py); the selection over them is what is tested here.
            scores.append(score_deltas(task[n].reshape(-1), base[n].reshape(-1), block=b).double())
    flat = torch.cat(scores)
    k = math.floor(p * flat.numel() / 100)
    order = torch.sort(flat, descending=True, stable=True).indices
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order[:k]] = True
    return dict(zip(names, chosen.split([s.numel() for s in scores])))


def _quantized_task(tmp_path: Path, base_dir: Path, seed: int) -> Path:
    """A 'fine-tune' whose deltas take few distinct values: many exact ties at the threshold."""
    import shutil

    state = load_state(base_dir)
    g = torch.Generator().manual_seed(seed)
    out = tmp_path / f"quant{seed}"
    shutil.copytree(base_dir, out)
    for f in out.glob("*.safetensors"):
        from safetensors.torch import load_file

        part = load_file(str(f))
        save_file({k: (v + torch.randint(-2, 3, v.shape, generator=g).to(v.dtype) / 64) if v.is_floating_point()
                   else v for k, v in part.items()}, str(f), metadata={"format": "pt"})
    assert load_state(out).keys() == state.keys()
    return out


@pytest.mark.parametrize("granularity,p", [("element", 1.0), ("element", 7.5), ("row", 5.0), ("block:3", 2.0)])
def test_cores_are_the_exact_global_top_k(families, tmp_path, capsys, granularity, p):
    m = families[("llama", torch.float32)]
    tasks = {"t1": m["task1"], "quant": _quantized_task(tmp_path, m["base"], 7)}
    stdout = _cores(capsys, m["base"], tasks, tmp_path / "cores", "--p", str(p), "--granularity", granularity)
    assert "attention" in stdout and "k=" in stdout
    base = load_state(m["base"])
    names = sorted(base)
    for tname, tdir in tasks.items():
        mask = load_core_mask(tmp_path / "cores" / f"{tname}.safetensors")
        want = _oracle_masks(base, load_state(Path(tdir)), names, p, granularity)
        assert mask.names == names and mask.granularity == granularity
        assert mask.k == sum(int(w.sum()) for w in want.values())
        for n in names:
            assert torch.equal(mask.bits(n), want[n]), (tname, n)
            assert mask.counts[n] == int(want[n].sum())


def test_cores_include_exclude_and_metadata(families, tmp_path, capsys):
    m = families[("llama", torch.bfloat16)]
    _cores(capsys, m["base"], {"a": m["task1"]}, tmp_path / "c", "--include", "*mlp*", "--exclude", "*down_proj*")
    mask = load_core_mask(tmp_path / "c" / "a.safetensors")
    assert mask.names and all("mlp" in n and "down_proj" not in n for n in mask.names)
    base, task = load_state(m["base"]), load_state(m["task1"])
    want = _oracle_masks(base, task, mask.names, 1.0, "element")
    assert all(torch.equal(mask.bits(n), want[n]) for n in mask.names)
    assert mask.task["model"] == str(Path(m["task1"]).resolve()) and len(mask.base["sha256"]) == 64
    assert mask.threshold == pytest.approx(
        min(float((task[n].float() - base[n].float()).abs().reshape(-1)[want[n]].min())
            for n in mask.names if want[n].any()))


def test_cluster_jaccard_groups_json_and_plot(families, tmp_path, capsys):
    m = families[("llama", torch.float32)]
    tasks = {"a": m["task1"], "b": m["task2"], "c": m["task3"], "a2": m["task1"]}
    _cores(capsys, m["base"], tasks, tmp_path / "cores", "--p", "10")
    files = [tmp_path / "cores" / f"{n}.safetensors" for n in tasks]
    sets = []
    for f in files:
        mk = load_core_mask(f)
        sets.append({(n, i) for n in mk.names for i in mk.bits(n).nonzero().reshape(-1).tolist()})
    code, out, err = run_cli(capsys, "cluster", *files, "--tau", "0.5", "--order", "given",
                             "--json", tmp_path / "c.json", "--plot", tmp_path / "c.png")
    assert code == 0, err
    got = json.loads((tmp_path / "c.json").read_text())
    assert got["tasks"] == list(tasks)
    for i in range(4):
        for j in range(4):
            want = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
            assert got["jaccard"][i][j] == pytest.approx(want, abs=1e-12)
    # a and a2 are the same fine-tune (Jaccard 1); independent random deltas overlap ~p/(200 − p).
    assert got["groups"] == [["a", "a2"], ["b"], ["c"]] and got["order"] == [0, 1, 2]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run_cli(capsys, "cluster", *files, "--tau", "0", "--order", "random", "--seed", "3")
    assert code == 0 and "0: a, b, c, a2" in out  # members in input order


@pytest.mark.parametrize("overlap,omega", [("last", None), ("largest", None), ("last", 0.3)])
def test_fuse_matches_float64_reference(families, tmp_path, capsys, overlap, omega):
    m = families[("llama", torch.float32)]
    tasks = {"a": m["task1"], "b": m["task2"], "c": m["task3"]}
    _cores(capsys, m["base"], tasks, tmp_path / "cores", "--p", "20")  # large cores: they overlap
    argv = ["fuse", "--backbone", m["base"], "-o", tmp_path / "fused", "--overlap", overlap, "-q",
            *[a for n, p in tasks.items() for a in ("--task", f"{n}={p}:{tmp_path / 'cores' / n}.safetensors")]]
    if overlap == "largest":
        argv += ["--base", m["base"]]
    if omega is not None:
        argv += ["--omega", str(omega)]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    masks = []
    for n in tasks:
        mk = load_core_mask(tmp_path / "cores" / f"{n}.safetensors")
        masks.append({t: mk.bits(t) for t in mk.names})
    got = load_state(tmp_path / "fused")
    want = fuse64(load_state(m["base"]), [load_state(p) for p in tasks.values()], masks, overlap,
                   base=load_state(m["base"]), omega=omega)
    for n, w in want.items():
        g = got[n].double()
        assert torch.allclose(g, w.double(), rtol=1e-6, atol=1e-6 * float(w.abs().max())), n
    # Core entries are the task's values exactly (no arithmetic touches them).
    last = load_state(m["task3"])
    for n, c in masks[2].items():
        if overlap == "last":
            assert torch.equal(got[n].reshape(-1)[c], last[n].reshape(-1)[c]), n
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "fused")  # an ordinary checkpoint


def test_cpi_bad_input(families, tmp_path, capsys):
    m = families[("llama", torch.bfloat16)]
    q = families[("qwen2", torch.bfloat16)]
    _cores(capsys, m["base"], {"a": m["task1"], "b": m["task2"]}, tmp_path / "cores")
    _cores(capsys, q["base"], {"q": q["task1"]}, tmp_path / "qcores", "--include", "*mlp*", "--include", "*q_proj.bias")
    a, b = tmp_path / "cores" / "a.safetensors", tmp_path / "cores" / "b.safetensors"
    inputs = [m["base"], m["task1"], tmp_path / "cores"]
    out = tmp_path / "out"
    for p, fragment in (("0", "p: 0 is outside (0, 100]"), ("-1", "p: -1 is outside"), ("100.5", "p: 100.5 is"),
                        ("nan", "'--p': expected a finite number")):
        assert_user_error(capsys, ["cores", "--base", m["base"], "--model", f"a={m['task1']}", "--p", p, "-o", out],
                          fragment, inputs=inputs)
    assert_user_error(capsys, ["cores", "--base", m["base"], "--model", f"a={m['task1']}", "--model",
                               f"a={m['task2']}", "-o", out], "duplicate task name 'a'", inputs=inputs)
    assert_user_error(capsys, ["cores", "--base", m["base"], "--model", str(m["task1"]), "-o", out], "NAME=PATH")
    assert_user_error(capsys, ["cores", "--base", m["base"], "--model", f"a={m['task1']}", "--granularity",
                               "block:0", "-o", out], "granularity")
    for tau in ("-0.1", "1.5"):
        assert_user_error(capsys, ["cluster", a, b, "--tau", tau], "tau", inputs=inputs)
    assert_user_error(capsys, ["cluster", a], "at least two masks")
    assert_user_error(capsys, ["cluster", a, tmp_path / "qcores" / "q.safetensors"], "tensor")
    assert_user_error(capsys, ["fuse", "--backbone", m["base"], "--task", f"a={m['task1']}", "-o", out],
                      "NAME=MODEL:MASK")
    assert_user_error(capsys, ["fuse", "--backbone", m["base"], "--task", f"a={m['task1']}:{a}", "--overlap",
                               "largest", "-o", out], "--base")
    assert_user_error(capsys, ["fuse", "--backbone", m["base"], "--task", f"a={m['task1']}:{a}",
                               "--task", f"a={m['task2']}:{b}", "-o", out], "duplicate task name 'a'")
    assert_user_error(capsys, ["fuse", "--backbone", m["base"], "--task",
                               f"a={m['task1']}:{tmp_path / 'qcores' / 'q.safetensors'}", "-o", out],
                      "another model", inputs=inputs)
    assert not out.exists()


def test_demo_runs_every_method_and_the_cpi_chain(tmp_path, capsys):
    code, out, err = run_cli(capsys, "demo", "--size", "tiny", "--workdir", tmp_path)
    assert code == 0, err
    for step in ("slerp", "ties", "dare_ties", "cores:", "groups (Jaccard", "fuse:"):
        assert step in out, step
    masks = {p.name for p in (tmp_path / "cores").glob("*.safetensors")}
    assert masks == {"task_a.safetensors", "task_b.safetensors"}
    fused = load_state(tmp_path / "merged" / "fused")
    task_a = load_state(tmp_path / "models" / "task_a")
    core = load_core_mask(tmp_path / "cores" / "task_a.safetensors")
    for n in core.names:  # task_a's core is transplanted unless task_b's later core took the entry
        b_core = load_core_mask(tmp_path / "cores" / "task_b.safetensors").bits(n)
        own = core.bits(n) & ~b_core
        assert torch.equal(fused[n].reshape(-1)[own], task_a[n].reshape(-1)[own]), n


def test_cores_and_fuse_recipes_reproduce_their_outputs(families, tmp_path, capsys):
    """Each output carries a card and a cpift_recipe.yml that `cpift-merge config` replays byte for byte."""
    import yaml

    m = families[("llama", torch.bfloat16)]
    _cores(capsys, m["base"], {"a": m["task1"], "b": m["task2"]}, tmp_path / "cores", "--p", "3",
           "--granularity", "row", "--exclude", "*norm*")
    code, _, err = run_cli(capsys, "fuse", "--backbone", m["base"],
                           "--task", f"a={m['task1']}:{tmp_path}/cores/a.safetensors",
                           "--task", f"b={m['task2']}:{tmp_path}/cores/b.safetensors", "--overlap", "largest",
                           "--base", m["base"], "--omega", "0.4", "--max-shard-size", "30000", "-o", tmp_path / "fused",
                           "-q")
    assert code == 0, err
    for step, out in (("cores", tmp_path / "cores"), ("fuse", tmp_path / "fused")):
        card = (out / "README.md").read_text()
        front = yaml.safe_load(card.split("---")[1])
        # local inputs: no base_model (Hub repo ids only), no absolute path in the card or the recipe
        assert front == {"tags": ["cpift", "merge"], "library_name": "transformers"}
        assert f"`{os.path.relpath(m['task1'], out)}`" in card and str(m["task1"].parent) not in card
        recipe = yaml.safe_load((out / "cpift_recipe.yml").read_text())
        assert recipe["cpift_step"] == step and recipe["relative_to_recipe"] is True
        assert str(tmp_path) not in (out / "cpift_recipe.yml").read_text()
        assert not (out / "mergekit_config.yml").exists()  # mergekit has no cores or fuse
        code, _, err = run_cli(capsys, "config", out / "cpift_recipe.yml", "-o", tmp_path / f"{step}-again", "-q")
        assert code == 0, err
        files = sorted(p.name for p in out.iterdir()
                       if p.suffix in (".safetensors", ".json") and p.name != "config.json")
        assert files and files == sorted(p.name for p in (tmp_path / f"{step}-again").iterdir()
                                         if p.suffix in (".safetensors", ".json") and p.name != "config.json")
        for f in files:
            assert (out / f).read_bytes() == (tmp_path / f"{step}-again" / f).read_bytes(), (step, f)
    recipe = tmp_path / "bad.yml"
    recipe.write_text((tmp_path / "fused" / "cpift_recipe.yml").read_text() + "colour: blue\n")
    assert_user_error(capsys, ["config", recipe, "-o", tmp_path / "x"], "colour", "unknown field")
    assert_user_error(capsys, ["fuse", "--backbone", m["base"],
                               "--task", f"a={m['task1']}:{tmp_path}/cores/a.safetensors",
                               "--base", m["base"], "-o", tmp_path / "x"], "--overlap largest")


def test_cores_and_fuse_are_byte_identical_across_runs_and_thread_counts(families, tmp_path, capsys):
    m = families[("llama", torch.float32)]
    outs = []
    for threads in ("1", "2", "1"):
        d = tmp_path / f"t{threads}-{len(outs)}"
        d.mkdir()
        code, _, err = run_cli(capsys, "cores", "--base", m["base"], "--model", f"a={m['task1']}", "--model",
                               f"b={m['task2']}", "--p", "5", "--granularity", "block:7", "-o", d / "cores",
                               "--threads", threads, "-q")
        assert code == 0, err
        code, _, err = run_cli(capsys, "fuse", "--backbone", m["base"],
                               "--task", f"a={m['task1']}:{d}/cores/a.safetensors",
                               "--task", f"b={m['task2']}:{d}/cores/b.safetensors", "-o", d / "fused",
                               "--threads", threads, "-q")
        assert code == 0, err
        outs.append(d)
    for d in outs[1:]:
        for f in ("cores/a.safetensors", "cores/b.safetensors", "fused/model.safetensors"):
            assert (d / f).read_bytes() == (outs[0] / f).read_bytes(), (d.name, f)


def test_cores_refuses_nonfinite_inputs(families, tmp_path, capsys):
    """A NaN or Inf in the base or a task: one line naming tensor, file and index; inputs untouched, no output."""
    import shutil

    from safetensors.torch import load_file

    m = families[("llama", torch.float32)]
    for where, value in (("task", float("nan")), ("base", float("inf"))):
        bad = tmp_path / f"bad-{where}"
        shutil.copytree(m["task1" if where == "task" else "base"], bad)
        shard = sorted(bad.glob("*.safetensors"))[1]
        part = load_file(str(shard))
        name = sorted(k for k in part if part[k].is_floating_point())[0]
        part[name].reshape(-1)[5] = value
        save_file(part, str(shard), metadata={"format": "pt"})
        base, task = (m["base"], bad) if where == "task" else (bad, m["task1"])
        err = assert_user_error(capsys, ["cores", "--base", base, "--model", f"a={task}", "-o", tmp_path / "out"],
                                f"tensor '{name}'", "non-finite", "flat index 5", inputs=[bad])
        assert str(bad) in err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
