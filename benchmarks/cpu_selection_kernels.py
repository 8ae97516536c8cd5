"""Microbenchmark of the fused CPU selection kernels (cpu backend, numba) against the torch backend.

Ops: score_histogram (radix pass 1 and pass 2 over |x − base|), score_deltas per row of 2048
(block means), pack_cut (score + cut + pack), overlap (popcount of two packed masks), magnitude_cut
(exact k-th largest, k = n/2). bf16 inputs of --n entries (default 50M), 1 and 2 threads, median of
--repeat runs after one warm-up (which also pays numba's compile, cached on disk). GB/s counts the
bytes each op reads and writes once (kernels/*.py headers), p20/p50/p80 over the runs.

  python benchmarks/cpu_selection_kernels.py [--n 50000000] [--repeat 5]
Appends rows to benchmarks/results/cpu_selection_kernels.json (one list per run, with the load average seen).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from cpift.kernels.masks import overlap, pack_cut
from cpift.kernels.scores import BINS, score_deltas, score_histogram
from cpift.kernels.select import magnitude_cut

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_selection_kernels.json"


def _cases(n: int):
    """(op, bytes moved, fn(backend)) for each op, on one set of bf16 inputs."""
    g = torch.Generator().manual_seed(0)
    base = (0.02 * torch.randn(n, generator=g)).to(torch.bfloat16)
    x = (base.float() + 0.002 * torch.randn(n, generator=g)).to(torch.bfloat16)
    hist = torch.zeros(BINS, dtype=torch.int64)
    score_histogram(x, base, hist=hist, backend="torch")
    top = (hist.flip(0).cumsum(0) >= n // 100).nonzero()[0].item()
    high_bin = BINS - 1 - top  # the bin of the top-1% threshold, as cores' pass 2 sees it
    cut = magnitude_cut(x, base, n // 100, backend="torch")
    packed, _ = pack_cut(x, base, cut=cut, backend="torch")
    other, _ = pack_cut(base, x, cut=cut, backend="torch")
    rows = torch.empty(n // 2048, dtype=torch.float32)
    read = 2 * x.element_size() * n
    return [
        ("score_histogram.high", read, lambda be: score_histogram(x, base, hist=hist, backend=be)),
        ("score_histogram.low", read, lambda be: score_histogram(x, base, hist=hist, high_bin=high_bin, backend=be)),
        ("score_deltas.row2048", read + 4 * rows.numel(),
         lambda be: score_deltas(x[: rows.numel() * 2048], base[: rows.numel() * 2048], block=2048, out=rows,
                                 backend=be)),
        ("pack_cut", read + n // 8, lambda be: pack_cut(x, base, cut=cut, out=packed, backend=be)),
        ("overlap", 2 * packed.numel(), lambda be: overlap(packed, other, backend=be)),
        ("magnitude_cut", read, lambda be: magnitude_cut(x, base, n // 2, backend=be)),
    ]


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values * 9
    return q[1], statistics.median(values), q[7]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    load_start = os.getloadavg()[0]
    cases = _cases(args.n)
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    rows: list[dict] = []
    history = json.loads(args.out.read_text()) if args.out.exists() else []
    report = {"date": date, "machine": machine, "load_average_at_start": load_start, "rows": rows}
    history.append(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for op, nbytes, fn in cases:
            for provider, be in (("cpift-cpu", "cpu"), ("cpift-torch", "torch")):
                fn(be)  # warm-up: compile (or load the cache), fault in scratch
                gbps = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    fn(be)
                    gbps.append(nbytes / (time.perf_counter() - t) / 1e9)
                p20, p50, p80 = _quantiles(gbps)
                rows.append({"op": op, "provider": provider, "gbps_p50": round(p50, 3), "gbps_p20": round(p20, 3),
                             "gbps_p80": round(p80, 3), "n": args.n, "dtype": "bfloat16", "threads": threads,
                             "date": date, "machine": machine})
                print(f"{op:22s} {provider:12s} {threads} thread(s): {p50:6.2f} GB/s (p20 {p20:.2f}, p80 {p80:.2f})",
                      flush=True)
                report["load_average_at_end"] = os.getloadavg()[0]
                args.out.write_text(json.dumps(history, indent=1) + "\n")  # row by row: a cut-short run keeps its rows
    print(f"load average {load_start:.1f} at the start, {report['load_average_at_end']:.1f} at the end; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
