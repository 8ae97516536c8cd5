"""madvise(2) through ctypes, for the prefetch of input and output pages.

Python's ``mmap.madvise`` holds the GIL for the whole call; ctypes releases it, so a prefetch thread
can map (and, on a cold cache, read) the next tensor's pages while the main thread computes.
"""

from __future__ import annotations

import ctypes
import mmap

PAGE = mmap.PAGESIZE
WILLNEED, DONTNEED, POPULATE_READ, POPULATE_WRITE = 3, 4, 22, 23  # <sys/mman.h> on Linux


def _load():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # not Linux/glibc: advice becomes a no-op
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load()


def address(mm: mmap.mmap) -> int:
    """Base address of a mapping (numpy reads it without needing a writable buffer)."""
    import numpy as np  # here, not at the top: reading headers (a refusal) imports no numpy

    return np.frombuffer(mm, dtype=np.uint8).ctypes.data


def advise(base: int, start: int, end: int, advice: int, *, outer: bool) -> bool:
    """madvise on [start, end) of a mapping at ``base``: every page the range touches (outer), or
    only the pages wholly inside it (a neighbouring tensor may still be in use). True on success."""
    if _madvise is None:
        return advice in (WILLNEED, DONTNEED)
    if outer:
        start, end = start // PAGE * PAGE, -(-end // PAGE) * PAGE
    else:
        start, end = -(-start // PAGE) * PAGE, end // PAGE * PAGE
    return end <= start or _madvise(base + start, end - start, advice) == 0


def close_maps(maps: dict) -> None:
    """Close every mmap of ``maps`` (values: (mmap, base address)) and forget them; a map a view still
    uses closes when the view is freed."""
    for mm, _ in maps.values():
        try:
            mm.close()
        except BufferError:
            pass
    maps.clear()
