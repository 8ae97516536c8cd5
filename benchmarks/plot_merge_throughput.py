"""Draw benchmarks/results/merge_throughput.png from merge_throughput.json (wall seconds per case)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent / "results"


def main() -> None:
    r = json.loads((HERE / "merge_throughput.json").read_text())
    rows = r["rows"]
    labels = [f"{x['op']}\n{x['provider']}" for x in rows]
    p50 = [x["wall_s"]["p50"] for x in rows]
    err = [[x["wall_s"]["p50"] - x["wall_s"]["p20"] for x in rows], [x["wall_s"]["p80"] - x["wall_s"]["p50"] for x in rows]]
    colors = {"floor": "#999999", "cpift": "#1f77b4", "mergekit": "#d62728"}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(range(len(rows)), p50, yerr=err, capsize=3, color=[colors.get(x["provider"].split("-")[0], "#999999")
                                                             for x in rows])
    for i, v in enumerate(p50):
        ax.text(i, v, f"{v:.1f}s", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("wall seconds (median, p20–p80), lower is better")
    ax.set_title(f"Merging ~1 GB bf16 Llama-shaped models, {r['machine']['cpus']} CPUs, warm cache ({r['date'][:10]})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(HERE / "merge_throughput.png", dpi=110)


if __name__ == "__main__":
    main()
