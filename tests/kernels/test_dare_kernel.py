"""kernels/dare.py: Philox4x32-10 known answers, tl.rand4x parity, mask statistics, chunking."""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from _compare import assert_exact

from cpift.kernels._scratch import CHUNK
from cpift.kernels.dare import keep_factor, keep_mask, philox4x32, philox_uniform, tensor_seed

M32 = 0xFFFFFFFF

# Random123 kat_vectors (philox4x32, 10 rounds): counter, key, expected output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# Element i = lane i % 4 of tl.rand4x(seed, (i // 4).to(tl.uint32)), from triton 3.9.0 under
# TRITON_INTERPRET=1 (the kernel in test_matches_triton_interpreter), as float32 hex, for elements
# start, start + 1, ...: 4-aligned start; unaligned start; 63-bit seed across the 2^34 wrap
# (elements 2^34 .. 2^34 + 2 are counter 0 again).
TRITON_RAND4X = [
    (123, 0, ["0x1.1237ccp-3", "0x1.9bfcf6p-1", "0x1.013d88p-1", "0x1.86dbf0p-2",
              "0x1.70ffacp-1", "0x1.f50078p-1", "0x1.a6b2c6p-2", "0x1.0f8990p-2"]),
    (2**40 + 7, 5, ["0x1.e05658p-1", "0x1.eaf79ep-2", "0x1.d84f20p-1", "0x1.2ffe72p-1",
                    "0x1.d29728p-3", "0x1.dc397ap-1", "0x1.3a96a0p-2"]),
    ((1 << 63) - 1, 2**34 - 6, ["0x1.3c4054p-3", "0x1.6af436p-2", "0x1.3a5b06p-1", "0x1.ef84f4p-1",
                                "0x1.f64102p-8", "0x1.bac686p-2", "0x1.973a7cp-2", "0x1.b0504ap-1",
                                "0x1.c4e330p-5"]),
]


