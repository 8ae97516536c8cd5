"""kernels/topk.py: exact global top-k over a stream of tensors equals a stable sort of all scores."""

from __future__ import annotations

import pytest
import torch
from _compare import assert_exact

from cpift.kernels.backend import HAS_TRITON
from cpift.kernels.masks import unpack_bits
from cpift.kernels.scores import score_deltas
from cpift.kernels.topk import GlobalTopK

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
LENGTHS = [0, 1, 777, 4096, 3001, 9]


def _stream(dtype, quantized: bool, tasks: int):
    """(base, [task tensors]) per tensor; quantized values make many exact ties."""
    out = []
    for n in LENGTHS:
        base = torch.randn(n).to(dtype)
        if quantized:
            xs = [(base.double() + torch.randint(-3, 4, (n,)) / 8).to(dtype) for _ in range(tasks)]
        else:
            xs = [(base.double() + 0.1 * torch.randn(n)).to(dtype) for _ in range(tasks)]
        out.append((base, xs))
    return out


def _oracle(stream, i, block, backend, k):
    """Masks per tensor: stable descending sort of the concatenated float32 scores, first k."""
    scores = [score_deltas(xs[i], base, block=block, backend=backend).double() for base, xs in stream]
    flat = torch.cat(scores)
    order = torch.sort(flat, descending=True, stable=True).indices
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order[:k]] = True
    return list(chosen.split([s.numel() for s in scores]))


def _run(stream, ks_fn, block, backend):
    top = GlobalTopK(tasks=len(stream[0][1]), backend=backend)
    for base, xs in stream:
        top.count(base, xs, block)
    ks = ks_fn(top.totals)
    top.fix(ks)
    for base, xs in stream:
        top.refine(base, xs, block)
    top.finish_refine()
    return top, ks, [top.pack(base, xs, block) for base, xs in stream]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("quantized", [False, True], ids=["distinct", "many-ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_global_top_k_equals_sorted_selection(dtype, quantized, block, backend):
    stream = _stream(dtype, quantized, tasks=3)
    # k: ~1%, ~37%, everything but one
    top, ks, packed = _run(stream, lambda d: [d[0] // 100, d[1] * 37 // 100, d[2] - 1], block, backend)
    for i, k in enumerate(ks):
        want = _oracle(stream, i, block, backend, k)
        got = [unpack_bits(p[i][0], w.numel()) for p, w in zip(packed, want)]
        for g, w in zip(got, want):
            assert_exact(g, w)
        assert sum(p[i][1] for p in packed) == k
        assert [p[i][1] for p in packed] == [int(w.sum()) for w in want]
        t = top.thresholds[i]
        assert t.above < k <= t.above + t.equal


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_zero_one_and_all(backend):
    stream = _stream(torch.float32, True, tasks=3)
    _, ks, packed = _run(stream, lambda d: [0, 1, d[2]], 1, backend)
    for i, k in enumerate(ks):
        assert sum(p[i][1] for p in packed) == k
        want = _oracle(stream, i, 1, backend, k)
        for p, w in zip(packed, want):
            assert_exact(unpack_bits(p[i][0], w.numel()), w)


def test_all_equal_scores_take_lowest_positions():
    """Every score equal: the first k positions in stream order win, across tensor boundaries."""
    stream = [(torch.zeros(n), [torch.full((n,), 0.5)]) for n in (5, 3, 6)]
    _, _, packed = _run(stream, lambda d: [7], 1, "torch")
    bits = torch.cat([unpack_bits(p[0][0], n) for p, n in zip(packed, (5, 3, 6))])
    assert bits.tolist() == [True] * 7 + [False] * 7


def test_wrong_task_count():
    top = GlobalTopK(tasks=2)
    with pytest.raises(ValueError, match="expected 2 task tensors"):
        top.count(None, [torch.ones(3)])
    with pytest.raises(ValueError, match="k must be"):
        top.count(None, [torch.ones(3), torch.ones(3)])
        top.fix([4, 1])
