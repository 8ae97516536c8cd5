"""Merge throughput: the I/O floor, cpift and mergekit side by side (a wrapper of cpift.merge.tools.bench).

    python benchmarks/merge_throughput.py [--preset 1b] [--repeat 3] [--mergekit PATH/TO/mergekit-yaml]

The measuring code is ``cpift-merge bench`` (merge/tools/bench.py: cases, timing, peak RSS, parity); this
script keeps the repository's defaults: models built once under bench-work/, mergekit compared when
found, results in benchmarks/results/merge_throughput.{json,md} (the PNG: plot_merge_throughput.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from cpift.merge.tools.bench import DEFAULT_METHODS, find_mergekit, run_bench
from cpift.merge.tools.bench_report import markdown

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1b", help="synthetic shape PRESET[-layers:N][:DTYPE] (1b ≈ 0.97 GB bf16)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (median reported)")
    ap.add_argument("--backends", default="torch,cpu", help="cpift kernel backends, each method run on each")
    ap.add_argument("--busy", type=int, default=0, help="also run beside N CPU-bound competing processes")
    ap.add_argument("--workdir", type=Path, default=Path("bench-work"), help="models and outputs go here")
    ap.add_argument("--mergekit", default=find_mergekit(), help="path of mergekit-yaml (default: found on PATH)")
    ap.add_argument("--cold", action="store_true", help="also run once per case with the page cache dropped")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--note", default=None, help="free text stored with the results")
    ap.add_argument("--prefault-gib", type=float, default=0.0,
                    help="first touch this much anonymous memory once: on a VM whose guest memory is backed "
                         "lazily (seen here: 0.4 GB/s on first touch), page-cache growth during a run otherwise "
                         "pays the host's first-touch cost at random")
    args = ap.parse_args()
    if args.prefault_gib:
        # In a child: a forked child inherits its parent's peak RSS, which would spoil every ru_maxrss.
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import numpy; numpy.ones({int(args.prefault_gib * 2**30) // 8})"],
                       check=True)
        print(f"prefaulted {args.prefault_gib} GiB in {time.perf_counter() - t0:.1f} s", flush=True)
    result = run_bench(synthetic=args.preset, methods=args.methods.split(","), compare_mergekit=bool(args.mergekit),
                       mergekit=args.mergekit, repeat=args.repeat, workdir=args.workdir, cold=args.cold,
                       backends=args.backends.split(","), busy=args.busy, note=args.note)
    result["prefault_gib"] = args.prefault_gib
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "merge_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "merge_throughput.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
