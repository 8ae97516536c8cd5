"""What reading a model's tensors cold costs the CPU: through the page cache (shared maps, as cpift did
before merge/io/direct_read.py) against O_DIRECT into reused buffers, each followed by one read per
4 KiB page, the least any kernel does with the data.

    python benchmarks/first_touch.py --out benchmarks/results/first-touch.md M/task_a M/task_b

For each path and round: the inputs are evicted (posix_fadvise DONTNEED per file), then one
TensorStream over them (CPIFT_DIRECT_IO=0 for the maps, =always for O_DIRECT) touches every page of every
tensor; the table gives the wall time of the stream, the time spent in the touch loop and the process's
user and system CPU seconds. On a VM that backs its memory lazily the touch of a fresh page-cache page
is a trip to the host; a reused buffer was backed once.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


def evict(dirs: list[Path]) -> None:
    for d in dirs:
        for f in d.glob("*.safetensors"):
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def one(dirs: list[Path], mode: str) -> tuple[float, float, float, float, float]:
    """(wall s, touch s, user CPU s, system CPU s, GB read) of one cold stream with CPIFT_DIRECT_IO=mode."""
    os.environ["CPIFT_DIRECT_IO"] = mode
    from cpift.merge.io.checkpoint import Checkpoint
    from cpift.merge.io.stream import TensorStream

    evict(dirs)
    models = [Checkpoint(d) for d in dirs]
    names = models[0].names()
    cpu, t0, touch, nbytes = os.times(), time.perf_counter(), 0.0, 0
    with TensorStream(models, names) as stream:
        for item in stream:
            t = time.perf_counter()
            for v in item.inputs:
                step = max(1, 4096 // v.element_size())
                v[::step].float().sum()  # one entry per page, at least
                nbytes += v.numel() * v.element_size()
            touch += time.perf_counter() - t
    now = os.times()
    for m in models:
        m.close()
    return time.perf_counter() - t0, touch, now.user - cpu.user, now.system - cpu.system, nbytes / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help="model directories (single-file or sharded safetensors)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the results here as markdown")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the touch loop: one thread, as a kernel's worker would be
    rows = []
    for r in range(args.rounds):
        for name, mode in (("page cache (maps)", "0"), ("O_DIRECT (reused buffers)", "always")):
            wall, touch, user, system, gb = one(args.models, mode)
            rows.append((r + 1, name, wall, touch, user, system, gb))
            print(f"round {r + 1} {name:26s} wall {wall:6.2f} s  touch {touch:5.2f} s  user {user:5.2f} s  "
                  f"system {system:5.2f} s  ({gb:.2f} GB)", file=sys.stderr)
    if args.out:
        lines = [f"# First touch of cold inputs ({datetime.now(timezone.utc).isoformat(timespec='seconds')})", "",
                 f"Machine: {os.cpu_count()} CPUs, {platform.platform()}; inputs {', '.join(map(str, args.models))} "
                 f"({rows[0][6]:.2f} GB), evicted before each stream; one read per 4 KiB page of every tensor.", "",
                 "| round | read path | wall s | touch loop s | user CPU s | system CPU s |",
                 "|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {r} | {n} | {w:.2f} | {t:.2f} | {u:.2f} | {s:.2f} |" for r, n, w, t, u, s, _ in rows]
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