def _philox_py(ctr: tuple[int, ...], key: tuple[int, int]) -> tuple[int, ...]:
    """Plain-int Philox4x32-10, straight from the Random123 definition."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def _uniform_py(word: int) -> float:
    signed = word - (1 << 32) if word >= 1 << 31 else word
    folded = -signed - 1 if signed < 0 else signed
    f32 = lambda v: struct.unpack("<f", struct.pack("<f", v))[0]  # noqa: E731
    return f32(f32(float(folded)) * f32(4.6566127342e-10))


@pytest.mark.parametrize("ctr,key,expected", KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(ctr, key, expected) -> None:
    got = philox4x32(*(torch.tensor([c]) for c in ctr), *key)
    assert tuple(int(w) for w in got) == expected
    assert _philox_py(ctr, key) == expected


def test_philox_matches_plain_int_definition_on_random_words() -> None:
    words = torch.randint(0, 1 << 32, (4, 200), dtype=torch.int64)
    k0, k1 = 0x89ABCDEF, 0x01234567
    got = torch.stack(philox4x32(*words, k0, k1))
    for j in range(0, 200, 7):
        assert tuple(got[:, j].tolist()) == _philox_py(tuple(words[:, j].tolist()), (k0, k1))


@pytest.mark.parametrize(
    "seed,start,hexes", TRITON_RAND4X, ids=["seed123", "unaligned", "max-seed-wrapping"]
)
def test_uniform_known_answers_from_triton(seed, start, hexes) -> None:
    got = philox_uniform(seed, start, len(hexes))
    assert [float.fromhex(h) for h in hexes] == got.tolist()
    for k, h in enumerate(hexes):  # every start offset, alone
        assert philox_uniform(seed, start + k, 1).item() == float.fromhex(h), k


def test_uniform_matches_plain_int_definition() -> None:
    # u_i = uniform(word i % 4 of Philox4x32-10((i // 4 mod 2^32, 0, 0, 0), (seed lo, seed hi)))
    for seed in (0x1234567890ABCDEF, (1 << 64) - 1, 5):
        for block in (0, 3, 12345, (1 << 31) - 1, 1 << 31, M32):
            words = _philox_py((block, 0, 0, 0), (seed & M32, seed >> 32))
            want = [_uniform_py(w) for w in words]
            assert philox_uniform(seed, 4 * block, 4).tolist() == want, (seed, block)
            assert philox_uniform(seed, 4 * block + 1, 3).tolist() == want[1:], (seed, block)
            assert philox_uniform(seed, 4 * block + 3, 1).tolist() == want[3:], (seed, block)


def test_element_indices_wrap_at_2_pow_34() -> None:
    assert_exact(philox_uniform(99, 2**34 + 5, 300), philox_uniform(99, 5, 300))
    assert_exact(philox_uniform(99, 3 * 2**34 + 2, 300), philox_uniform(99, 2, 300))
    across = philox_uniform(99, 2**34 - 7, 20)  # crosses the wrap mid-call, unaligned
    assert_exact(across[7:], philox_uniform(99, 0, 13))
    assert_exact(across[:7], philox_uniform(99, 2**34 - 7, 7))
    # 2^32 is not a period any more: element 2^32 is counter 2^30.
    assert not torch.equal(philox_uniform(99, 2**32, 64), philox_uniform(99, 0, 64))


def test_lanes_of_one_counter_are_distinct_draws() -> None:
    # The 4 elements sharing a counter must not repeat one word (e.g. a lane-selection bug).
    u = philox_uniform(11, 0, 4 * 1000).view(1000, 4)
    for a in range(4):
        for b in range(a + 1, 4):
            assert (u[:, a] == u[:, b]).sum().item() == 0, (a, b)
    corr = torch.corrcoef(u.double().T)
    assert (corr - torch.eye(4, dtype=torch.float64)).abs().max().item() < 0.15


@pytest.mark.parametrize("base", [11, 0, 2**34 - CHUNK - 2], ids=["unaligned", "aligned", "wrap"])
def test_chunking_does_not_change_the_stream(base: int) -> None:
    n = 2 * CHUNK + 77
    whole_u = philox_uniform(7, base, n)
    whole_m = keep_mask(7, base, n, 0.3)
    whole_f = keep_factor(7, base, n, 0.3, out=torch.empty(n))
    assert_exact(whole_f, whole_m.float())
    cutss = (
        [0, 1000, n],
        [0, CHUNK - 1, CHUNK + 5, n],
        [0, 1, 2, n],
        [0, 3, CHUNK + 2, 2 * CHUNK + 1, n],
    )
    for cuts in cutss:
        parts_u = [philox_uniform(7, base + s, e - s) for s, e in zip(cuts, cuts[1:])]
        parts_m = [keep_mask(7, base + s, e - s, 0.3) for s, e in zip(cuts, cuts[1:])]
        assert_exact(torch.cat(parts_u), whole_u)
        assert_exact(torch.cat(parts_m), whole_m)


def test_out_argument_strided_and_reused() -> None:
    want = philox_uniform(21, 6, 1000)
    wide = torch.full((1000, 2), -1.0)
    philox_uniform(21, 6, 1000, out=wide[:, 0])  # non-contiguous out
    assert_exact(wide[:, 0], want)
    assert bool((wide[:, 1] == -1.0).all())
    out = torch.empty(1000)
    philox_uniform(21, 0, 1000, out=out)
    assert philox_uniform(21, 6, 1000, out=out) is out
    assert_exact(out, want)


@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 0.9])
def test_keep_fraction_matches_density(density: float) -> None:
    n = 200_000
    mask = keep_mask(tensor_seed(3, "w", 0), 0, n, density)
    sigma = (density * (1 - density) / n) ** 0.5
    assert abs(mask.double().mean().item() - density) < 5 * sigma
    assert_exact(keep_factor(tensor_seed(3, "w", 0), 0, n, density, out=torch.empty(n)), mask.float())


def test_keep_factor_is_exact_at_the_density() -> None:
    # Densities equal to drawn values (and their float32 neighbours) must split like `u < p`.
    u = philox_uniform(8, 0, 64)
    for p in u[:8].tolist() + [u[0].nextafter(torch.tensor(1.0)).item(), 0.0, 1.0]:
        assert_exact(keep_factor(8, 0, 64, p, out=torch.empty(64)), keep_mask(8, 0, 64, p).float())


def test_uniform_range_and_moments() -> None:
    u = philox_uniform(2024, 0, 100_000).double()
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005
    assert abs(u.var().item() - 1 / 12) < 0.003


def test_density_edges_and_empty() -> None:
    assert bool(keep_mask(5, 0, 10_000, 1.0).all())
    assert not bool(keep_mask(5, 0, 10_000, 0.0).any())
    assert keep_mask(5, 0, 0, 0.5).numel() == 0
    with pytest.raises(ValueError, match="density"):
        keep_mask(5, 0, 10, 1.5)


def test_tensor_seed_is_stable_and_separates_streams() -> None:
    # Pinned: changing the derivation would silently change every DARE merge.
    assert tensor_seed(0, "model.layers.0.mlp.up_proj.weight", 1) == 1127983478235422000
    assert tensor_seed(42, "lm_head.weight", 0) == 1910733620114139025
    seeds = {tensor_seed(s, name, i) for s in (0, 1) for name in ("a", "b", "a.b") for i in (0, 1, 2)}
    assert len(seeds) == 18
    assert all(0 <= s < 1 << 63 for s in seeds)
    a = keep_mask(tensor_seed(0, "a", 0), 0, 5000, 0.5)
    b = keep_mask(tensor_seed(0, "a", 1), 0, 5000, 0.5)
    assert 0.4 < (a == b).double().mean().item() < 0.6  # independent streams agree about half the time


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_matches_triton_interpreter() -> None:
    script = textwrap.dedent("""
        import torch, triton, triton.language as tl
        from cpift.kernels.dare import philox_uniform

        @triton.jit
        def rand4x_kernel(out, seed, start, n, BLOCK: tl.constexpr):
            offs = start + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
            u0, u1, u2, u3 = tl.rand4x(seed, (offs // 4).to(tl.uint32))
            lane = offs % 4
            u = tl.where(lane == 0, u0, tl.where(lane == 1, u1, tl.where(lane == 2, u2, u3)))
            idx = offs - start
            tl.store(out + idx, u, mask=idx < n)

        n = 3001
        cases = ((0, 0), (123, 1), (2**40 + 7, 2**33 + 2), ((1 << 63) - 1, 2**34 - 1501),
                 (2**64 - 1, 3))
        for seed, start in cases:
            out = torch.empty(n)
            rand4x_kernel[(triton.cdiv(n, 1024),)](out, seed, start, n, BLOCK=1024)
            assert torch.equal(out, philox_uniform(seed, start, n)), (seed, start)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
