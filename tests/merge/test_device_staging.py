"""merge/io/device.py's staging loop on the CPU ("cpu+staging": no pinning or streams, the same pieces,
rings, scratch, cache and worker thread): byte-identical round trips of tensors larger than a piece,
pinned host memory bounded by four pieces whatever the tensor sizes, the number of pieces, compute
dtypes applied piece by piece (never a whole-tensor copy in the storage dtype), and device copies kept
across passes within a budget (fewer reads and uploads, the same outputs)."""

from __future__ import annotations

import math

import pytest
import torch

from cpift.merge.cpi.cores import compute_cores
from cpift.merge.io import device as device_mod
from cpift.merge.io.device import DeviceCache, DeviceStager
from cpift.merge.io.models import open_models
from cpift.merge.io.stream import TensorStream
from cpift.merge.methods.global_trim import global_magnitude_cuts

PIECE = 256  # bytes: every tensor below spans several pieces


def _pieces(tensors: list[torch.Tensor]) -> int:
    return sum(math.ceil(t.numel() * t.element_size() / PIECE) for t in tensors)


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
        assert stager.pieces == {"in": _pieces(tensors), "out": _pieces(tensors)}
    finally:
        stager.close()


@pytest.mark.parametrize(("src", "dst"), [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                          (torch.float32, torch.bfloat16), (torch.float32, torch.float64)])
def test_compute_dtype_is_applied_piece_by_piece(src, dst):
    """Floating views arrive in the compute dtype, bit-identical to a whole-tensor .to(); integer views keep
    theirs; the conversion scratch never exceeds one piece; the pieces are counted in storage bytes."""
    stager = DeviceStager(torch.device("cpu"), piece_bytes=PIECE)
    try:
        views = [(torch.randn(n, dtype=torch.float64) * 10).to(src) for n in (1, 127, 128, 129, 3001)]
        views.append(torch.randint(0, 255, (777,), dtype=torch.uint8))
        stager.stage(0, views, dst)
        for got, v in zip(stager.take(0), views):
            want = v.to(dst) if v.is_floating_point() else v
            assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        assert 0 < stager._scratch.numel() <= PIECE
        assert stager.pieces["in"] == _pieces(views) and stager.pinned_bytes <= 2 * PIECE
    finally:
        stager.close()


def test_cache_admits_within_its_budget(monkeypatch):
    cache = DeviceCache(100)
    a, b, c = torch.zeros(10), torch.zeros(10), torch.zeros(3, dtype=torch.uint8)
    assert cache.get("a") is None
    assert cache.offer("a", [a, b]) and cache.used_bytes == 80
    assert not cache.offer("big", [a, b])  # 80 more would pass 100: not kept, nothing evicted
    assert cache.offer("c", [c]) and cache.used_bytes == 83
    assert not cache.offer("a", [a])  # already held
    assert cache.get("a")[0] is a and "c" in cache and "big" not in cache
    assert (cache.hits, cache.misses) == (1, 1)
    cache.clear()
    assert cache.used_bytes == 0 and "a" not in cache
    assert DeviceCache.for_device(None) is None
    assert DeviceCache.for_device(torch.device("cpu")).budget_bytes == device_mod.CPU_CACHE_BYTES
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 << 30, 80 << 30))  # free, total
    assert DeviceCache.for_device(torch.device("cuda")).budget_bytes == 3 << 30  # half the free memory


