"""The core-mask file format (docs/cpi-ft.md#mask-files): round trip, block expansion, validation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from cpift.errors import CheckpointError, MismatchError, ParameterError
from cpift.kernels.masks import pack_bits
from cpift.merge.cpi.masks import block_size, load_core_mask, mask_entries, parse_granularity, save_core_mask


@pytest.mark.parametrize("g,shape,b,n", [("element", (3, 5), 1, 15), ("row", (3, 5), 5, 3), ("row", (7,), 7, 1),
                                         ("block:4", (3, 5), 4, 4), ("block:1", (1,), 1, 1), ("row", (0, 5), 5, 0)])
def test_granularity_sizes(g, shape, b, n):
    assert block_size(g, shape) == b and mask_entries(g, shape) == n


@pytest.mark.parametrize("bad", ["", "block:0", "block:x", "rows", "block:-3"])
def test_bad_granularity(bad):
    with pytest.raises(ParameterError, match="granularity"):
        parse_granularity(bad)


@pytest.mark.parametrize("g", ["element", "row", "block:3"])
def test_round_trip_and_expansion(tmp_path, g):
    shapes = {"a.weight": (5, 7), "b.bias": (9,), "c": (1,)}
    bits = {n: torch.rand(mask_entries(g, s)) < 0.4 for n, s in shapes.items()}
    packed = {n: pack_bits(b) for n, b in bits.items()}
    counts = {n: int(b.sum()) for n, b in bits.items()}
    path = save_core_mask(tmp_path / "t.safetensors", packed, shapes, granularity=g, p=1.5, k=sum(counts.values()),
                          threshold=0.125, counts=counts, base={"path": "b"}, task={"path": "t"})
    m = load_core_mask(path)
    assert (m.granularity, m.p, m.k, m.threshold, m.counts, m.base, m.task) == \
        (g, 1.5, sum(counts.values()), 0.125, counts, {"path": "b"}, {"path": "t"})
    for n, s in shapes.items():
        assert torch.equal(m.bits(n), bits[n])
        numel = torch.Size(s).numel()
        bsz = block_size(g, s)
        want = torch.tensor([bool(bits[n][i // bsz]) for i in range(numel)]).reshape(s)
        assert torch.equal(m.element_mask(n), want)
    lazy = load_core_mask(path, lazy=True)
    assert lazy.names == m.names and all(torch.equal(lazy.bits(n), bits[n]) for n in shapes)
    assert not list(tmp_path.glob(".*"))  # no temp file left
    m.check_matches(dict(shapes), "model")
    with pytest.raises(MismatchError, match="'a.weight'.*another model"):
        m.check_matches({**shapes, "a.weight": (7, 5)}, "model")
    with pytest.raises(MismatchError, match="'b.bias' is not in"):
        m.check_matches({"a.weight": (5, 7), "c": (1,)}, "model")


def test_rejects_foreign_and_broken_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_core_mask(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(plain))
    with pytest.raises(CheckpointError, match="not a cpift core mask"):
        load_core_mask(plain)
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(5, dtype=torch.uint8)}, str(bad),
              metadata={"format": "cpift-core-mask/1", "granularity": "element", "p": "1", "k": "0",
                        "threshold": "0", "base": "{}", "task": "{}", "shapes": '{"x": [8]}', "counts": "{}"})
    for lazy in (False, True):
        with pytest.raises(CheckpointError, match="'x' should be uint8\\[1\\]"):
            load_core_mask(bad, lazy=lazy)
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00junk!")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_core_mask(tmp_path / "junk.safetensors")
