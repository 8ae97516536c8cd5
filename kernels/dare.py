# DARE's random drop mask from a counter-based RNG, bit-identical to Triton's tl.rand.
#
# Maths: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11;
# Random123), as triton-lang/triton python/triton/language/random.py implements it:
#   round (10 of them), all words uint32:
#     (hi0, lo0) = mulhilo(0xD2511F53, c0)      # PHILOX_ROUND_A
#     (hi1, lo1) = mulhilo(0xCD9E8D57, c2)      # PHILOX_ROUND_B
#     (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
#     (k0, k1) += (0x9E3779B9, 0xBB67AE85)      # PHILOX_KEY_A/B (golden ratio, sqrt(3) − 1)
#   tl.rand(seed, offset) with 32-bit offsets: key k0 = seed & 0xFFFFFFFF, k1 = seed >> 32 (seed
#   as uint64); counter (offset, 0, 0, 0); keeps output word c0 and maps it like Triton's
#   uint_to_uniform_float: bitcast to int32, x < 0 → −x − 1, then float32(x) · 4.6566127342e-10
#   (float32 multiply), a value in [0, 1).
#   keep = u < density (density rounded to float32, as a Triton fp32 argument would be).
# Offsets are the flat element index, taken mod 2^32 (an index ≥ 2^32 wraps). A Triton port must
# pass uint32/int32 offsets: with int64 offsets tl.rand switches to the 64-bit Philox variant and
# draws other numbers.
#
# Checked: philox4x32 against the Random123 known-answer vectors (tests), philox_uniform bit for
# bit against triton 3.9.0's tl.rand under TRITON_INTERPRET=1 (pinned values in the tests, and a
# test that reruns the comparison wherever triton is installed).
#
# torch's unsigned dtypes lack most ops (its uint64 multiply exists but measured no faster), so
# every word is an int64 holding a value in [0, 2^32), and the 32×32→64 product is split so
# nothing overflows int64: with A = Ah·2^16 + Al,
#   p1 = c·Al, p2 = c·Ah (each < 2^48);  t = p1 + (p2 mod 2^16)·2^16 (< 2^49)
#   lo = t mod 2^32;  hi = p2 >> 16 + t >> 32.
# Cost: reads nothing, writes 4 bytes (uniforms) or 1 byte (mask) per element, but ~220 int64
# ops per element (~15 M elements/s on 2 cores): the CPU fallback, the Triton kernel is the fast
# path. Work is done in place in reused scratch buffers, chunk by chunk.
#
# Streams: tensor_seed(seed, name, index) hashes (seed, tensor name, model index) with blake2b to
# a 63-bit seed, so every tensor of every model draws an independent stream and the mask of an
# element depends only on (seed, name, index, flat offset): never on chunking or threads.
from __future__ import annotations

import hashlib

import torch

from ._scratch import chunks, scratch

ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # largest s with (2^31 − 1)·s < 1 in float32
_M32 = 0xFFFFFFFF


def _mulhilo(a: int, c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, t: torch.Tensor) -> None:
    """lo, hi ← low and high 32-bit words of the constant a times the uint32 words c (int64 math)."""
    torch.mul(c, a & 0xFFFF, out=lo)  # p1
    torch.mul(c, a >> 16, out=hi)  # p2
    torch.bitwise_and(hi, 0xFFFF, out=t)
    t.bitwise_left_shift_(16).add_(lo)
    hi.bitwise_right_shift_(16)
    torch.bitwise_right_shift(t, 32, out=lo)
    hi.add_(lo)
    torch.bitwise_and(t, _M32, out=lo)


