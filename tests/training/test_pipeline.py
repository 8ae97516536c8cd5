"""cpift-train pipeline: CPI-FT and every baseline end to end on a tiny Llama, exact freezing across stages,
resume after SIGKILL, recipe errors (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from training_helpers import load_state, make_model, run_cli, write_jsonl

from cpift.merge.cpi.masks import load_core_mask
from cpift.training.evaluate import evaluate
from cpift.training.pipeline import run_pipeline, split_stages

TASKS = {"add": lambda a, b: (f"{a}+{b}=", str(a + b)),  # every character is in the test tokenizer
         "cat": lambda a, b: (f"{a}:{b}=", f"{a}{b}"),
         "rev": lambda a, b: (f"{a}{b}?", f"{b}{a}")}
N_TRAIN, PROBE, PER_TASK, CAL = 12, 3, 2, 1


def rows(task: str, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, response = TASKS[task](*torch.randint(0, 10, (2,), generator=g).tolist())
        out.append({"prompt": prompt, "response": response})
    return out


RECIPE = """base: base
seed: 0
tasks:
  - {name: add, train: add.jsonl, eval: add-eval.jsonl}
  - {name: cat, train: cat.jsonl, eval: cat-eval.jsonl}
  - {name: rev, train: rev.jsonl, eval: rev-eval.jsonl}
probe: {steps: %d, lr: 1e-2, batch_size: 4, warmup: 0}
p: 5
tau: 1.0
order: random
train: {steps_per_task: %d, lr: 1e-2, batch_size: 4, warmup: 0, weight_decay: 0.1}
calibration: {examples: 5, steps_per_task: %d, lr: 1e-2, batch_size: 4, warmup: 0, weight_decay: 0.1}
baselines:
  stages: 2
  groups: [[add, cat], [rev]]
  ties: {density: 0.5}
eval: {batch_size: 4, max_length: 32}
""" % (PROBE, PER_TASK, CAL)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A base model, three small tasks and a recipe; tau = 1 keeps every task in its own stage."""
    root = tmp_path_factory.mktemp("pipeline")
    make_model(root / "base")
    for i, task in enumerate(TASKS):
        write_jsonl(root / f"{task}.jsonl", rows(task, N_TRAIN, i))
        write_jsonl(root / f"{task}-eval.jsonl", rows(task, 3, 10 + i))
    (root / "recipe.yml").write_text(RECIPE)
    return root


@pytest.fixture(scope="module")
def cpi(project) -> Path:
    wd = project / "cpi"
    run_pipeline(project / "recipe.yml", wd)
    return wd


def test_cpi_ft_end_to_end(cpi, project):
    report = json.loads((cpi / "report.json").read_text())
    cluster = json.loads((cpi / "cluster.json").read_text())
    stages = [cluster["groups"][g] for g in cluster["order"]]
    assert report["method"] == "cpi-ft" and report["stages"] == stages and len(stages) == 3
    assert sorted(n for g in stages for n in g) == sorted(TASKS)
    assert report["final_model"] == "calibrated/3"
    keys = ([f"probe:{t}" for t in TASKS] + ["cores", "cluster", "stages:1", "stages:2", "stages:3", "fuse",
                                               "calibrated:1", "calibrated:2", "calibrated:3", "eval"])
    assert [s["step"] for s in report["steps"]] == keys and not any(s["resumed"] for s in report["steps"])
    assert report["optimizer_steps"] == 3 * PROBE + 3 * PER_TASK + 3 * CAL
    # the report's scores are those of the final model, evaluated independently here
    for task in TASKS:
        fresh = evaluate(cpi / "calibrated" / "3", project / f"{task}-eval.jsonl", batch_size=4, max_length=32,
                         progress=False)
        assert report["tasks"][task] == pytest.approx(fresh, rel=1e-6)
    # calibration data (the default, mixed): every stage a balanced sample of all tasks' training lines
    for s in range(1, len(stages) + 1):
        sample = Counter((cpi / "data" / f"calibrated-{s}.jsonl").read_text().splitlines())
        for task in TASKS:
            source = Counter((project / f"{task}.jsonl").read_text().splitlines())
            assert sum((sample & source).values()) == 5  # five lines of each task, drawn without replacement
        assert sum(sample.values()) == 5 * len(TASKS)
    md = (cpi / "report.md").read_text()
    assert "| task | eval loss | exact match | n |" in md and "| **total** |" in md


def core_union(cpi: Path, tasks: list[str], state: dict) -> dict[str, torch.Tensor]:
    masks = [load_core_mask(cpi / "cores" / f"{t}.safetensors") for t in tasks]
    return {n: torch.stack([m.element_mask(n) for m in masks]).any(0) for n in masks[0].names}


