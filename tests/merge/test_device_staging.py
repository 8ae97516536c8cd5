"""merge/io/device.py's staging loop on the CPU ("cpu+staging": no pinning or streams, the same pieces,
rings and worker thread): byte-identical round trips of tensors larger than a piece, and pinned host
memory bounded by four pieces whatever the tensor sizes."""

from __future__ import annotations

import pytest
import torch

from cpift.merge.io.device import DeviceStager

PIECE = 256  # bytes: every tensor below spans several pieces


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.uint8])
def test_pieces_round_trip_and_bounded_host_memory(dtype):
    stager = DeviceStager(torch.device("cpu"), piece_bytes=PIECE)
    try:
        tensors = [(torch.randn(n) * 100).to(dtype) for n in (1, 63, 64, 65, 1000, 4099)]
        for j in range(0, len(tensors), 2):
            stager.stage(j, tensors[j:j + 2])
        for j in range(0, len(tensors), 2):
            staged = stager.take(j)
            for got, want in zip(staged, tensors[j:j + 2]):
                assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
                assert got.data_ptr() != want.data_ptr()  # a copy, not the input
                out = torch.empty_like(want)
                stager.store(got, out)
                assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))
        assert 0 < stager.pinned_bytes <= 4 * PIECE
    finally:
        stager.close()


def test_a_failed_read_surfaces_at_take():
    stager = DeviceStager(torch.device("cpu"), piece_bytes=PIECE)
    try:
        stager.stage(0, [torch.ones(10)])
        stager._jobs[1] = stager._worker.submit(lambda: (_ for _ in ()).throw(OSError("read failed")))
        assert torch.equal(stager.take(0)[0], torch.ones(10))
        with pytest.raises(OSError, match="read failed"):
            stager.take(1)
    finally:
        stager.close()
