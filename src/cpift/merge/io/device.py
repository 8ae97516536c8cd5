"""Streaming merges on an accelerator: tensors go host → device through pinned buffers on a side stream.

The CPU path computes straight from the memory-mapped inputs into the memory-mapped output. With
``device="cuda"`` each tensor's inputs are copied into page-locked (pinned) host buffers, which the
GPU's copy engine reads without a bounce buffer, then sent to the device on a separate CUDA stream
while the previous tensor's kernels run on the compute stream; the result comes back through a
pinned buffer into the output map. Two buffer slots alternate, and a slot is refilled only after
the event of its previous copy has completed, so a copy never reads a buffer being overwritten.

Memory: two pinned slots per input and one for the output, each as large as the largest tensor
staged so far (grown on demand), plus the device tensors of two tensors in flight.
``device="cpu+staging"`` runs the same staging loop on the CPU without pinning or streams: the tests
use it to check that the staged path gives byte-identical outputs on machines without a GPU.
"""

from __future__ import annotations

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


class DeviceStager:
    """Stage tensor j's inputs on the device while tensor j − 1 computes; bring results back."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._host: dict[tuple, torch.Tensor] = {}
        self._events: dict[int, torch.cuda.Event] = {}
        self._staged: dict[int, list[torch.Tensor]] = {}

    def _buffer(self, key: tuple, nbytes: int) -> torch.Tensor:
        buf = self._host.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.cuda)
            self._host[key] = buf
        return buf

    @staticmethod
    def _typed(buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return buf[: like.numel() * like.element_size()].view(like.dtype)

    def stage(self, j: int, views: list[torch.Tensor]) -> None:
        """Copy tensor j's inputs into pinned slot j % 2 and start their upload on the side stream."""
        slot = j % 2
        if self.cuda and slot in self._events:
            self._events[slot].synchronize()  # the slot's previous upload has finished reading it
        device_views = []
        for i, v in enumerate(views):
            host = self._typed(self._buffer((slot, i), v.numel() * v.element_size()), v)
            host.copy_(v)
            if self.cuda:
                with torch.cuda.stream(self.stream):
                    device_views.append(host.to(self.device, non_blocking=True))
            else:
                device_views.append(host.clone())
        if self.cuda:
            event = torch.cuda.Event()
            event.record(self.stream)
            self._events[slot] = event
        self._staged[j] = device_views

    def take(self, j: int) -> list[torch.Tensor]:
        """Tensor j's inputs on the device, ordered after their upload on the compute stream."""
        views = self._staged.pop(j)
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self._events[j % 2])
            for v in views:
                v.record_stream(current)  # allocated on the side stream, used on this one
        return views

    def store(self, result: torch.Tensor, out: torch.Tensor) -> None:
        """Copy a device result into the (memory-mapped) host output."""
        if not self.cuda:
            out.copy_(result)
            return
        host = self._typed(self._buffer(("out",), result.numel() * result.element_size()), result)
        host.copy_(result, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        out.copy_(host)