def _philox_rounds(
    state: list[torch.Tensor], spare: list[torch.Tensor], t: torch.Tensor, k0: int, k1: int
) -> list[torch.Tensor]:
    """Run the 10 rounds on int64 words; state and spare buffers swap roles, nothing is allocated."""
    for _ in range(ROUNDS):
        c0, c1, c2, c3 = state
        lo0, hi0, lo1, hi1 = spare
        _mulhilo(ROUND_A, c0, lo0, hi0, t)
        _mulhilo(ROUND_B, c2, lo1, hi1, t)
        hi1.bitwise_xor_(c1).bitwise_xor_(k0)
        hi0.bitwise_xor_(c3).bitwise_xor_(k1)
        state, spare = [hi1, lo1, hi0, lo0], [c0, c1, c2, c3]
        k0 = (k0 + KEY_A) & _M32
        k1 = (k1 + KEY_B) & _M32
    return state


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 of counter words (int tensors holding uint32 values) under key (k0, k1).

    Returns four int64 tensors holding the uint32 output words.
    """
    words = torch.broadcast_tensors(c0, c1, c2, c3)
    state = [(w.to(torch.int64) & _M32).contiguous() for w in words]
    spare = [torch.empty_like(state[0]) for _ in range(4)]
    out = _philox_rounds(state, spare, torch.empty_like(state[0]), k0 & _M32, k1 & _M32)
    return out[0], out[1], out[2], out[3]


def _uniform_chunk(seed: int, start: int, out: torch.Tensor) -> None:
    n = out.numel()
    buf = [scratch(f"dare.w{i}", n, torch.int64) for i in range(9)]
    state, spare, t = buf[:4], buf[4:8], buf[8]
    torch.arange(start, start + n, dtype=torch.int64, out=state[0]).bitwise_and_(_M32)
    for w in state[1:]:
        w.zero_()
    c0 = _philox_rounds(state, spare, t, seed & _M32, (seed >> 32) & _M32)[0]
    # int32 bitcast and x < 0 → −x − 1 fold 2^31..2^32−1 onto 2^31−1..0: that is x ^ 0xFFFFFFFF.
    torch.bitwise_right_shift(c0, 31, out=t).mul_(_M32)
    c0.bitwise_xor_(t)
    out.copy_(c0)  # int → float32 rounds to nearest, as Triton's int32 → fp32 conversion does
    out.mul_(torch.tensor(UNIFORM_SCALE, dtype=torch.float32))


def philox_uniform(
    seed: int, start: int, n: int, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 uniforms in [0, 1) equal to Triton's tl.rand(seed, offset), offsets start..start+n-1."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"philox_uniform: seed must be in [0, 2^64), got {seed}")
    if out is None:
        out = torch.empty(n, dtype=torch.float32)
    elif out.dtype != torch.float32 or out.numel() != n:
        raise ValueError("philox_uniform: out must be a float32 tensor of n elements")
    for s, e in chunks(n):
        _uniform_chunk(seed, start + s, out[s:e])
    return out


def keep_mask(
    seed: int, start: int, n: int, density: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool mask, True where the entry survives DARE's drop: tl.rand(seed, offset) < density."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"keep_mask: density must be in [0, 1], got {density}")
    if out is None:
        out = torch.empty(n, dtype=torch.bool)
    for s, e in chunks(n):
        u = scratch("dare.u", e - s, torch.float32)
        _uniform_chunk(seed, start + s, u)
        torch.lt(u, torch.tensor(density, dtype=torch.float32), out=out[s:e])
    return out


def keep_factor(seed: int, start: int, n: int, density: float, *, out: torch.Tensor) -> torch.Tensor:
    """keep_mask as float32 factors (1.0 kept, 0.0 dropped) in out, for multiplying deltas in place.

    [u < p] is computed as sign(max(p − u, 0)) in float32: exact (IEEE subtraction never turns
    p > u into 0 or below) and several times cheaper on CPU than a bool compare and masked fill.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"keep_factor: density must be in [0, 1], got {density}")
    philox_uniform(seed, start, n, out=out)
    return out.neg_().add_(torch.tensor(density, dtype=torch.float32)).clamp_(min=0.0).sign_()


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A stable 63-bit seed for (user seed, tensor name, model index), via blake2b."""
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
