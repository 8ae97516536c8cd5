"""What cpift wrote into one of its outputs: the ``.cpift-output`` marker's file list.

The rule (docs/safety.md#data-safety): ``--overwrite`` removes only what cpift recorded. When an output is
published, its marker is rewritten with every entry the output holds (relative paths, directories
included), and a later ``--overwrite`` compares the directory with that list: an entry the list does
not name (a file the user put there afterwards, or anything in an output of a cpift that recorded no
list) is not cpift's, so the overwrite is refused naming it; nothing is deleted. Refusing, not
carrying the file over into the new output, because a new output holding an old file would mix two
runs, and a file silently moved is as surprising as one deleted.

Standard library only (publish.py imports it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MARKER = ".cpift-output"
RESUME_JOURNAL = "cpift-resume.json"  # what a partial, resumable output holds until it is published
VERSION = 2


def marker_text(files: list[str] | None = None) -> str:
    """The marker's JSON: a partial directory's (no list yet) or a published output's (its entries)."""
    record: dict = {"written_by": "cpift", "version": VERSION if files is not None else 1}
    if files is not None:
        record["files"] = files
    return json.dumps(record) + "\n"


def entries(root: Path) -> list[str]:
    """Every path under ``root`` except the marker, relative and sorted (symlinks not followed)."""
    found: list[str] = []
    for here, dirs, files in os.walk(root):
        rel = Path(here).relative_to(root)
        found += [(rel / name).as_posix() for name in dirs + files]
    return sorted(p for p in found if p != MARKER)


def recorded(root: Path) -> set[str] | None:
    """The entries the marker of ``root`` lists (None: no readable list, e.g. an older cpift's)."""
    try:
        with open(root / MARKER, "rb") as f:
            data = json.loads(f.read(16_000_000))
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(p, str) for p in files):
        return None
    return set(files)


def unrecorded(root: Path) -> Path | None:
    """The first entry of the cpift output ``root`` that its marker does not list, or None.

    An empty directory and one holding only the marker have none.
    """
    present = entries(root)
    listed = recorded(root) if present else set()
    for rel in present:
        if listed is None or rel not in listed:
            return root / rel
    return None
