# DARE's random drop mask: keep entry i when u_i < density, u_i from a Philox4x32-10 counter-based
# stream keyed by (seed, tensor name, model index), bit-identical to Triton's tl.rand4x (lane i mod 4 of
# counter i // 4), so a mask depends on neither chunking, threads nor device.
# Precision: exact integer arithmetic (uint32 words held in int64); u_i is float32 in [0, 1).
# Design notes (the maths, bytes per entry, exactness): docs/kernels.md#kernelsdarepy
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
INDEX_PERIOD = 1 << 34  # element indices wrap here: counter i // 4 is a uint32
_M32 = 0xFFFFFFFF


def _philox_rounds(
    state: list[torch.Tensor], spare: list[torch.Tensor], k0: int, k1: int
) -> list[torch.Tensor]:
    """Run the 10 rounds on int64 words; state and spare buffers swap roles, nothing is allocated.

    Input words must be in [0, 2^32). The returned c0 and c2 are in [0, 2^32); c1 and c3 hold the
    right low 32 bits but garbage above (the unmasked products, see the header): mask them before
    use.

    mulhilo is ONE int64 multiply p = c · a: c, a < 2^32, so the true product is < 2^64 but may
    exceed 2^63. torch's int64 multiply wraps in two's complement (a plain machine multiply on
    every CPU build: C++ leaves signed overflow undefined, but compilers emit imul/vpmullq, which
    wrap), so the bit pattern of p is the unsigned 64-bit product: lo = p & M32 and
    hi = (p >> 32) & M32, the mask undoing the sign extension of the arithmetic shift. A platform
    where the multiply did not wrap would fail the Random123 known-answer tests (their products
    exceed 2^63), as would the pinned Triton values.
    """
    for _ in range(ROUNDS):
        c0, c1, c2, c3 = state
        n0, n1, n2, n3 = spare
        torch.mul(c0, ROUND_A, out=n3)  # p0; new c3 = lo(p0), masked later
        torch.mul(c2, ROUND_B, out=n1)  # p1; new c1 = lo(p1), masked later
        # new c0 = hi(p1) ^ c1 ^ k0, new c2 = hi(p0) ^ c3 ^ k1: one mask clears both the sign
        # extension of p >> 32 and the garbage above bit 31 of the unmasked c1/c3.
        torch.bitwise_right_shift(n1, 32, out=n0).bitwise_xor_(c1).bitwise_xor_(k0)
        torch.bitwise_right_shift(n3, 32, out=n2).bitwise_xor_(c3).bitwise_xor_(k1)
        n0.bitwise_and_(_M32)
        n2.bitwise_and_(_M32)
        state, spare = spare, state
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
    out = _philox_rounds(state, spare, k0 & _M32, k1 & _M32)
    out[1].bitwise_and_(_M32)
    out[3].bitwise_and_(_M32)
    return out[0], out[1], out[2], out[3]


def _uniform_chunk(seed: int, start: int, out: torch.Tensor) -> None:
    """out ← the uniforms of elements start..start+len(out)-1 (start already reduced mod 2^34)."""
    n = out.numel()
    q0, r = start >> 2, start & 3
    m = (r + n + 3) >> 2  # counters q0..q0+m-1 cover the elements
    buf = [scratch(f"dare.w{i}", m, torch.int64, out.device) for i in range(8)]
    state, spare = buf[:4], buf[4:]
    torch.arange(q0, q0 + m, dtype=torch.int64, device=out.device, out=state[0]).bitwise_and_(_M32)
    for w in state[1:]:
        w.zero_()
    words = _philox_rounds(state, spare, seed & _M32, (seed >> 32) & _M32)
    direct = r == 0 and n == 4 * m and out.is_contiguous()  # lanes land in out itself
    lanes = (out if direct else scratch("dare.lanes", 4 * m, torch.float32, out.device)).view(m, 4)
    t = (spare if words[0] is state[0] else state)[0]  # the set the rounds did not return is free
    for j, w in enumerate(words):
        # Bitcast to int32 and x < 0 → −x − 1 (= ~x) fold w in [2^31, 2^32) onto 2^32 − 1 − w,
        # i.e. w ^ 0xFFFFFFFF, selected by bit 31 of w.
        if j % 2:  # c1, c3: unmasked products, drop the bits above 31 first
            w.bitwise_and_(_M32)
        torch.bitwise_right_shift(w, 31, out=t).mul_(_M32)
        w.bitwise_xor_(t)
        lanes[:, j].copy_(w)  # int → float32 rounds to nearest, as Triton's int32 → fp32 does
    if not direct:
        out.copy_(lanes.view(-1)[r : r + n])
    out.mul_(torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=out.device))


def philox_uniform(
    seed: int, start: int, n: int, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 uniforms in [0, 1) of elements start..start+n-1 (Triton's tl.rand4x, 4 lanes)."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"philox_uniform: seed must be in [0, 2^64), got {seed}")
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device="cpu")
    elif out.dtype != torch.float32 or out.numel() != n:
        raise ValueError("philox_uniform: out must be a float32 tensor of n elements")
    start %= INDEX_PERIOD  # also maps a negative start onto its wrapped index
    for s, e in chunks(n):
        _uniform_chunk(seed, start + s, out[s:e])
    return out


def keep_mask(
    seed: int, start: int, n: int, density: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool mask, True where the entry survives DARE's drop: philox_uniform(...) < density."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"keep_mask: density must be in [0, 1], got {density}")
    if out is None:
        out = torch.empty(n, dtype=torch.bool, device="cpu")
    for s, e in chunks(n):
        u = scratch("dare.u", e - s, torch.float32, out.device)
        philox_uniform(seed, start + s, e - s, out=u)
        torch.lt(u, torch.tensor(density, dtype=torch.float32, device=u.device), out=out[s:e])
    return out


def keep_factor(seed: int, start: int, n: int, density: float, *, out: torch.Tensor) -> torch.Tensor:
    """keep_mask as float32 factors (1.0 kept, 0.0 dropped) in out, for multiplying deltas in place.

    [u < p] is computed as sign(max(p − u, 0)) in float32: exact (IEEE subtraction never turns
    p > u into 0 or below) and several times cheaper on CPU than a bool compare and masked fill.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"keep_factor: density must be in [0, 1], got {density}")
    philox_uniform(seed, start, n, out=out)
    return out.neg_().add_(torch.tensor(density, dtype=torch.float32, device=out.device)).clamp_(min=0.0).sign_()


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A stable 63-bit seed for (user seed, tensor name, model index), via blake2b."""
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
