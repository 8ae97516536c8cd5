"""The O_DIRECT input path (merge/io/direct_read.py): tensors read into pool buffers equal the mapped
ones bit for bit, at offsets off the 4 KiB block and up to a file that ends inside one; cached tensors
stay on the maps, evicted ones are read; the fallbacks (no O_DIRECT, another alignment) and a read error
named in one line."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cpift.errors import CheckpointError
from cpift.merge.io import direct, direct_read
from cpift.merge.io.checkpoint import Checkpoint

pytestmark = pytest.mark.skipif(not direct.wanted(), reason="no O_DIRECT on this platform")


def model(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A file of awkward tensors: odd byte counts, so most start and end off the block; the last ends
    the file inside a block."""
    g = torch.Generator().manual_seed(7)
    tensors = {"a": torch.randn(3, generator=g).bfloat16(), "b": torch.randn(1023, generator=g),
               "c": torch.randn(3, 4097, generator=g).bfloat16(), "d": torch.randn(2049, generator=g).half(),
               "e": torch.randn(300_001, generator=g), "f": torch.randn(5, generator=g).bfloat16()}
    d = tmp_path / "m"
    d.mkdir()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d, tensors


def evict(file: Path) -> bool:
    """Drop the file's pages from the page cache; False where this file system keeps them."""
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    with Checkpoint(file.parent) as ck:
        info = ck.info("e")
        return not direct_read.resident(ck._map(info.file)[1], info.start, info.end)


def read_all(ck: Checkpoint) -> dict[str, torch.Tensor]:
    out = {}
    for name in ck.names():
        ck.populate(name)
        out[name] = ck.get(name).clone()
        ck.release(name)
    return out


def test_always_reads_every_tensor_into_buffers_with_the_same_bits(tmp_path, monkeypatch):
    d, tensors = model(tmp_path)
    monkeypatch.setenv(direct.ENV, "always")
    with Checkpoint(d) as ck:
        for name in ck.names():
            ck.populate(name)
            assert name in ck._buffered, name
            got = ck.get(name)
            assert got.dtype == tensors[name].dtype and torch.equal(got, tensors[name]), name
            del got
            ck.release(name)
            assert name not in ck._buffered
    monkeypatch.setenv(direct.ENV, "0")
    with Checkpoint(d) as ck:
        assert all(torch.equal(v, tensors[k]) for k, v in read_all(ck).items())


def test_cached_tensors_stay_on_the_maps_and_evicted_ones_are_read(tmp_path, monkeypatch):
    d, tensors = model(tmp_path)
    monkeypatch.setenv(direct.ENV, "1")
    monkeypatch.setattr(direct_read, "SMALL", 1)
    with Checkpoint(d) as ck:
        ck.populate("e")
        assert "e" not in ck._buffered  # just written: in the page cache
        ck.release("e")
    if not evict(d / "model.safetensors"):
        pytest.skip("this file system keeps the pages after POSIX_FADV_DONTNEED")
    with Checkpoint(d) as ck:
        ck.populate("e")
        assert "e" in ck._buffered
        assert torch.equal(ck.get("e"), tensors["e"])
        ck.release("e")


def test_a_file_system_without_o_direct_reads_through_the_maps(tmp_path, monkeypatch):
    d, tensors = model(tmp_path)
    real = os.open

    def refuse(path, flags, *a, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setenv(direct.ENV, "always")
    with Checkpoint(d) as ck:
        got = read_all(ck)
        assert not ck._buffered and all(fd == -1 for fd in ck._direct_fds.values())
    assert all(torch.equal(v, tensors[k]) for k, v in got.items())


def preadv_fails(monkeypatch, err: int) -> None:
    """Every O_DIRECT read fails with errno ``err``; every tensor is read with O_DIRECT."""
    def fail(fd, bufs, offset):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(direct_read.os, "preadv", fail)
    monkeypatch.setenv(direct.ENV, "always")


def test_an_alignment_refused_falls_back_to_the_maps(tmp_path, monkeypatch):
    d, tensors = model(tmp_path)
    preadv_fails(monkeypatch, errno.EINVAL)
    with Checkpoint(d) as ck:
        got = read_all(ck)
        assert list(ck._direct_fds.values()) == [-1]
    assert all(torch.equal(v, tensors[k]) for k, v in got.items())


def test_a_read_error_names_the_file_and_tensor(tmp_path, monkeypatch):
    d, _ = model(tmp_path)
    preadv_fails(monkeypatch, errno.EIO)
    with Checkpoint(d) as ck, pytest.raises(CheckpointError) as e:
        ck.populate("c")
    assert str(e.value) == f"{d / 'model.safetensors'}: cannot read tensor 'c': Input/output error"


def test_several_passes_read_through_the_page_cache(tmp_path, monkeypatch):
    """A step that reads the inputs again (cores, a global trim) reads through the maps inside
    several_passes, so its next pass finds them cached; outside, O_DIRECT again."""
    d, tensors = model(tmp_path)
    monkeypatch.setenv(direct.ENV, "always")
    with Checkpoint(d) as ck:
        with direct_read.several_passes():
            assert direct_read.mode() == "off"
            ck.populate("e")
            assert "e" not in ck._buffered and torch.equal(ck.get("e"), tensors["e"])
            ck.release("e")
        ck.populate("e")
        assert "e" in ck._buffered
        ck.release("e")


def test_a_wrong_setting_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, llama):
    from test_bad_input import run_cli

    monkeypatch.setenv(direct.ENV, "sometimes")
    code, out, err = run_cli(capsys, "slerp", llama["task1"], llama["task2"], "-o", tmp_path / "out", "-q")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{direct.ENV}='sometimes': expected 1" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("value", "want"), [("0", "off"), ("off", "off"), ("1", "auto"), ("", "auto"),
                                             ("always", "always"), (" Always ", "always")])
def test_mode_from_the_environment(monkeypatch, value, want):
    monkeypatch.setenv(direct.ENV, value)
    assert direct_read.mode() == want


def test_a_real_merge_reads_the_same_bytes_either_way(tmp_path, monkeypatch, capsys, llama):
    from test_bad_input import digest, run_cli

    outs = []
    for value in ("always", "0"):
        monkeypatch.setenv(direct.ENV, value)
        out = tmp_path / f"out-{value}"
        code, _, err = run_cli(capsys, "dare-ties", "--base", llama["base"], llama["task1"], llama["task2"],
                               "--density", "0.5", "--seed", "5", "-o", out, "-q")
        assert code == 0, err
        outs.append({Path(k).name: v for k, v in digest(out).items() if k.endswith(".safetensors")})
    assert outs[0] == outs[1] and outs[0]
