"""Streaming merges on an accelerator: tensors go host → device through pinned buffers on a side stream.

The CPU path computes straight from the memory-mapped inputs into the memory-mapped output. With
``device="cuda"`` each tensor's inputs are uploaded by a worker thread, piece by piece: a piece of at
most ``piece_bytes`` is copied from the memory map into one of two page-locked (pinned) host buffers,
which the GPU's copy engine reads without a bounce buffer, and sent into the device tensor on a side
CUDA stream while the other buffer is filled; a buffer is refilled only after the event of its last
copy has completed. The page faults of the memory-mapped reads and the copies run on the worker while
the main thread launches the previous tensor's kernels; the compute stream waits on the upload's
event. Results come back the same way: device pieces copied into two pinned buffers in turn, each
drained into the output map once its copy's event has completed.

A compute dtype other than the storage dtype (``--dtype float32`` over bf16 models) is applied piece
by piece on the device: each piece lands in a one-piece device scratch in its storage dtype and is
converted into the device tensor there, so no whole-tensor copy exists in either dtype besides the
one the kernels read, and the bus carries the storage bytes.

Memory: pinned host memory is bounded, whatever the tensor sizes: two input pieces and two output
pieces (``pinned_bytes`` reports what is allocated, 4·piece_bytes at most); on the device, the inputs
of the two tensors in flight, one scratch piece, and what a ``DeviceCache`` holds (within its budget:
device copies kept across the passes of ``cores`` and global trim). ``device="cpu+staging"`` runs the
same loop on the CPU without pinning, streams or events: the tests use it to check that the staged path
gives byte-identical outputs, and that pinned bytes, pieces and the cache stay within their bounds, on
machines without a GPU.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import torch

from cpift.errors import ParameterError


def parse_device(value: str | torch.device | None) -> torch.device | None:
    """None/'cpu' → None (the in-place CPU path); 'cuda', 'cuda:N' → that device, checked to exist."""
    if value is None or str(value) == "cpu":
        return None
    if str(value) == "cpu+staging":
        return torch.device("cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ParameterError(f"device: unknown device '{value}' (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError(f"device: '{value}' was asked for but torch sees no CUDA device "
                                 f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ParameterError(f"device: '{value}' does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif device.type != "cpu":
        raise ParameterError(f"device: '{value}' is not supported (use cpu, cuda or cuda:N)")
    return device


def check_backend(backend: str | None, device: torch.device | None) -> str:
    """The one backend check of every entry point: the backend the kernels will run on ``device``'s
    tensors ("torch", "cpu" or "triton"), resolved once; a ParameterError (one line, before any output
    exists) if they cannot run as asked (e.g. --backend triton on a CPU-only machine without the
    interpreter)."""
    from cpift.kernels.backend import resolve

    probe = torch.empty(0, device=device) if device is not None and device.type == "cuda" else torch.empty(0)
    try:
        return resolve(backend, probe)
    except ValueError as e:
        raise ParameterError(str(e)) from None


PIECE_BYTES = 64 << 20  # per pinned buffer: large enough for full PCIe speed, small beside any model


class DeviceStager:
    """Stage tensor j's inputs on the device while tensor j − 1 computes; bring results back."""

    def __init__(self, device: torch.device, *, piece_bytes: int = PIECE_BYTES) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.piece_bytes = piece_bytes
        self._rings: dict[str, list[torch.Tensor]] = {}
        self._events: dict[tuple[str, int], torch.cuda.Event] = {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpift-stage")
        self._jobs: dict[int, Future] = {}
        self._scratch = torch.empty(0, dtype=torch.uint8, device=device)
        self.pieces = {"in": 0, "out": 0}  # copies made through the rings, for tests and reports

    @property
    def pinned_bytes(self) -> int:
        """Host staging memory allocated (pinned on CUDA): at most 4·piece_bytes."""
        return sum(b.numel() for ring in self._rings.values() for b in ring)

    def _ring(self, kind: str, k: int, nbytes: int) -> torch.Tensor:
        """Buffer k % 2 of ring `kind` ("in" or "out"), at least nbytes, once its last copy is done."""
        ring = self._rings.setdefault(kind, [])
        slot = k % 2
        event = self._events.pop((kind, slot), None)
        if event is not None:
            event.synchronize()  # the copy that last used this buffer has finished with it
        if len(ring) <= slot:
            ring.append(torch.empty(0, dtype=torch.uint8))
        if ring[slot].numel() < nbytes:  # grown in powers of two up to piece_bytes
            size = min(self.piece_bytes, 1 << max(nbytes - 1, 1).bit_length())
            ring[slot] = torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda)
        return ring[slot]

    def _record(self, kind: str, k: int, stream) -> None:
        if self.cuda:
            event = torch.cuda.Event()
            event.record(stream)
            self._events[(kind, k % 2)] = event

    def _pieces(self, t: torch.Tensor):
        """(start, end) element ranges of t, each at most piece_bytes."""
        step = max(1, self.piece_bytes // t.element_size())
        return [(s, min(s + step, t.numel())) for s in range(0, t.numel(), step)]

    def _piece_in(self, dev: torch.Tensor, s: int, e: int, host: torch.Tensor) -> None:
        """dev[s:e] ← host (a pinned piece); a piece of another dtype goes through the device scratch and
        is converted there (on the side stream, in order: the next piece waits for this conversion)."""
        if host.dtype == dev.dtype:
            dev[s:e].copy_(host, non_blocking=self.cuda)
            return
        if self._scratch.numel() < host.numel() * host.element_size():
            self._scratch = torch.empty(self.piece_bytes, dtype=torch.uint8, device=self.device)
        raw = self._scratch[:host.numel() * host.element_size()].view(host.dtype)
        raw.copy_(host, non_blocking=self.cuda)
        dev[s:e].copy_(raw)

    def _upload(self, views: list[torch.Tensor], dtype: torch.dtype | None
                ) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        """Worker thread: the views on the device (floating ones in `dtype` if given), and the event
        after their last copy."""
        out, k = [], 0
        with torch.cuda.stream(self.stream) if self.cuda else nullcontext():
            for v in views:
                to = dtype if dtype is not None and v.is_floating_point() else v.dtype
                dev = torch.empty(v.numel(), dtype=to, device=self.device)
                for s, e in self._pieces(v):
                    nbytes = (e - s) * v.element_size()
                    host = self._ring("in", k, nbytes)[:nbytes].view(v.dtype)
                    host.copy_(v[s:e])
                    self._piece_in(dev, s, e, host)
                    self._record("in", k, self.stream)
                    k += 1
                out.append(dev)
        self.pieces["in"] += k
        done = None
        if self.cuda:
            done = torch.cuda.Event()
            done.record(self.stream)
        return out, done

    def stage(self, j: int, views: list[torch.Tensor], dtype: torch.dtype | None = None) -> None:
        """Start tensor j's upload on the worker thread (reads, pinned copies and the side stream's copies);
        floating views arrive in `dtype` when given (converted piece by piece on the device)."""
        self._jobs[j] = self._worker.submit(self._upload, list(views), dtype)

    def take(self, j: int) -> list[torch.Tensor]:
        """Tensor j's inputs on the device, ordered after their upload on the compute stream."""
        views, done = self._jobs.pop(j).result()
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for v in views:
                v.record_stream(current)  # allocated on the side stream, used on this one
        return views

    def store(self, result: torch.Tensor, out: torch.Tensor) -> None:
        """Copy a device result into the (memory-mapped) host output, piece by piece through the out ring."""
        flat, dst = result.reshape(-1), out.reshape(-1)
        current = torch.cuda.current_stream(self.device) if self.cuda else None
        pending = None
        for k, (s, e) in enumerate(self._pieces(flat)):
            nbytes = (e - s) * flat.element_size()
            host = self._ring("out", k, nbytes)[:nbytes].view(flat.dtype)
            host.copy_(flat[s:e], non_blocking=self.cuda)
            self._record("out", k, current)
            if pending is not None:  # drain the previous piece while this one copies
                self._drain(*pending, dst)
            pending = (k, s, e, host)
            self.pieces["out"] += 1
        if pending is not None:
            self._drain(*pending, dst)

    def _drain(self, k: int, s: int, e: int, host: torch.Tensor, dst: torch.Tensor) -> None:
        event = self._events.pop(("out", k % 2), None)
        if event is not None:
            event.synchronize()
        dst[s:e].copy_(host)

    def close(self) -> None:
        """Finish pending uploads and stop the worker thread."""
        self._worker.shutdown(wait=True)


CPU_CACHE_BYTES = 256 << 20  # device="cpu+staging" (tests): big enough for test models


class DeviceCache:
    """Device copies of staged tensors, kept across the passes of one job (``cores``, global trim) so a
    later pass does not read and upload them again; at most ``budget_bytes``.

    The passes visit the tensors in one order, so a tensor is admitted only while it fits and stays
    until ``clear``: evicting older entries for newer ones (LRU) would evict each one before its next
    use and leave nothing to hit. The tensors are the kernels' inputs, which no kernel writes.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, int(budget_bytes))
        self.used_bytes = 0
        self.hits = self.misses = 0
        self._held: dict[str, list[torch.Tensor]] = {}

    @classmethod
    def for_device(cls, device: torch.device | None, *, fraction: float = 0.5) -> DeviceCache | None:
        """A cache for a job on `device` (None without staging): on CUDA, `fraction` of the memory free
        now (the rest stays for the tensors in flight and the kernels' scratch)."""
        if device is None:
            return None
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return cls(int(free * fraction))
        return cls(CPU_CACHE_BYTES)

    def __contains__(self, name: str) -> bool:
        return name in self._held

    def get(self, name: str) -> list[torch.Tensor] | None:
        """The device copies held for `name`, or None (counted as a hit or a miss)."""
        held = self._held.get(name)
        if held is None:
            self.misses += 1
        else:
            self.hits += 1
        return held

    def offer(self, name: str, tensors: list[torch.Tensor]) -> bool:
        """Keep `tensors` for `name` if they fit in what is left of the budget; whether they were kept."""
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if name in self._held or self.used_bytes + nbytes > self.budget_bytes:
            return False
        self._held[name] = list(tensors)
        self.used_bytes += nbytes
        return True

    def clear(self) -> None:
        """Drop every copy (the device memory returns to torch's allocator)."""
        self._held.clear()
        self.used_bytes = 0
