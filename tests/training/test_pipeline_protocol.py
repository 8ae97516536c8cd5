"""Protocol options of the pipeline: calibration on the stage's group only, one learning-rate schedule
continued across stages, and fusion's omega, each against the default on the same tiny project."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from test_pipeline import CAL, PER_TASK, RECIPE, TASKS, rows
from training_helpers import make_model, write_jsonl

from cpift.training.pipeline import run_pipeline
from cpift.training.sft import lr_factor


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("protocol")
    make_model(root / "base")
    for i, task in enumerate(TASKS):
        write_jsonl(root / f"{task}.jsonl", rows(task, 12, i))
        write_jsonl(root / f"{task}-eval.jsonl", rows(task, 3, 10 + i))
    return root


def recipe(root: Path, name: str, *, train: str = "", calibration: str = "", fuse: str = "") -> Path:
    text = RECIPE
    if train:
        text = text.replace("weight_decay: 0.1}\ncalibration", f"weight_decay: 0.1, {train}}}\ncalibration")
    if calibration:
        text = text.replace("weight_decay: 0.1}\nbaselines", f"weight_decay: 0.1, {calibration}}}\nbaselines")
    if fuse:
        text += f"fuse: {{{fuse}}}\n"
    path = root / f"{name}.yml"
    path.write_text(text)
    return path


def test_calibration_on_the_group_only(root):
    wd = root / "group"
    report = run_pipeline(recipe(root, "group", calibration="data: group"), wd)
    for s, group in enumerate(report["stages"], 1):
        sample = Counter((wd / "data" / f"calibrated-{s}.jsonl").read_text().splitlines())
        source = Counter((root / f"{group[0]}.jsonl").read_text().splitlines())
        assert sum(sample.values()) == 5 and not sample - source
    assert report["settings"]["calibration"]["data"] == "group"


def _lrs(model: Path) -> list[float]:
    return json.loads((model / "metrics.json").read_text())["lr"]


def test_schedule_continues_across_stages(root):
    wd = root / "continue"
    report = run_pipeline(recipe(root, "continue", train="schedule: continue, warmup: 0.2",
                                 calibration="schedule: continue"), wd)
    n = len(report["stages"])
    for folder, per_task in (("stages", PER_TASK), ("calibrated", CAL)):
        total = per_task * n  # one task per stage (tau = 1)
        warm = round((0.2 if folder == "stages" else 0.0) * total)
        seen = [lr for s in range(1, n + 1) for lr in _lrs(wd / folder / str(s))]
        expected = [1e-2 * lr_factor(i, total, warm) for i in range(total)]
        assert seen == pytest.approx(expected, rel=1e-12), folder
    # restart (the default): every stage has its own warm-up and cosine, starting at the peak again
    first, last = _lrs(root / "continue" / "stages" / "1"), _lrs(wd / "stages" / str(n))
    assert last[-1] < first[0]
    default = run_pipeline(recipe(root, "restart", train="warmup: 0.2"), root / "restart")
    assert [_lrs(root / "restart" / "stages" / str(s))[0] for s in range(1, n + 1)] == \
        pytest.approx([1e-2 * lr_factor(0, PER_TASK, round(0.2 * PER_TASK))] * n)
    assert default["settings"]["train"]["schedule"] == "restart"


@pytest.mark.parametrize("omega", [0.0, 0.1])
def test_omega_reaches_the_fusion(root, omega):
    wd = root / f"omega{omega}"
    run_pipeline(recipe(root, f"omega{omega}", fuse=f"omega: {omega}"), wd)
    assert json.loads((wd / "pipeline.json").read_text())["recipe"]["omega"] == omega
    assert f"omega: {omega}" in (wd / "fused" / "cpift_recipe.yml").read_text()


@pytest.mark.parametrize("field, value, message", [
    ("calibration", "data: all", "calibration.data: expected one of mixed, group"),
    ("train", "schedule: cosine", "train.schedule: expected one of restart, continue")])
def test_bad_protocol_option(root, field, value, message):
    from cpift.errors import ConfigError

    path = recipe(root, "bad", **{field: value})
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        run_pipeline(path, root / "bad-wd")
    assert not (root / "bad-wd").exists()


def test_eval_teacher_forced_per_item(root):
    """eval.exact_match / eval.per_item reach the pipeline's eval: the per-item verdicts of teacher forcing
    equal greedy generation's on the same trained model (the full-sft run of the default recipe)."""
    from cpift.training.evaluate import evaluate

    text = RECIPE.replace("eval: {batch_size: 4, max_length: 32}",
                          "eval: {batch_size: 4, max_length: 32, exact_match: teacher-forced, per_item: true}")
    path = root / "tf.yml"
    path.write_text(text)
    wd = root / "tf"
    report = run_pipeline(path, wd, method="full-sft")
    final = wd / report["final_model"]
    for task in TASKS:
        tf = report["tasks"][task]
        greedy = evaluate(final, root / f"{task}-eval.jsonl", batch_size=4, max_length=32, progress=False,
                          per_item=True)
        assert [i["hit"] for i in tf["items"]] == [i["hit"] for i in greedy["items"]]
        assert tf["exact_match"] == greedy["exact_match"] and len(tf["items"]) == 3
    assert report["settings"]["eval"]["exact_match"] == "teacher-forced"


def test_bad_eval_mode(root):
    from cpift.errors import ConfigError

    path = root / "bad-eval.yml"
    path.write_text(RECIPE.replace("max_length: 32}", "max_length: 32, exact_match: beam}"))
    with pytest.raises(ConfigError, match=r"eval\.exact_match: expected one of greedy, teacher-forced"):
        run_pipeline(path, root / "bad-eval-wd")
    assert not (root / "bad-eval-wd").exists()
