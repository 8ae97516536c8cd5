"""Input tensors not in the page cache, read with O_DIRECT into reused page-aligned buffers.

A tensor read through the page cache lands in pages the process has never touched. On a machine whose
memory is backed lazily (a VM that returns freed memory to its host), the first touch of each 4 KiB
page then costs a trip to the host: reading one entry per 4 KiB page of 6.4 GB of freshly read
inputs took 2.6–3.0 s here (benchmarks/results/first-touch.md), more than SLERP's whole arithmetic,
against 0.05 s in reused buffers filled with O_DIRECT. An O_DIRECT read instead lands
in buffers this process keeps reusing, already backed, with no page-cache copy either.

So ``Checkpoint.populate`` (merge/io/checkpoint.py) asks ``resident`` whether a tensor's pages are all
in the page cache (mincore): then it maps them, zero-copy, as before (a warm cache stays as fast as
memory); otherwise it reads the tensor here, in 8 MiB pieces on 4 threads (several requests in
flight keep the disk busy), into a buffer of the shared pool. ``give`` returns the buffer once the
stream is done with the tensor (``release``). The pool keeps at most ``KEEP`` bytes of free buffers.

Steps that read the inputs more than once run inside ``several_passes`` and read through the page
cache. ``CPIFT_DIRECT_IO=0`` keeps every read on the page cache; ``always`` reads every tensor of at least
one byte with O_DIRECT, cached or not (the tests use it). A file system that refuses O_DIRECT (tmpfs)
falls back to the maps.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
from typing import Iterator

from . import direct

ALIGN = direct.ALIGN
PIECE = 8 << 20  # bytes per read request
THREADS = 4  # requests in flight
SMALL = 1 << 20  # smaller tensors stay on the maps (their pages are shared with their neighbours')
KEEP = 512 << 20  # free buffer bytes the pool keeps for reuse
STEP = 2 << 20  # buffer sizes are rounded up to this


_PASSES = [0]  # steps under way that read their inputs more than once (several_passes)


@contextlib.contextmanager
def several_passes() -> Iterator[None]:
    """Reads inside go through the page cache, as before O_DIRECT: a step that reads the inputs again
    (cores' three passes, a global trim before the merge) then finds them cached, so mapped, instead of
    reading the disk once per pass."""
    _PASSES[0] += 1
    try:
        yield
    finally:
        _PASSES[0] -= 1


def mode() -> str:
    """'off', 'auto' (direct where the pages are not all cached) or 'always', from CPIFT_DIRECT_IO;
    'off' inside ``several_passes``."""
    if not direct.wanted() or _PASSES[0]:
        return "off"
    return "always" if direct.setting() == "always" else "auto"


def _load_mincore():
    try:
        fn = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_mincore = _load_mincore()


def resident(base: int, start: int, end: int) -> bool:
    """Whether every page of [start, end) of the file mapped at ``base`` is in the page cache (True when
    mincore is unavailable: the maps are the safe default)."""
    import numpy as np  # here: reading headers (a refusal) imports no numpy

    if _mincore is None:
        return True
    lo, hi = start // mmap.PAGESIZE * mmap.PAGESIZE, -(-end // mmap.PAGESIZE) * mmap.PAGESIZE
    vec = np.zeros((hi - lo) // mmap.PAGESIZE, dtype=np.uint8)
    if _mincore(base + lo, hi - lo, vec.ctypes.data) != 0:
        return True
    return bool((vec & 1).all())


class Pool:
    """Page-aligned read buffers shared by every checkpoint of the process, reused best-fit."""

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self._threads = None  # a ThreadPoolExecutor, started by the first read

    def _take(self, size: int) -> mmap.mmap:
        with self._lock:
            fit = [b for b in self._free if size <= len(b) <= 2 * size + STEP]  # not a big one for a small tensor
            if fit:
                buf = min(fit, key=len)
                self._free.remove(buf)
                return buf
        return mmap.mmap(-1, -(-size // STEP) * STEP)

    def give(self, buf: mmap.mmap) -> None:
        """Return a buffer whose tensor is done (no view of it may be used after this)."""
        with self._lock:
            self._free.append(buf)
            self._free.sort(key=len)
            while sum(len(b) for b in self._free) > KEEP and len(self._free) > 1:
                direct.close_buffer(self._free.pop())  # the largest first

    def read(self, fd: int, start: int, end: int) -> tuple[mmap.mmap, int]:
        """Bytes [start, end) of the file open at ``fd`` (with O_DIRECT) as (buffer, offset of ``start``
        in it). Raises OSError (EINVAL: the file system wants another alignment; read it through the
        maps)."""
        lo, hi = start // ALIGN * ALIGN, -(-end // ALIGN) * ALIGN
        buf = self._take(hi - lo)
        view = memoryview(buf)
        pieces = []
        try:
            with self._lock:
                if self._threads is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._threads = ThreadPoolExecutor(THREADS, thread_name_prefix="cpift-direct-read")
            pieces = [self._threads.submit(_read, fd, view[at - lo:min(at + PIECE, hi) - lo], at, end - at)
                      for at in range(lo, hi, PIECE)]
            for p in pieces:
                p.result()
        except BaseException:
            for p in pieces:
                p.cancel()
            for p in pieces:  # every piece stopped before the buffer is reused
                if not p.cancelled():
                    p.exception()
            view.release()
            self.give(buf)
            raise
        view.release()
        return buf, start - lo


def _read(fd: int, view: memoryview, at: int, need: int) -> None:
    """Fill ``view`` from offset ``at``; only the first ``need`` bytes must exist (the file may end
    inside the last block)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], at + done)
        if n == 0:
            break
        done += n
    if done < min(need, len(view)):
        raise OSError(5, f"short read at byte {at + done}")


POOL = Pool()

__all__ = ["POOL", "Pool", "mode", "resident", "several_passes"]
