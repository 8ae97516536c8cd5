"""What writing one model's bytes costs on this machine: buffered write(2) into the page cache, a
shared map of a fallocated file (cpift's page-cache path: MADV_POPULATE_WRITE, copy, MADV_DONTNEED), and
O_DIRECT (cpift's default path, merge/io/direct.py), each to a new file, twice in a row (the second
round reuses memory the first backed), with the process's CPU seconds.

    python benchmarks/write_path.py --dir /path/on/the/disk --gb 3 --out benchmarks/results/write-path.md

On a VM whose memory is backed lazily, a tool that writes through the page cache (a shared map, cat, dd
without oflag=direct, safetensors' save_file) pays the host's first touch of every page; an O_DIRECT
write does not. The files are written in 8 MiB pieces from one page-aligned buffer and removed after
each round.
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

CHUNK = 8 << 20


def write_once(path: Path, size: int, flags: int, buf: mmap.mmap) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flags, 0o644)  # a new file: never an old one
    try:
        t0 = time.perf_counter()
        for off in range(0, size, CHUNK):
            os.pwrite(fd, buf, off)
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        path.unlink()


def write_mapped(path: Path, size: int, buf: mmap.mmap) -> float:
    import ctypes

    import numpy as np

    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        t0 = time.perf_counter()
        os.posix_fallocate(fd, 0, size)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        dst, src = np.frombuffer(mm, dtype=np.uint8), np.frombuffer(buf, dtype=np.uint8)
        for off in range(0, size, CHUNK):
            madvise(dst.ctypes.data + off, CHUNK, 23)  # MADV_POPULATE_WRITE
            dst[off:off + CHUNK] = src
            madvise(dst.ctypes.data + off, CHUNK, 4)  # MADV_DONTNEED
        del dst
        mm.close()
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        path.unlink()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="a directory on the disk to measure")
    ap.add_argument("--gb", type=float, default=3.0, help="GiB per file (default 3)")
    ap.add_argument("--out", type=Path, help="write the results here as markdown")
    args = ap.parse_args(argv)
    size = int(args.gb * (1 << 30)) // CHUNK * CHUNK
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(CHUNK))
    rows = []
    for name in ["buffered", "shared map", "O_DIRECT"] * 2:
        path = args.dir / f".cpift-write-path-{os.getpid()}"
        cpu = os.times()
        if name == "shared map":
            t = write_mapped(path, size, buf)
        else:
            t = write_once(path, size, os.O_DIRECT if name == "O_DIRECT" else 0, buf)
        now = os.times()
        user, system = now.user - cpu.user, now.system - cpu.system
        rows.append((name, t, size / t / 1e9, user, system))
        print(f"{name:10s} {t:6.2f} s  {size / t / 1e9:.2f} GB/s  user {user:.2f} s  system {system:.2f} s")
    if args.out:
        lines = [f"# Write path ({datetime.now(timezone.utc).isoformat(timespec='seconds')})", "",
                 f"Machine: {os.cpu_count()} CPUs, {platform.platform()}; {size / 1e9:.2f} GB per file, "
                 f"8 MiB writes to a new file in `{args.dir}`, rounds in this order.", "",
                 "| round | write | s | GB/s | user CPU s | system CPU s |", "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {i + 1} | {n} | {t:.2f} | {r:.2f} | {u:.2f} | {y:.2f} |"
                  for i, (n, t, r, u, y) in enumerate(rows)]
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
