"""Output shards written with O_DIRECT from two reused staging buffers, by a thread behind the math.

Writing through the page cache (the shared maps of merge/io/writer.py) makes the kernel allocate and
zero a page-cache page for every output byte before the math fills it, and on a machine whose memory is
backed lazily (a VM that hands freed memory back to its host) that first touch is a trip to the host:
3 GiB written with buffered write(2) to a new file took 4.6–7.8 s here, nearly all of it system time,
against 1.9–2.0 s and 0.13 s of system time with O_DIRECT from one reused buffer
(benchmarks/results/write-path.md; a shared map took 0.6 s right after, on memory those writes had backed).

So a merge's output tensor is a view of a page-aligned staging buffer. Once it holds its final bytes
(``done``), a writer thread writes the buffer's whole 4 KiB blocks with O_DIRECT while the math fills
the other buffer. Each shard is written front to back, in plan order: the bytes of a block not yet
complete (the header's end, a tensor's last bytes) are carried into the next buffer ahead of the next
tensor, and a shard's last partial block goes through the page cache with a plain pwrite. With
``hashed`` shards, the thread hashes each one's bytes as it writes them, for --resume's manifest
(merge/io/resume.py), so nothing is read back.

Memory: at most two buffers, together at most 1 GiB (STAGING) unless one tensor alone is larger, then
one. Where O_DIRECT is refused (tmpfs, some network file systems) or ``CPIFT_DIRECT_IO=0``, the writer
keeps its shared maps.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cpift.errors import ParameterError

ALIGN = 4096  # O_DIRECT's unit: file offsets, lengths and buffer addresses (a multiple of any logical block)
ENV = "CPIFT_DIRECT_IO"  # "0" keeps the page-cache path
HUGE = 2 << 20  # buffers are sized in 2 MiB steps, so one fits many tensors of nearby sizes
STAGING = 1 << 30  # bytes of the two staging buffers together (one larger tensor is staged alone)


OFF, ON = ("0", "no", "off", "false"), ("", "1", "yes", "on", "true", "auto", "always")


def setting() -> str:
    """CPIFT_DIRECT_IO, lower-cased (unset: "1").

    Raises:
        ParameterError: a value that is none of 0/no/off/false, 1/yes/on/true/auto, always.
    """
    value = os.environ.get(ENV, "1").strip().lower()
    if value not in OFF + ON:
        raise ParameterError(f"{ENV}={os.environ[ENV]!r}: expected 1 (O_DIRECT where the page cache misses), "
                             f"0 (the page cache only) or always")
    return value


def wanted() -> bool:
    """False where CPIFT_DIRECT_IO says 0 (or no, off, false), or the platform has no O_DIRECT."""
    return hasattr(os, "O_DIRECT") and setting() not in OFF


def supported(file: Path) -> bool:
    """Whether ``file``'s file system opens it for O_DIRECT writes (tmpfs, for one, refuses)."""
    try:
        os.close(os.open(file, os.O_WRONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


class _Buffers:
    """At most two page-aligned staging buffers (anonymous maps): one filled by the math, one written;
    together at most STAGING bytes, unless one tensor alone is larger (the math then waits for the write
    of the other, instead of holding two copies of the largest tensors)."""

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._count = 0
        self._bytes = 0  # of every buffer, free or busy
        self._cond = threading.Condition()

    def take(self, size: int) -> mmap.mmap:
        """A free buffer of at least ``size`` bytes; waits while the writer holds what is needed."""
        cap = -(-size // HUGE) * HUGE
        with self._cond:
            while True:
                fit = [b for b in self._free if len(b) >= size]
                if fit:
                    buf = min(fit, key=len)
                    self._free.remove(buf)
                    return buf
                if self._count == 0 or (self._count < 2 and self._bytes + cap <= STAGING):
                    break
                if self._free:  # too small: dropped, and its room counted again
                    self._drop(self._free.pop(0))
                    continue
                self._cond.wait()  # the writer holds the other buffer: wait for its write
            self._count += 1
            self._bytes += cap
        buf = mmap.mmap(-1, cap)
        if hasattr(buf, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
            buf.madvise(mmap.MADV_HUGEPAGE)  # fewer, larger first-touch faults
        return buf

    def _drop(self, buf: mmap.mmap) -> None:
        self._count -= 1
        self._bytes -= len(buf)
        close_buffer(buf)

    def give(self, buf: mmap.mmap) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            while self._free:
                self._drop(self._free.pop())


def close_buffer(buf: mmap.mmap) -> None:
    """Unmap a staging buffer (left to the garbage collector while a tensor still views it)."""
    try:
        buf.close()
    except BufferError:  # a tensor still views it: freed with that view
        pass


@dataclass
class _Shard:
    path: Path
    pos: int = 0  # file offset of the first byte not yet queued (a multiple of ALIGN)
    tail: bytes = b""  # the bytes from pos on, not yet queued: an incomplete block (or the header)
    open: tuple[mmap.mmap, int] | None = None  # (buffer, bytes used) of the tensor being computed
    hash: "hashlib._Hash | None" = None
    fds: tuple[int, int] | None = field(default=None, repr=False)  # (O_DIRECT, plain), opened by the thread


class DirectShards:
    """Writes the shards ``files`` (created at their final size by the caller) front to back.

    Args:
        files: the shard files, each already holding its header and fallocated.
        headers: each shard's header bytes (rewritten in place with the first tensor's block).
        hashed: per shard, whether to hash its bytes; ``on_hash(file name, sha256 hex)`` gets each digest
            once the shard is complete on disk.

    ``view`` hands out tensor bytes in plan order; ``done`` queues them; ``close`` waits for every write
    and raises the first OSError the thread met (``check`` raises it earlier); ``abort`` drops the rest.
    """

    def __init__(self, files: list[Path], headers: list[bytes], hashed: list[bool],
                 on_hash: Callable[[str, str], None]):
        self._shards = [_Shard(f, tail=h, hash=hashlib.sha256() if want else None)
                        for f, h, want in zip(files, headers, hashed)]
        self._on_hash = on_hash
        self._buffers = _Buffers()
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._direct = True  # False once the file system refused an O_DIRECT write (EINVAL)
        self._thread = threading.Thread(target=self._run, name="cpift-direct-write", daemon=True)
        self._thread.start()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def view(self, i: int, offset: int, nbytes: int) -> memoryview:
        """A writable view of ``nbytes`` for the tensor at file ``offset`` of shard ``i`` (the next one)."""
        self.check()
        s = self._shards[i]
        if offset != s.pos + len(s.tail) or s.open is not None:
            raise RuntimeError(f"{s.path}: tensors must be written in the shard plan's order")
        used = len(s.tail) + nbytes
        buf = self._buffers.take(used)
        buf[:len(s.tail)] = s.tail
        s.open = (buf, used)
        return memoryview(buf)[len(s.tail):used]

    def done(self, i: int, *, last: bool) -> None:
        """The tensor last viewed in shard ``i`` holds its final bytes (``last``: the shard's last one)."""
        self.check()
        s = self._shards[i]
        buf, used = s.open if s.open is not None else (None, 0)
        s.open = None
        if buf is None:  # a zero-size tensor: only the carried bytes
            if last and s.tail:
                self._put(lambda s=s, data=s.tail, at=s.pos: self._write(s, data, at, direct=False))
                s.pos, s.tail = s.pos + len(s.tail), b""
            if last:
                self._put(lambda s=s: self._finish(s))
            return
        cut = used // ALIGN * ALIGN  # whole blocks: O_DIRECT
        rest = bytes(buf[cut:used])
        pos = s.pos
        if cut:
            self._put(lambda s=s, data=memoryview(buf)[:cut], at=pos: self._write(s, data, at, direct=True))
        if last:
            if rest:
                self._put(lambda s=s, data=rest, at=pos + cut: self._write(s, data, at, direct=False))
            self._put(lambda s=s: self._finish(s))
            s.pos, s.tail = pos + used, b""
        else:
            s.pos, s.tail = pos + cut, rest
        self._put(lambda buf=buf: self._buffers.give(buf))

    def _put(self, op: Callable[[], None]) -> None:
        self._queue.put(op)

    def _run(self) -> None:
        while (op := self._queue.get()) is not None:
            try:
                op()
            except Exception as e:  # noqa: BLE001 - kept for the main thread, which raises it (check)
                if self._error is None:
                    self._error = e

    def _fds(self, s: _Shard) -> tuple[int, int]:
        if s.fds is None:
            plain = os.open(s.path, os.O_WRONLY)
            try:
                direct = os.open(s.path, os.O_WRONLY | os.O_DIRECT)
            except OSError:
                direct = -1
            s.fds = (direct, plain)
        return s.fds

    def _write(self, s: _Shard, data, at: int, *, direct: bool) -> None:
        if self._error is not None:
            return  # the merge fails with the first error: nothing more is written
        fd_direct, fd_plain = self._fds(s)
        view = memoryview(data)
        done = 0
        while done < len(view):
            use_direct = direct and self._direct and fd_direct >= 0 and done % ALIGN == 0
            fd = fd_direct if use_direct else fd_plain
            try:
                n = os.pwrite(fd, view[done:], at + done)
            except OSError as e:
                if use_direct and e.errno == errno.EINVAL:  # this file system wants other alignment
                    self._direct = False
                    continue
                raise
            if n <= 0:
                raise OSError(errno.EIO, f"short write to {s.path}")
            done += n
        if s.hash is not None:
            s.hash.update(view)

    @staticmethod
    def _close_fds(s: _Shard) -> None:
        for fd in s.fds or ():
            if fd >= 0:
                os.close(fd)
        s.fds = None

    def _finish(self, s: _Shard) -> None:
        self._close_fds(s)
        if s.hash is not None and self._error is None:
            self._on_hash(s.path.name, s.hash.hexdigest())

    def close(self) -> None:
        """Wait for every queued write (and hash); raise the first OSError."""
        self._stop()
        self.check()

    def abort(self) -> None:
        """Stop after the writes already queued; close every file; keep the first error for ``check``."""
        self._stop()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        for s in self._shards:
            s.open = None
            self._close_fds(s)
        self._buffers.close()


__all__ = ["ALIGN", "ENV", "DirectShards", "close_buffer", "supported", "wanted"]
