"""CI runs the README's test command verbatim, inside a virtual environment it creates itself."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    lines = [ln for ln in text.splitlines() if "# install + tests" in ln]
    assert len(lines) == 1, "README.md must have exactly one '# install + tests' line in Set-up"
    return lines[0].split("#", 1)[0].strip()


def test_ci_runs_the_readme_test_command_in_a_fresh_venv() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = _readme_test_command()
    assert command == "pip install torch==2.13.0 && pip install -e \".[test]\" && python -m pytest"
    assert ci[-1].strip() == command
    body = "\n".join(ci)
    # A new venv under a temporary directory, activated before the command runs.
    assert re.search(r'venv="\$\(mktemp -d', body)
    assert 'python3 -m venv "$venv"' in body and 'source "$venv/bin/activate"' in body
    assert body.index("activate") < body.index(command)
