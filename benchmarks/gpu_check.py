"""GPU check of the Triton tensor core: correctness compiled, then bandwidth against torch eager and a copy.

On a CUDA machine:
  1. runs tests/kernels with the kernels compiled (TRITON_INTERPRET unset), stopping on a failure;
  2. times every kernel with triton.testing.do_bench (median of its runs) on several GB of random
     bf16 data, beside torch eager doing the same work and a device-to-device copy of the same
     bytes; prints GB/s, % of copy bandwidth and the speed-up over torch, and writes JSON.
     Bytes counted per kernel = bytes it must read + bytes it must write (DRAM traffic at best).
  python benchmarks/gpu_check.py --json benchmarks/results/gpu_check.json     (< 5 minutes on one H200)

--dry-run runs the same timing code on the CPU under TRITON_INTERPRET=1 with tiny sizes and
time.perf_counter instead of CUDA events (CI runs it; its figures mean nothing).
Targets (the issue): ≥ 80% of copy bandwidth for scoring, mask packing and the SLERP blend.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes (for CI).")
    ap.add_argument("--gib", type=float, default=2.0,
                    help="Size of each bf16 input tensor in GiB (default 2; dry run: ~64 KiB).")
    ap.add_argument("--skip-tests", action="store_true", help="Do not run tests/kernels compiled first.")
    ap.add_argument("--json", type=Path, default=None, help="Write the results here.")
    return ap.parse_args()


def _timer(dry: bool):
    if not dry:
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3

    def cpu_median(fn) -> float:
        fn()
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t)
        return statistics.median(runs)

    return cpu_median


def _cases(n: int, device: str):
    """(name, bytes moved, cpift fn, torch eager fn): the same work both ways."""
    import torch

    from cpift.kernels.masks import overlap, pack_cut
    from cpift.kernels.scores import BINS, score_deltas
    from cpift.kernels.select import Cut
    from cpift.kernels.slerp import slerp_blend, slerp_reduce
    from cpift.kernels.ties import delta_merge

    g = torch.Generator(device=device).manual_seed(0)
    bf = torch.bfloat16
    a = torch.randn(n, generator=g, device=device).to(bf)
    b = torch.randn(n, generator=g, device=device).to(bf)
    xs = [(b.float() + 0.01 * torch.randn(n, generator=g, device=device)).to(bf) for _ in range(3)]
    out = torch.empty(n, dtype=bf, device=device)
    scores = torch.empty(n, dtype=torch.float32, device=device)
    hist = torch.zeros(BINS, dtype=torch.int64, device=device)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=device)
    packed = torch.empty((n + 7) // 8, dtype=torch.uint8, device=device)
    other = torch.randint(0, 256, packed.shape, dtype=torch.uint8, device=device, generator=g)
    pop = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64, device=device)
    cut = Cut(0.5, n)  # ~40% of |a − b| above it
    e = 2  # bytes per bf16 entry

    def torch_scores():
        s = (a.float() - b.float()).abs()
        hist.add_(torch.bincount((s.view(torch.int32) >> 16), minlength=BINS))
        return s

    def torch_pack():
        sel = ((a.float() - b.float()).abs() > cut.value).to(torch.uint8)
        return (sel[: n // 8 * 8].view(-1, 8) * weights).sum(1, dtype=torch.uint8)

    def torch_ties():
        ds = [x.float() - b.float() for x in xs]
        s = torch.sign(sum(ds))
        num = sum(torch.where(d * s > 0, d, 0.0) for d in ds)
        den = sum(torch.where(d * s > 0, 1.0, 0.0) for d in ds)
        return (b.float() + torch.where(den > 0, num / den.clamp(min=1), 0.0)).to(bf)

    be = "triton"
    return [
        ("score+histogram", n * (2 * e + 4), lambda: score_deltas(a, b, hist=hist, out=scores, backend=be),
         torch_scores),
        ("compare+pack", n * 2 * e + n // 8, lambda: pack_cut(a, b, cut=cut, out=packed, backend=be), torch_pack),
        ("slerp reduce", n * 2 * e, lambda: slerp_reduce(a, b, backend=be),
         lambda: (torch.dot(a.float(), a.float()), torch.dot(b.float(), b.float()), torch.dot(a.float(), b.float()))),
        ("slerp blend", n * 3 * e, lambda: slerp_blend(a, b, 0.6, 0.4, out=out, backend=be),
         lambda: out.copy_(0.6 * a.float() + 0.4 * b.float())),
        ("ties N=3", n * 5 * e, lambda: delta_merge(b, xs, [1.0, 1.0, 1.0], elect_sign=True, out=out, backend=be),
         torch_ties),
        ("popcount overlap", 2 * packed.numel(), lambda: overlap(packed, other, backend=be),
         lambda: (pop[(packed & other).long()].sum(), pop[(packed | other).long()].sum())),
    ]


def _run_tests() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", str(ROOT / "tests" / "kernels")], env=env)
    if proc.returncode:
        sys.exit(f"gpu_check: tests/kernels failed compiled on the GPU (exit {proc.returncode})")


def main() -> None:
    args = _parse()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton defines any kernel
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --dry-run on a CPU)")
    if not args.dry_run and not args.skip_tests:
        _run_tests()
    n = (1 << 15) + 3 if args.dry_run else int(args.gib * 2**30) // 2
    timer = _timer(args.dry_run)
    src = torch.empty(n * 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = timer(lambda: dst.copy_(src))
    copy_gbps = 2 * src.numel() / copy_s / 1e9
    del src, dst
    rows = []
    for name, nbytes, ours, eager in _cases(n, device):
        t_ours, t_eager = timer(ours), timer(eager)
        gbps = nbytes / t_ours / 1e9
        rows.append({"kernel": name, "entries": n, "bytes": nbytes, "cpift_s": t_ours, "torch_s": t_eager,
                     "cpift_gbps": gbps, "pct_of_copy": 100 * gbps / copy_gbps, "speedup_vs_torch": t_eager / t_ours})
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU (interpreter), {platform.machine()}"
    print(f"{device_name}; copy {copy_gbps:.1f} GB/s; {n:,} bf16 entries per input"
          + ("  (dry run: interpreter timings, meaningless)" if args.dry_run else ""))
    print(f"{'kernel':<18} {'GB/s':>9} {'% copy':>8} {'× torch':>8}")
    for r in rows:
        print(f"{r['kernel']:<18} {r['cpift_gbps']:9.1f} {r['pct_of_copy']:7.1f}% {r['speedup_vs_torch']:7.2f}×")
    if args.json:
        import triton

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_name,
            "dry_run": args.dry_run, "torch": torch.__version__, "triton": triton.__version__,
            "copy_gbps": copy_gbps, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