@pytest.mark.parametrize("folder", ["stages", "calibrated"])
def test_earlier_cores_bit_identical_across_later_stages(cpi, folder):
    stages = json.loads((cpi / "report.json").read_text())["stages"]
    for s in (2, 3):
        before, after = load_state(cpi / folder / str(s - 1)), load_state(cpi / folder / str(s))
        frozen = core_union(cpi, [t for g in stages[:s - 1] for t in g], before)
        assert sum(int(m.sum()) for m in frozen.values()) > 0
        moved = 0
        for name, mask in frozen.items():
            assert torch.equal(before[name][mask], after[name][mask]), (folder, s, name)
            moved += int((before[name][~mask] != after[name][~mask]).sum())
        assert moved > 0  # the stage trained everything else


def test_rerun_skips_every_step(cpi, capsys):
    mtimes = {p: p.stat().st_mtime_ns for p in cpi.rglob("*") if p.is_file() and not p.name.startswith("report")}
    code, out, err = run_cli(capsys, "pipeline", cpi.parent / "recipe.yml", "-o", cpi, "-q")
    assert code == 0, err
    assert out.count("done before, skipped") == 13 and "| task | eval loss |" in out
    assert all(s["resumed"] for s in json.loads((cpi / "report.json").read_text())["steps"])
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_rerun_with_other_settings_refused(cpi, capsys):
    code, out, err = run_cli(capsys, "pipeline", cpi.parent / "recipe.yml", "-o", cpi, "--seed", 5, "-q")
    assert code == 2 and err.count("\n") == 1 and "made by another run (differs in seed)" in err


def test_resume_after_sigkill(project):
    wd = project / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "cpift.cli.train_cli", "pipeline", str(project / "recipe.yml"),
                             "-o", str(wd), "-q", "--threads", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (wd / "probes" / "add").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (wd / "report.json").exists()
    first = {p: p.stat().st_mtime_ns for p in (wd / "probes" / "add").iterdir()}

    report = run_pipeline(project / "recipe.yml", wd)
    assert {p: p.stat().st_mtime_ns for p in first} == first
    steps = {s["step"]: s for s in report["steps"]}
    assert steps["probe:add"]["resumed"] and not steps["eval"]["resumed"]
    assert len(steps) == 13 and (wd / "calibrated" / "3" / "model.safetensors").exists()
    assert not list(wd.rglob(".*cpift-partial"))


@pytest.mark.parametrize("method", ["full-sft", "multistage-random", "multistage-heuristic"])
def test_staged_baselines(project, method):
    wd = project / method
    report = run_pipeline(project / "recipe.yml", wd, method=method, stages=2, seed=4)
    expected = {"full-sft": [list(TASKS)], "multistage-random": split_stages(list(TASKS), 2, 4),
                "multistage-heuristic": [["add", "cat"], ["rev"]]}[method]
    assert report["stages"] == expected and report["settings"]["seed"] == 4
    # the same budget as CPI-FT's staged SFT: steps_per_task for every task, whatever the grouping
    assert report["optimizer_steps"] == 3 * PER_TASK
    assert [s["step"] for s in report["steps"]] == [f"stages:{s}" for s in range(1, len(expected) + 1)] + ["eval"]
    for s, group in enumerate(expected, 1):
        data = (wd / "data" / f"stages-{s}.jsonl").read_text().splitlines()
        assert sorted(data) == sorted(line for t in group for line in (project / f"{t}.jsonl").read_text().splitlines())
    assert not (wd / "probes").exists() and set(report["tasks"]) == set(TASKS)


@pytest.mark.parametrize("method", ["task-arithmetic", "ties"])
def test_merge_baselines(project, method):
    wd = project / method
    report = run_pipeline(project / "recipe.yml", wd, method=method)
    assert report["final_model"] == "merged" and report["optimizer_steps"] == 3 * PROBE
    merged, base = load_state(wd / "merged"), load_state(project / "base")
    probes = [load_state(wd / "probes" / t) for t in TASKS]
    name = "model.layers.0.mlp.down_proj.weight"
    deltas = torch.stack([p[name].double() - base[name].double() for p in probes])
    if method == "task-arithmetic":  # b + λ Σ (x_i − b), λ = 1
        assert torch.allclose(merged[name].double(), base[name].double() + deltas.sum(0), atol=1e-6)
    else:  # TIES keeps at most the top half of each delta: entries no probe kept stay at the base
        assert not torch.equal(merged[name], base[name])
        untouched = (merged[name] == base[name]).double().mean()
        assert untouched > 0.05
    fresh = evaluate(wd / "merged", project / "add-eval.jsonl", batch_size=4, max_length=32, progress=False)
    assert report["tasks"]["add"] == pytest.approx(fresh, rel=1e-6)


