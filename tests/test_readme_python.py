"""README.md's ```python blocks run as typed, where its first session ran (issue 22, class 9)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.M | re.S)


def test_readme_python_example_runs_as_typed(tmp_path):
    from cpift.merge.tools.demo import run_demo

    assert BLOCKS, "README.md has no ```python block"
    run_demo(str(tmp_path / "cpift-session"), size="tiny", echo=lambda line: None)  # the session's first line
    for code in BLOCKS:
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (code, done.stderr[-3000:])
        assert "Traceback" not in done.stderr
