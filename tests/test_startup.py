"""``--help`` and refusals cost nothing: no command's help, and no refusal of bad input that can be seen
without torch (paths, safetensors headers, numbers, YAML, shapes), imports torch, numba, triton or transformers.

Import time is what a user waits for before the first line of help (torch alone is ~0.9 s here), so
the rule is checked on what is imported, not on a clock (timings live in benchmarks/).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

HEAVY = ("torch", "numba", "triton", "transformers", "safetensors", "huggingface_hub", "numpy")

_PROBE = """
import json, sys
from cpift.cli.merge_cli import cli as merge, main as merge_main
from cpift.cli.train_cli import cli as train, main as train_main
import click
ctx = click.Context(merge)
calls = [(merge_main, []), (train_main, [])]
calls += [(merge_main, [name]) for name in merge.list_commands(ctx)]
calls += [(train_main, [name]) for name in train.list_commands(click.Context(train))]
for main, argv in calls:
    try:
        main(argv + ["--help"])
    except SystemExit as e:
        assert e.code in (0, None), (argv, e.code)
print(json.dumps({"commands": [a for _, a in calls], "heavy": sorted(m for m in %r if m in sys.modules)}))
"""


def test_no_help_imports_a_heavy_library() -> None:
    run = subprocess.run([sys.executable, "-c", _PROBE % (HEAVY,)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert ["slerp"] in report["commands"] and ["sft"] in report["commands"]  # every command was asked
    assert report["heavy"] == [], f"--help imported {report['heavy']}"


# Each refusal is (argv, a piece of the one-line error); {d} is the directory of the test's inputs.
REFUSALS = [
    (["slerp", "{d}/a", "{d}/missing", "-o", "{d}/out"], "{d}/missing: model directory does not exist"),
    (["slerp", "{d}/a", "{d}/badjson", "-o", "{d}/out"], "{d}/badjson/model.safetensors: not a safetensors file"),
    (["slerp", "{d}/a", "{d}/truncated", "-o", "{d}/out"], "{d}/truncated/model.safetensors: truncated"),
    (["linear", "{d}/a", "{d}/noshard", "-o", "{d}/out"], "names shard 'model-00002-of-00002.safetensors'"),
    (["slerp", "{d}/a", "{d}/wide", "-o", "{d}/out"], "tensor 'w': shape [8, 4] in {d}/a but [8, 5] in {d}/wide"),
    (["ties", "--base", "{d}/a", "{d}/b", "{d}/wide", "-o", "{d}/out"], "tensor 'w': shape [8, 4]"),
    (["slerp", "{d}/a", "{d}/b", "--t", "x", "-o", "{d}/out"], "'--t'"),
    (["slerp", "{d}/a", "{d}/b", "--t", "7", "-o", "{d}/out"], "t: 7.0 is outside [0.0, 1.0]"),
    (["ties", "--base", "{d}/a", "{d}/b", "--density", "1.5", "-o", "{d}/out"], "density: 1.5 is outside (0.0, 1.0]"),
    (["linear", "{d}/a", "{d}/b", "--weights", "1,y", "-o", "{d}/out"], "--weights"),
    (["slerp", "{d}/a", "{d}/b", "--max-shard-size", "3XB", "-o", "{d}/out"], "max_shard_size: cannot read '3XB'"),
    (["config", "{d}/bad.yml", "-o", "{d}/out"], "{d}/bad.yml: line 3, column 1: invalid YAML"),
    (["config", "{d}/wide.yml", "-o", "{d}/out"], "tensor 'w': shape [8, 4] in {d}/a but [8, 5] in {d}/wide"),
    (["config", "{d}/t.yml", "-o", "{d}/out"], "parameters.t: 5 is outside [0, 1]"),
]

_REFUSE = """
import io, json, sys, contextlib
from cpift.cli.merge_cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    out.append({"argv": argv, "code": code, "stderr": err.getvalue(),
                "heavy": sorted(m for m in %r if m in sys.modules)})
print(json.dumps(out))
"""


def _write_safetensors(path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A float32 safetensors file from (dtype, shape) per tensor, written without torch."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = 4 * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"\x01" * offset)


def _inputs(d) -> None:
    shapes = {"w": ("F32", [8, 4]), "v": ("F32", [5])}
    for name in ("a", "b"):
        _write_safetensors(d / name / "model.safetensors", shapes)
    _write_safetensors(d / "wide" / "model.safetensors", {"w": ("F32", [8, 5]), "v": ("F32", [5])})
    (d / "badjson").mkdir()
    (d / "badjson" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    _write_safetensors(d / "truncated" / "model.safetensors", shapes)
    data = (d / "truncated" / "model.safetensors").read_bytes()
    (d / "truncated" / "model.safetensors").write_bytes(data[:-10])
    _write_safetensors(d / "noshard" / "model-00001-of-00002.safetensors", {"w": ("F32", [8, 4])})
    (d / "noshard" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}))
    (d / "bad.yml").write_text("merge_method: slerp\nmodels: [\n")
    for name, other, t in (("wide", "wide", 0.5), ("t", "b", 5)):
        (d / f"{name}.yml").write_text(f"merge_method: slerp\nbase_model: {d}/a\nmodels:\n  - model: {d}/a\n"
                                       f"  - model: {d}/{other}\nparameters:\n  t: {t}\n")


def test_refusals_of_bad_input_import_no_heavy_library(tmp_path) -> None:
    """Bad paths, headers, numbers, YAML and shapes are refused (exit 2, one line) before torch is imported."""
    _inputs(tmp_path)
    argvs = [[a.format(d=tmp_path) for a in argv] for argv, _ in REFUSALS]
    run = subprocess.run([sys.executable, "-c", _REFUSE % (HEAVY,), json.dumps(argvs)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for (_, expected), got in zip(REFUSALS, results):
        lines = got["stderr"].splitlines()
        assert got["code"] == 2 and len(lines) == 1, got
        assert lines[0].startswith("cpift-merge: error: ") and expected.format(d=tmp_path) in lines[0], got
        assert got["heavy"] == [], f"{got['argv']} imported {got['heavy']} before refusing"
