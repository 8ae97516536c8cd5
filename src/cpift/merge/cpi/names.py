"""Task names: they become mask file names and recipe keys, so they are checked in one place."""

from __future__ import annotations

import re
from typing import Sequence

from cpift.errors import ParameterError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_task_names(names: Sequence[str], field_name: str = "model") -> None:
    """Task names become file names and recipe keys: unique, and of letters, digits, '_', '.', '-'."""
    seen = set()
    for n in names:
        if not _NAME.match(n):
            raise ParameterError(f"{field_name}: task name '{n}' must start with a letter or digit and use only "
                                 f"letters, digits, '_', '.', '-'")
        if n in seen:
            raise ParameterError(f"{field_name}: duplicate task name '{n}'")
        seen.add(n)
