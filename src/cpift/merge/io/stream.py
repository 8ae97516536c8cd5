"""The one stream every step iterates: the tensors of N inputs, in order, prefetched and staged.

A ``TensorStream`` walks a list of tensor names over N sources (checkpoints, or anything with
``get(name)``) and yields, per name, the flat zero-copy host views of every source and the same
tensors where the math runs. Around that loop it does what every step needs:

- prefetch: a background thread maps (and, on a cold cache, reads) the pages of the next tensors of
  every source, and of the optional writer's output, while the current one computes, as far ahead
  as a budget of mapped bytes allows (PREFETCH_BYTES), and asks the kernel to read ahead the bytes
  after those (HINT_BYTES, madvise WILLNEED); page faults taken by torch's worker threads contend
  (0.85 GB/s measured), which is why pages are mapped ahead from one thread. Pages are released
  once the caller is done with a tensor, which frees room in the budget.
- device staging: with a device, the tensors go host → device through pinned buffers on a side
  stream (merge/io/device.py); ``stage_next`` starts the next upload while this tensor's kernels run.
  A ``DeviceCache`` shared by the streams of several passes keeps device copies between them: a
  tensor it holds is neither prefetched nor uploaded again.
- progress: a tqdm bar in bytes read, with its rate (GB/s), off when stderr is no terminal.

``stream_merge`` (merge/engine.py), the three passes of ``cores``, global trim and ``cluster``
all iterate it, so each runs on the device and backend asked for.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch

from .device import DeviceCache, DeviceStager


class Source(Protocol):
    def get(self, name: str) -> torch.Tensor: ...


class Bar(Protocol):
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **values: object) -> None: ...
    def close(self) -> None: ...


class NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **values: object) -> None: ...
    def close(self) -> None: ...


def progress_bar(desc: str, total: int, enabled: bool, **units: object) -> Bar:
    """A tqdm bar on stderr, or a silent one: the one rule of every progress bar cpift shows (merges,
    cores, SFT, eval). It is off when stderr is not a terminal (``disable=None``), so logs and pipes
    never get carriage-return redraws (a 10 kB line per SFT run). Default units: bytes, rate in GB/s;
    ``units`` overrides them (``unit="step"``)."""
    if not enabled:
        return NoBar()
    from tqdm import tqdm

    kw = {"unit": "B", "unit_scale": True, "unit_divisor": 1000, "leave": False, **units}
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, disable=None, **kw)


# How far the prefetch runs ahead, in input bytes mapped into this process (resident): the tensor being
# computed counts, and one tensor larger than this is still mapped alone. Beyond that window the next
# HINT_BYTES are only announced to the kernel (madvise WILLNEED: read-ahead into the page cache, not into
# this process), so a cold disk keeps a queue of reads while the window waits for the math.
PREFETCH_BYTES = 1 << 30
HINT_BYTES = 1 << 30


def tensor_bytes(source: object, name: str) -> int:
    """Bytes of tensor ``name`` in ``source`` (0 when the source does not say)."""
    info = getattr(source, "tensors", {}).get(name)
    return int(getattr(info, "nbytes", 0))


class Prefetcher:
    """Maps the pages of the next tensors of every source, and of their outputs, from a background
    thread, while the mapped input bytes stay within ``budget`` (PREFETCH_BYTES); hints the read-ahead of
    the next ``hint_budget`` bytes beyond. Sources without ``populate`` / ``release`` (packed masks) are
    skipped; ``hint`` is optional."""

    def __init__(self, sources: Sequence[Source], writer, names: list[str], *, budget: int | None = None,
                 hint_budget: int | None = None):
        self.sources = [s for s in sources if hasattr(s, "populate")]
        self.writer, self.names = writer, names
        self.budget = PREFETCH_BYTES if budget is None else budget
        self.hint_budget = HINT_BYTES if hint_budget is None else hint_budget
        self.sizes = [sum(tensor_bytes(s, n) for s in self.sources) for n in names]
        self._ready = [threading.Event() for _ in names]
        self._room = threading.Condition()
        self.mapped = 0  # input bytes populated and not yet released
        self.in_flight = 0  # tensors populated and not yet released
        self._hinted = 0  # tensors whose read-ahead was asked for
        self._stop = False
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cpift-prefetch", daemon=True)
        self.thread.start()

    def _take(self, j: int) -> bool:
        """Wait until tensor j fits the budget (or nothing is mapped); False when stopped."""
        with self._room:
            while not self._stop and self.in_flight and self.mapped + self.sizes[j] > self.budget:
                self._room.wait()
            if self._stop:
                return False
            self.mapped += self.sizes[j]
            self.in_flight += 1
            return True

    def _hint(self, j: int) -> None:
        """Ask for the read-ahead of the tensors after j, up to hint_budget bytes past the budget."""
        ahead = sum(self.sizes[j:self._hinted])
        while self._hinted < len(self.names) and ahead + self.sizes[self._hinted] <= self.hint_budget + self.budget:
            ahead += self.sizes[self._hinted]
            for s in self.sources:
                if hasattr(s, "hint"):
                    s.hint(self.names[self._hinted])
            self._hinted += 1

    def _run(self) -> None:
        try:
            for j, name in enumerate(self.names):
                self._hint(j)
                if not self._take(j):
                    return
                for s in self.sources:
                    s.populate(name)
                if self.writer is not None:
                    self.writer.populate(name)
                self._ready[j].set()
        except BaseException as e:  # re-raised in the main thread by wait()
            self._error = e
            for ev in self._ready:
                ev.set()

    def wait(self, j: int) -> None:
        self._ready[j].wait()
        if self._error is not None:
            raise self._error

    def done(self, j: int) -> None:
        for s in self.sources:
            s.release(self.names[j])
        if self.writer is not None:
            self.writer.release(self.names[j])
        with self._room:
            self.mapped -= self.sizes[j]
            self.in_flight -= 1
            self._room.notify()

    def stop(self) -> None:
        with self._room:
            self._stop = True
            self._room.notify()
        self.thread.join()


@dataclass
class StreamItem:
    """One tensor of every source: ``views`` on the host (flat, zero-copy), ``inputs`` where the math
    runs (the views themselves without a device, or for a name that is not staged)."""

    index: int
    name: str
    views: list[torch.Tensor]
    inputs: list[torch.Tensor]
    nbytes: int


class TensorStream:
    """Iterate ``names`` over ``sources``; use as a context manager (``close`` stops the prefetch).

    Args:
        sources: checkpoints (or anything with ``get(name)``; ``populate``/``release`` when prefetched).
        names: tensor names, in the order they are visited.
        writer: an output whose pages are prefetched with the inputs (``populate``/``release``).
        device: where ``inputs`` live (None: the host views themselves; merge/io/device.py).
        bar: progress, advanced by each tensor's input bytes when it is done.
        staged: which names go to the device (default: all); the others' inputs are the host views.
        prefetch: map pages ahead from a background thread.
        cache: device copies kept across the streams of several passes (merge/io/device.py).
        dtype: floating inputs arrive on the device in this dtype (converted piece by piece there).

    Example:
        with TensorStream(models, names, device=dev) as stream:
            for item in stream:
                top.count(item.inputs[0], item.inputs[1:])
    """

    def __init__(self, sources: Sequence[Source], names: Sequence[str], *, writer=None,
                 device: torch.device | None = None, bar: Bar | None = None,
                 staged: Callable[[str], bool] | None = None, prefetch: bool = True,
                 cache: DeviceCache | None = None, dtype: torch.dtype | None = None) -> None:
        self.sources, self.names = list(sources), list(names)
        self.bar = bar or NoBar()
        self.stager = DeviceStager(device) if device is not None else None
        self._staged = staged or (lambda name: True)
        self.cache = cache if self.stager is not None else None
        self.dtype = dtype
        # Tensors the cache already holds need no pages: the prefetcher walks the others.
        read = [n for n in self.names if self.cache is None or n not in self.cache]
        self._order = {n: i for i, n in enumerate(read)}
        self._prefetch = Prefetcher(self.sources, writer, read) if prefetch else None
        self._uploaded: set[int] = set()
        self._done: set[int] = set()

    @property
    def staging(self) -> bool:
        return self.stager is not None

    def _views(self, j: int) -> list[torch.Tensor]:
        """Tensor j's host views (zero-copy maps), once the prefetcher has its pages (if it reads them)."""
        if self._prefetch is not None and self.names[j] in self._order:
            self._prefetch.wait(self._order[self.names[j]])
        return [s.get(self.names[j]).reshape(-1) for s in self.sources]

    def _upload(self, j: int, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tensor j on the device (its upload started here or by stage_next), offered to the cache."""
        if j not in self._uploaded:
            self.stager.stage(j, views, self.dtype)
        inputs = self.stager.take(j)
        if self.cache is not None:
            self.cache.offer(self.names[j], inputs)
        return inputs

    def __iter__(self) -> Iterator[StreamItem]:
        for j, name in enumerate(self.names):
            staged = self.stager is not None and self._staged(name)
            inputs = self.cache.get(name) if staged and self.cache is not None else None
            views = [] if inputs is not None else self._views(j)  # a cached tensor needs no host views
            if inputs is None:
                inputs = self._upload(j, views) if staged else views
            nbytes = sum(t.numel() * t.element_size() for t in (views or inputs))
            item = StreamItem(j, name, views, inputs, nbytes)
            del views, inputs  # only the item holds them: done() drops them before the pages go
            yield item
            self.done(item)

    def stage_next(self, item: StreamItem) -> None:
        """Start the upload of the next tensor now, while this one's kernels run."""
        j = item.index + 1
        if self.stager is None or j >= len(self.names) or not self._staged(self.names[j]):
            return
        if self.cache is not None and self.names[j] in self.cache:
            return  # held on the device: nothing to upload
        self.stager.stage(j, self._views(j), self.dtype)
        self._uploaded.add(j)

    def store(self, result: torch.Tensor, out: torch.Tensor) -> None:
        """Copy a result computed on the device into the (memory-mapped) host output."""
        if self.stager is None:
            out.copy_(result)
        else:
            self.stager.store(result, out)

    def done(self, item: StreamItem) -> None:
        """Release the tensor's pages and count its bytes (again: nothing)."""
        if item.index in self._done:
            return
        self._done.add(item.index)
        item.views = item.inputs = []
        if self._prefetch is not None and item.name in self._order:
            self._prefetch.done(self._order[item.name])
        self.bar.update(item.nbytes)

    @property
    def pinned_bytes(self) -> int:
        """Host staging memory the device path holds (0 without one): bounded, see merge/io/device.py."""
        return self.stager.pinned_bytes if self.stager is not None else 0

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()
        if self._prefetch is not None:
            self._prefetch.stop()
            self._prefetch = None

    def __enter__(self) -> TensorStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
