"""kernels/_scratch.py: buffers are reused per slot and per thread; chunks cover the range."""

from __future__ import annotations

import threading

import torch

from cpift.kernels._scratch import CHUNK, chunks, compute_dtype, scratch


def test_buffers_are_reused_per_slot_and_dtype() -> None:
    a = scratch("test.a", 100)
    assert a.numel() == 100 and a.dtype == torch.float32
    assert scratch("test.a", CHUNK).data_ptr() == a.data_ptr()  # grown to a chunk at once
    assert scratch("test.b", 100).data_ptr() != a.data_ptr()
    assert scratch("test.a", 100, torch.float64).dtype == torch.float64
    big = scratch("test.a", CHUNK + 1)
    assert big.numel() == CHUNK + 1


def test_threads_get_their_own_buffers() -> None:
    mine = scratch("test.thread", 10).data_ptr()
    seen = []
    t = threading.Thread(target=lambda: seen.append(scratch("test.thread", 10).data_ptr()))
    t.start()
    t.join()
    assert seen and seen[0] != mine


def test_chunks_cover_the_range_in_order() -> None:
    assert list(chunks(0)) == []
    assert list(chunks(1)) == [(0, 1)]
    spans = list(chunks(2 * CHUNK + 5))
    assert spans == [(0, CHUNK), (CHUNK, 2 * CHUNK), (2 * CHUNK, 2 * CHUNK + 5)]
    assert list(chunks(10, size=4)) == [(0, 4), (4, 8), (8, 10)]


def test_compute_dtype() -> None:
    assert compute_dtype(torch.ones(1, dtype=torch.bfloat16), None) == torch.float32
    assert compute_dtype(torch.ones(1), torch.ones(1, dtype=torch.float64)) == torch.float64
