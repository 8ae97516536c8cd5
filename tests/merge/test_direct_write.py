"""The O_DIRECT output path (merge/io/direct.py): the same bytes as the page-cache path, shard by shard,
for awkward tensor sizes around the 4 KiB block; the resume digests of the bytes it wrote; the fallbacks
(a file system without O_DIRECT, one that refuses the alignment); a write error as one line."""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_bad_input import run_cli  # noqa: F401  (a fixture's helper)

from cpift.errors import OutputError
from cpift.merge.io import direct
from cpift.merge.io.resume import MANIFEST
from cpift.merge.io.writer import OutTensor, ShardWriter

pytestmark = pytest.mark.skipif(not direct.wanted(), reason="no O_DIRECT on this platform")

# Sizes in bytes around the block: tiny, odd, zero, one block, a block ± 2, several blocks; two dtypes.
SPECS = [OutTensor("a", torch.bfloat16, (3,)), OutTensor("b", torch.float32, (1023,)),
         OutTensor("empty", torch.float32, (0, 5)), OutTensor("c", torch.bfloat16, (2049,)),
         OutTensor("d", torch.float32, (1024,)), OutTensor("e", torch.bfloat16, (3, 4097)),
         OutTensor("f", torch.float32, (1,)), OutTensor("g", torch.bfloat16, (5000,)),
         OutTensor("h", torch.float32, (7, 3001))]


def values(spec: OutTensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(spec.shape, generator=g) * 3 + 1).to(spec.dtype)


def write(out: Path, shard_bytes: int, monkeypatch, *, on: bool, metadata=None, fingerprint=None) -> ShardWriter:
    monkeypatch.setenv(direct.ENV, "1" if on else "0")
    w = ShardWriter(out, SPECS, max_shard_size=shard_bytes, metadata=metadata, fingerprint=fingerprint)
    assert (w.direct is not None) == on
    for k, spec in enumerate(SPECS):
        t = w.tensor(spec.name)
        t.copy_(values(spec, k).reshape(-1))
        del t
        w.written(spec.name)
    return w


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.endswith((".safetensors", ".json"))}


@pytest.mark.parametrize("shard_bytes", [10**9, 20_000, 9_000, 1])
def test_same_bytes_as_the_page_cache_path(tmp_path, monkeypatch, shard_bytes):
    meta = {"note": "x" * 5000}  # a header longer than one block
    for on in (True, False):
        write(tmp_path / f"out{on}", shard_bytes, monkeypatch, on=on, metadata=meta).finish({})
    got, want = files(tmp_path / "outTrue"), files(tmp_path / "outFalse")
    assert got == want and len(want) >= 1
    tensors = {}
    for name in want:
        if name.endswith(".safetensors"):
            tensors.update(load_file(tmp_path / "outTrue" / name))
    for k, spec in enumerate(SPECS):
        assert torch.equal(tensors[spec.name], values(spec, k)), spec.name


@pytest.mark.parametrize("on", [True, False])
def test_digests_are_the_files_sha256(tmp_path, monkeypatch, on):
    """With a manifest, each finished shard but the last is hashed (as it is written, or read back from
    the page cache): the digest the manifest records is the sha256 of the file on disk."""
    w = write(tmp_path / "out", 20_000, monkeypatch, on=on, fingerprint={"t": 1})
    if on:
        w.direct.close()
    w.journal.close()
    recorded = json.loads((w.tmp / MANIFEST).read_text())["shards"]
    assert len(recorded) == len(w.shards) - 1 >= 2
    for name, dig in recorded.items():
        assert dig == hashlib.sha256((w.tmp / name).read_bytes()).hexdigest(), name
    w.abort()


def test_a_file_system_without_o_direct_keeps_the_maps(tmp_path, monkeypatch):
    monkeypatch.setattr(direct, "supported", lambda file: False)
    monkeypatch.setenv(direct.ENV, "1")
    w = ShardWriter(tmp_path / "out", SPECS, max_shard_size=20_000)
    assert w.direct is None
    w.abort()


