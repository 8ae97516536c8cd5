"""Inputs and the bit comparison of benchmarks/gpu_check.py: bf16 deltas as fine-tunes make them (exact
zeros, ties at the cut), drawn on the device where they are used (2^28 entries take seconds on a GPU,
minutes on a CPU). `env` is gpu_check's Env (its torch module and device)."""

from __future__ import annotations


def realistic(env, n: int, count: int = 3, seed: int = 0):
    """A bf16 base and `count` task models: a third of the deltas exactly 0, the rest ±1..3 steps of 2^-8."""
    torch = env.torch
    dev = env.device
    g = torch.Generator(device=dev).manual_seed(seed)
    base = torch.randn(n, generator=g, device=dev).to(torch.bfloat16)
    xs = []
    for _ in range(count):
        step = torch.randint(-3, 4, (n,), generator=g, device=dev).float() * 2.0 ** -8
        step = torch.where(torch.rand(n, generator=g, device=dev) < 0.2, 0.0, step)
        xs.append((base.float() + step).to(torch.bfloat16))  # exact in float32, one bf16 rounding
    return base, xs


def ulp_steps(env, n: int, seed: int = 0):
    """(task, base) as a bf16 fine-tune moves weights: 60% unchanged, the rest ±1..3 ulps (tiny near 0)."""
    torch, dev = env.torch, env.device
    g = torch.Generator(device=dev).manual_seed(seed)
    base = (0.02 * torch.randn(n, generator=g, device=dev)).to(torch.bfloat16)
    bits = base.view(torch.int16).int()
    step = torch.randint(-3, 4, (n,), generator=g, device=dev) * (torch.rand(n, generator=g, device=dev) >= 0.6)
    mag = ((bits & 0x7FFF) + step).clamp(min=1)
    return ((bits & ~0x7FFF) | mag).to(torch.int16).view(torch.bfloat16), base


def cpu(ts):
    return [t.cpu() for t in ts]


def compare(got, want) -> dict:
    """Bit comparison of a device result with the CPU reference (NaN equal to NaN)."""
    got = got.cpu()
    same = got == want
    if got.is_floating_point():
        same |= got.isnan() & want.isnan()
    bad = (~same).nonzero().flatten()
    return {"exact": not bad.numel(), "mismatches": int(bad.numel()), "first": bad[:5].tolist(),
            "entries": got.numel()}
