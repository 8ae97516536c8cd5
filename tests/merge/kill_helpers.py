"""Kill a real `cpift-merge` process with SIGKILL at a chosen point of its merge (test-only).

The child patches the one function at that point and then runs the CLI's main, so the process dies
exactly there (nothing in cpift reads a test hook):
- ``shard N``: right after the manifest records its N-th finished shard;
- ``tensor K [N]``: right after the K-th tensor holds its bytes (once N shards are recorded, so a
  kill "mid-shard" has a finished shard before it);
- ``rename``: in the final swap: after ``os.replace(out, trash)`` moved an old output away
  (--overwrite), or right before ``os.replace(partial, out)``;
- ``sigint K [N]``: as ``tensor``, but the process interrupts itself (SIGINT, as Ctrl-C does).
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

KILLER = """
import json, os, signal, sys, time
point, arg, need = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import cpift.merge.io.resume as resume
import cpift.merge.io.writer as writer

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def recorded(journal):
    try:
        return json.loads((journal.tmp / resume.MANIFEST).read_text())["shards"]
    except (OSError, ValueError):
        return {}

if point == "shard":
    record = resume.Journal.record
    def patched(self, file, digest):
        record(self, file, digest)
        if len(self.data["shards"]) >= arg:
            die()
    resume.Journal.record = patched
elif point in ("tensor", "sigint"):
    written = writer.ShardWriter.written
    count = [0]
    def patched(self, name):
        written(self, name)
        count[0] += 1
        if count[0] == arg:
            # The hash thread records asynchronously, and the record counts once it is on disk.
            while len(recorded(self.journal)) < need:
                time.sleep(0.01)
            if point == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                die()
    writer.ShardWriter.written = patched
elif point == "rename":
    replace = os.replace
    def patched(src, dst):
        if str(src).endswith(".cpift-partial"):
            die()
        replace(src, dst)
        if str(dst).endswith(".cpift-old"):
            die()
    os.replace = patched
from cpift.cli.merge_cli import main
main(sys.argv[4:])
"""


def killed_run(argv: list, point: str, arg: int = 0, need: int = 0) -> subprocess.CompletedProcess:
    """Run ``cpift-merge *argv`` and check it died by SIGKILL at ``point`` (``sigint``: exit 130)."""
    r = subprocess.run([sys.executable, "-c", KILLER, point, str(arg), str(need), *map(str, argv)],
                       capture_output=True, text=True)
    assert r.returncode == (130 if point == "sigint" else -signal.SIGKILL), (r.returncode, r.stderr[-2000:])
    return r


def digest(d: Path) -> dict[str, str]:
    """File name → SHA-256 of every file under ``d`` (names relative to it)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(d).rglob("*")) if p.is_file()}