@pytest.fixture
def direct_fds(monkeypatch) -> set[int]:
    """The descriptors opened with O_DIRECT from here on."""
    fds: set[int] = set()
    real_open = direct.os.open

    def open_(path, flags, *a, **kw):
        fd = real_open(path, flags, *a, **kw)
        if flags & direct.os.O_DIRECT:
            fds.add(fd)
        return fd

    real_close = direct.os.close

    def close(fd):
        fds.discard(fd)
        real_close(fd)

    monkeypatch.setattr(direct.os, "open", open_)
    monkeypatch.setattr(direct.os, "close", close)
    return fds


def refuse(monkeypatch, fds: set[int], err: int, refused: list) -> None:
    """os.pwrite fails with errno ``err`` on the descriptors in ``fds``."""
    real = direct.os.pwrite

    def pwrite(fd, data, offset):
        if fd in fds:
            refused.append(offset)
            raise OSError(err, direct.os.strerror(err))
        return real(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", pwrite)


def test_alignment_refused_falls_back_to_plain_writes(tmp_path, monkeypatch, direct_fds):
    """EINVAL on an O_DIRECT write (a file system wanting another alignment): the rest goes through
    plain writes, with the same bytes."""
    refused: list = []
    refuse(monkeypatch, direct_fds, errno.EINVAL, refused)
    w = write(tmp_path / "a", 20_000, monkeypatch, on=True)
    w.finish({})
    assert refused and not w.direct._direct
    write(tmp_path / "b", 20_000, monkeypatch, on=False).finish({})
    assert files(tmp_path / "a") == files(tmp_path / "b")


def test_a_write_error_is_one_line_and_leaves_no_output(tmp_path, monkeypatch, direct_fds):
    refuse(monkeypatch, direct_fds, errno.ENOSPC, [])
    out = tmp_path / "out"
    monkeypatch.setenv(direct.ENV, "1")
    w = ShardWriter(out, SPECS, max_shard_size=20_000)
    with pytest.raises(OutputError) as e:
        for k, spec in enumerate(SPECS):
            w.tensor(spec.name).copy_(values(spec, k).reshape(-1))
            w.written(spec.name)
        w.finish({})
    w.abort()
    assert str(e.value).startswith(f"{out}: cannot write the output: No space left on device"), str(e.value)
    assert "\n" not in str(e.value)
    assert not out.exists() and not (tmp_path / ".out.cpift-partial").exists()


def test_out_of_order_tensors_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(direct.ENV, "1")
    w = ShardWriter(tmp_path / "out", SPECS, max_shard_size=10**9)
    with pytest.raises(RuntimeError, match="plan's order"):
        w.tensor("b")
    w.abort()


def test_a_real_merge_gives_the_same_bytes_either_way(capsys, llama, tmp_path, monkeypatch):
    digests = []
    for on in ("1", "0"):
        monkeypatch.setenv(direct.ENV, on)
        out = tmp_path / f"out{on}"
        code, _, err = run_cli(capsys, "ties", "--base", llama["base"], llama["task1"], llama["task2"],
                               "--density", "0.4", "-o", out, "--max-shard-size", "30000", "-q")
        assert code == 0, err
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
                        if p.suffix in (".safetensors", ".json")})
    assert digests[0] == digests[1] and len(digests[0]) > 3


def test_two_large_tensors_are_not_staged_at_once(monkeypatch):
    """Past STAGING bytes, the math waits for the write of the other buffer and reuses it (one copy of
    the largest tensors, not two)."""
    import threading
    import time

    monkeypatch.setattr(direct, "STAGING", 6 << 20)  # room for 4 MiB and 2 MiB, not 4 and 4
    pool = direct._Buffers()
    first = pool.take(3 << 20)
    small = pool.take(100)  # under STAGING beside the first: a second buffer
    pool.give(small)
    threading.Timer(0.2, pool.give, args=(first,)).start()
    t0 = time.perf_counter()
    again = pool.take(3 << 20)
    assert again is first and time.perf_counter() - t0 >= 0.15
    pool.give(again)
    pool.close()
