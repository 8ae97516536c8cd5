"""``--help`` costs nothing: no command's help imports torch, numba, triton or transformers.

Import time is what a user waits for before the first line of help (torch alone is ~0.9 s here), so
the rule is checked on what is imported, not on a clock (timings live in benchmarks/).
"""

from __future__ import annotations

import json
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