class _Source:
    """A source that records which tensors were read (get) and prefetched (populate)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors, self.got, self.populated = tensors, [], []

    def get(self, name):
        self.got.append(name)
        return self.tensors[name]

    def populate(self, name):
        self.populated.append(name)

    def release(self, name):
        pass


def test_stream_cache_skips_reads_and_uploads_on_later_passes():
    names = [f"t{i}" for i in range(6)]
    sources = [_Source({n: torch.randn(50 + i) for i, n in enumerate(names)}) for _ in range(2)]
    sizes = {n: 2 * (50 + i) * 4 for i, n in enumerate(names)}  # both sources' bytes
    cache = DeviceCache(sizes["t0"] + sizes["t1"] + sizes["t2"])  # the first three fit
    for p in range(3):
        for s in sources:
            s.got.clear(), s.populated.clear()
        with TensorStream(sources, names, device=torch.device("cpu"), cache=cache) as stream:
            for item in stream:
                for x, s in zip(item.inputs, sources):
                    assert torch.equal(x, s.tensors[item.name])
                assert item.nbytes == sizes[item.name]
                stream.stage_next(item)
            pieces = stream.stager.pieces["in"]
        read = names if p == 0 else names[3:]
        assert all(set(s.got) == set(read) and s.populated == read for s in sources), p
        assert pieces == 2 * len(read)  # one piece per tensor and source (each under 64 MiB)
    assert cache.used_bytes == sum(sizes[n] for n in names[:3]) and cache.hits == 2 * 3


@pytest.mark.parametrize("budget", ["all", "two tensors"])
def test_cores_and_global_trim_keep_device_copies_with_the_same_results(llama, tmp_path, monkeypatch, budget):
    """cores' three passes and global trim's passes on "cpu+staging": later passes take the tensors the
    cache holds (hits counted) and the masks and cuts are those of the unstaged run, byte for byte."""
    caches = []
    real = DeviceCache.for_device.__func__

    def spied(cls, device, **kw):
        cache = real(cls, device, **kw)
        if cache is not None and budget != "all":
            cache.budget_bytes = 2 * 3 * 4096  # a couple of small tensors of the three models
        caches.append(cache)
        return cache

    monkeypatch.setattr(DeviceCache, "for_device", classmethod(spied))
    tasks = [("a", llama["task1"]), ("b", llama["task2"])]
    plain = compute_cores(llama["base"], tasks, tmp_path / "plain", p=3.0, progress=False)
    staged = compute_cores(llama["base"], tasks, tmp_path / "staged", p=3.0, progress=False, device="cpu+staging")
    assert caches[0] is None and caches[1].hits > 0
    names = len(plain.tasks[0].counts)
    if budget == "all":
        assert caches[1].hits == 2 * names and caches[1].misses == names
    else:
        assert caches[1].hits < 2 * names
    assert [(t.k, t.threshold, t.counts) for t in staged.tasks] == [(t.k, t.threshold, t.counts) for t in plain.tasks]
    for f in sorted((tmp_path / "plain").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "staged" / f.name).read_bytes(), f.name
    models = open_models([llama["base"], llama["task1"], llama["task2"]])
    want = global_magnitude_cuts(models[0], models[1:], [0.3, 0.05])
    have = global_magnitude_cuts(models[0], models[1:], [0.3, 0.05], device=torch.device("cpu"))
    assert have == want and caches[-1].hits > 0 and caches[-1].used_bytes == 0  # cleared when done


def test_float32_compute_on_the_staged_path_is_byte_identical(llama, tmp_path):
    """--dtype float32 over bf16 models: cast on the device piece by piece, the same output bytes; the
    staging memory is reported (bounded by four pieces) in the result and its summary."""
    from cpift.merge import methods

    results = {}
    for name, kw in (("plain", {}), ("staged", {"device": "cpu+staging"})):
        results[name] = methods.ties(llama["base"], [llama["task1"], llama["task2"]], tmp_path / name, density=0.4,
                                     dtype="float32", progress=False, **kw)
    assert results["plain"].pinned_bytes == 0 and "pinned" not in results["plain"].summary()
    assert 0 < results["staged"].pinned_bytes <= 4 * device_mod.PIECE_BYTES
    assert "MiB pinned" in results["staged"].summary()
    for f in sorted((tmp_path / "plain").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "staged" / f.name).read_bytes(), f.name


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
