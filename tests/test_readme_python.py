"""The ```python blocks of README.md and docs/*.md run as typed, where README.md's first session ran."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", flags=re.M | re.S)
BLOCKS = [code for doc in DOCUMENTS for code in PYTHON_BLOCK.findall(doc.read_text())]


def test_readme_python_example_runs_as_typed(tmp_path):
    from cpift.merge.tools.demo import run_demo

    assert BLOCKS, "README.md and docs/ have no ```python block"
    run_demo(str(tmp_path / "cpift-session"), size="tiny", echo=lambda line: None)  # the session's first line
    for code in BLOCKS:
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (code, done.stderr[-3000:])
        assert "Traceback" not in done.stderr
