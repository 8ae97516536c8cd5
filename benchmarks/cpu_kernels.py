"""Fused CPU kernels (backend "cpu") against the torch path: GB/s of input+output, median of R runs.

    python benchmarks/cpu_kernels.py [--n 50000000] [--repeats 5] [--threads 1,2]
    python benchmarks/cpu_kernels.py --busy [--n 60000000]   # ties alone / with 2 CPU-bound competitors,
                                                             # per numba threading layer and BLOCK

Rows go to benchmarks/results/cpu_kernels.json (op, provider cpift-cpu / cpift-torch, GB/s p50/p20/p80,
n, dtype, threads, date, machine, load average before the row). Others share this machine: the load
average is recorded with every row, and numbers are only comparable within one run.
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
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "cpu_kernels.json"


def _ops(n: int):
    from cpift.kernels.linear import linear
    from cpift.kernels.select import magnitude_cut
    from cpift.kernels.slerp import slerp_blend, slerp_reduce
    from cpift.kernels.ties import delta_merge

    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g).bfloat16()
    xs = [(base.float() + 0.05 * torch.randn(n, generator=g)).bfloat16() for _ in range(3)]
    out = torch.empty_like(base)
    cuts = [magnitude_cut(x, base, int(0.3 * n), backend="torch") for x in xs]
    w = [0.5, 0.3, 0.8]
    e = 2  # bytes per bf16 entry
    return {
        "linear3": (4 * n * e, lambda be: linear(xs, w, out=out, backend=be)),
        "slerp": (5 * n * e, lambda be: (slerp_reduce(base, xs[0], backend=be),
                                         slerp_blend(base, xs[0], 0.6, 0.4, out=out, backend=be))),
        "ties3": (5 * n * e, lambda be: delta_merge(base, xs, w, cuts=cuts, elect_sign=True, out=out, backend=be)),
        "dare_ties3": (5 * n * e, lambda be: delta_merge(base, xs, w, drop_density=0.5, drop_seeds=[1, 2, 3],
                                                         elect_sign=True, out=out, backend=be)),
    }


def _times(fn, repeats: int) -> list[float]:
    fn()  # warm: compile or load from numba's cache, fault the pages in
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def _row(op: str, provider: str, nbytes: int, ts: list[float], n: int, threads: int, **extra) -> dict:
    q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [ts[0]] * 4
    return {"op": op, "provider": provider, "gbps_p50": nbytes / statistics.median(ts) / 1e9,
            "gbps_p20": nbytes / q[3] / 1e9, "gbps_p80": nbytes / q[0] / 1e9, "n": n, "dtype": "bfloat16",
            "threads": threads, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "loadavg": round(os.getloadavg()[0], 2), **extra}


def micro(n: int, repeats: int, threads: list[int], providers: list[str]) -> list[dict]:
    rows = []
    ops = _ops(n)
    for t in threads:
        torch.set_num_threads(t)
        for op, (nbytes, fn) in ops.items():
            for be in providers:
                rows.append(_row(op, f"cpift-{be}", nbytes, _times(lambda: fn(be), repeats), n, t))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def busy(n: int, repeats: int) -> list[dict]:
    """ties3 on 2 threads, alone and beside two `while True: pass` processes, per threading layer/BLOCK."""
    rows = []
    for layer in ("workqueue", "omp", "tbb"):
        for block in (1 << 14, 1 << 16, 1 << 18):
            for competitors in (0, 2):
                # A BLOCK other than the default compiles into its own numba cache directory.
                env = {**os.environ, "NUMBA_THREADING_LAYER": layer,
                       "NUMBA_CACHE_DIR": f"/tmp/cpift-numba-block{block}"}
                hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(competitors)]
                try:
                    proc = subprocess.run([sys.executable, __file__, "--child", str(n), str(repeats), str(block)],
                                          env=env,
                                          capture_output=True, text=True)
                finally:
                    for h in hogs:
                        h.kill()
                        h.wait()
                if proc.returncode != 0:
                    print(f"{layer} block={block}: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                    break
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row.update(layer=layer, block=block, competitors=competitors)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--providers", default="cpu,torch")
    ap.add_argument("--busy", action="store_true")
    ap.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import cpift.kernels._cpu as cpu

        cpu.BLOCK = args.child[2]  # before the kernel modules import it
        torch.set_num_threads(2)
        import numba

        from cpift.kernels.select import Cut
        from cpift.kernels.ties import delta_merge

        m = args.child[0]
        base = torch.randn(m).bfloat16()
        xs = [(base.float() + 0.05 * torch.randn(m)).bfloat16() for _ in range(3)]
        out = torch.empty_like(base)
        cuts = [Cut(value=0.03, last_tie=-1)] * 3  # a fixed trim: the kernel's work, without the selection

        def fn() -> None:
            delta_merge(base, xs, [0.5, 0.3, 0.8], cuts=cuts, elect_sign=True, out=out, backend="cpu")

        row = _row("ties3", "cpift-cpu", 5 * m * 2, _times(fn, args.child[1]), m, 2)
        row["numba_layer"] = numba.threading_layer()
        row["block"] = args.child[2]
        print(json.dumps(row))
        return
    rows = busy(args.n, args.repeats) if args.busy else micro(args.n, args.repeats,
                                                              [int(t) for t in args.threads.split(",")],
                                                              args.providers.split(","))
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(old + rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
