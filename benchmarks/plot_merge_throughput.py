"""Draw benchmarks/results/merge_throughput.png from merge_throughput.json (cpift.merge.tools.bench_report.plot)."""

from __future__ import annotations

import json
from pathlib import Path

from cpift.merge.tools.bench_report import plot

HERE = Path(__file__).resolve().parent / "results"


def main() -> None:
    r = json.loads((HERE / "merge_throughput.json").read_text())
    r.setdefault("dtype", "bf16")  # results written before the field existed
    plot(r, HERE / "merge_throughput.png")


if __name__ == "__main__":
    main()
