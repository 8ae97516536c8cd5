"""Cold-cache runs without root: drop one's own files from the page cache, and check that they are out.

``evict`` writes back dirty pages (``os.sync``) and then asks the kernel, file by file, to drop the
cached pages (``posix_fadvise(POSIX_FADV_DONTNEED)``): it needs no privilege and touches no other
process's cache, unlike writing /proc/sys/vm/drop_caches. ``resident_fraction`` reads what is still
cached with ``mincore(2)`` on a read-only map of each file (a map is not a read: nothing is loaded).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import Iterable

_libc = ctypes.CDLL(None, use_errno=True)


def model_files(dirs: Iterable[str | os.PathLike]) -> list[Path]:
    """The regular files of each model directory (shards, index, config), sorted."""
    return sorted(p for d in dirs for p in Path(d).iterdir() if p.is_file())


def evict(files: Iterable[Path]) -> None:
    """Write back dirty pages, then drop each file's pages from the page cache."""
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _resident_pages(f: Path) -> tuple[int, int]:
    """(pages of ``f`` in the page cache, pages of ``f``)."""
    import numpy as np  # only for the map's address (ctypes wants a writable buffer)

    size = f.stat().st_size
    if size == 0:
        return 0, 0
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mm:
        view = np.frombuffer(mm, dtype=np.uint8)
        ok = _libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec) == 0
        del view  # the map closes only once nothing views it
    if not ok:
        raise OSError(ctypes.get_errno(), f"mincore failed on {f}")
    return sum(v & 1 for v in vec), pages


def resident_fraction(files: Iterable[Path]) -> float:
    """The share of the files' pages that are in the page cache (0.0 after ``evict``)."""
    counts = [_resident_pages(f) for f in files]
    total = sum(p for _, p in counts)
    return sum(r for r, _ in counts) / total if total else 0.0