@pytest.mark.parametrize("edit,message", [
    (lambda r: r + "colour: blue\n", "recipe.yml: colour: unknown key"),
    (lambda r: r.replace("probe: {steps", "probe: {stepz: 1, steps"), "recipe.yml: probe.stepz: unknown key"),
    (lambda r: r.replace("train: cat.jsonl", "train: missing.jsonl"), "recipe.yml: tasks[1].train: "),
    (lambda r: r.replace("p: 5", "p: 150"), "recipe.yml: p: 150 is outside (0, 100]"),
    (lambda r: r.replace("p: 5", "p: 0"), "recipe.yml: p: 0 is outside (0, 100]"),
    (lambda r: r.replace("tau: 1.0", "tau: 1.5"), "recipe.yml: tau: 1.5 is outside [0, 1]"),
    (lambda r: r.replace("tau: 1.0", "tau: high"), "recipe.yml: tau: expected a number, got 'high'"),
    (lambda r: r.replace("base: base", "base: nowhere"), "recipe.yml: base: "),
    (lambda r: r.replace("order: random", "order: sorted"), "recipe.yml: order: expected one of random, given"),
    (lambda r: r.replace("[[add, cat], [rev]]", "[[add], [rev]]"), "baselines.groups: must name every task"),
    (lambda r: r.replace("name: cat", "name: add"), "tasks[1].name: duplicate task name 'add'"),
    (lambda r: r.replace("lr: 1e-2, batch_size: 4, warmup: 0}", "lr: -1, batch_size: 4, warmup: 0}", 1),
     "recipe.yml: probe.lr: -1 is not > 0"),
    (lambda r: r + "tasks: [\n", "recipe.yml:"),
], ids=["unknown-key", "unknown-sft-key", "missing-task-file", "p-high", "p-zero", "tau-high", "tau-text",
        "missing-base", "bad-order", "groups-incomplete", "duplicate-task", "negative-lr", "bad-yaml"])
def test_recipe_errors(project, capsys, tmp_path, edit, message):
    bad = project / f"bad-{os.getpid()}.yml"
    bad.write_text(edit(RECIPE))
    try:
        code, out, err = run_cli(capsys, "pipeline", bad, "-o", tmp_path / "wd", "-q")
    finally:
        bad.unlink()
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert message.replace("recipe.yml", bad.name) in err, err
    assert not (tmp_path / "wd").exists()


def test_bad_task_data_named_before_anything_is_written(project, capsys, tmp_path):
    for f in ("base", "cat.jsonl", "rev.jsonl", "add-eval.jsonl", "cat-eval.jsonl", "rev-eval.jsonl"):
        os.symlink(project / f, tmp_path / f)
    write_jsonl(tmp_path / "add.jsonl", ['{"prompt": "1+1=", "response": "2"}', '{"prompt": "1+1="'])
    (tmp_path / "recipe.yml").write_text(RECIPE)
    code, out, err = run_cli(capsys, "pipeline", tmp_path / "recipe.yml", "-o", tmp_path / "wd", "-q")
    assert code == 2 and "add.jsonl:2: not valid JSON" in err and err.count("\n") == 1
    assert not (tmp_path / "wd").exists()


def test_stages_out_of_range(project, capsys, tmp_path):
    code, _, err = run_cli(capsys, "pipeline", project / "recipe.yml", "-o", tmp_path / "wd", "--method",
                           "multistage-random", "--stages", 4, "-q")
    assert code == 2 and "stages: 4 stages cannot split 3 tasks" in err and not (tmp_path / "wd").exists()


def test_pipeline_on_two_fsdp_ranks(cpi, project):
    """torchrun, 2 gloo ranks, --fsdp: every rank trains, rank 0 alone runs the other steps and reports once;
    the steps, plan and stage data are the one-process run's, the cores frozen across stages bit-identical,
    and the scores those of one process up to the float32 sums' order."""
    wd = project / "fsdp-ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cpift.cli.train_cli", "pipeline", str(project / "recipe.yml"), "-o", str(wd), "--fsdp", "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| task | eval loss |") == 1 and proc.stdout.count("probe:add: ") == 1
    one, two = (json.loads((d / "report.json").read_text()) for d in (cpi, wd))
    assert [s["step"] for s in two["steps"]] == [s["step"] for s in one["steps"]]
    assert two["stages"] == one["stages"] and two["optimizer_steps"] == one["optimizer_steps"]
    for data in (cpi / "data").iterdir():
        assert (wd / "data" / data.name).read_bytes() == data.read_bytes()
    stages = two["stages"]
    for s in (2, 3):
        before, after = load_state(wd / "calibrated" / str(s - 1)), load_state(wd / "calibrated" / str(s))
        for name, mask in core_union(wd, [t for g in stages[:s - 1] for t in g], before).items():
            assert torch.equal(before[name][mask], after[name][mask]), (s, name)
    for task in TASKS:
        assert two["tasks"][task]["loss"] == pytest.approx(one["tasks"][task]["loss"], rel=1e-3), task
