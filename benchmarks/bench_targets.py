"""The merge-throughput targets checked against a `cpift-merge bench` results file (every figure read from it).

    python benchmarks/bench_targets.py [benchmarks/results/bench.json]

Prints a markdown table (target, op, provider, measured, limit, met, measured / limit) and writes it
to benchmarks/results/bench_targets.md beside the JSON. Work ratios are against the physical floor
(floor-read for cores), the python floor shown beside them; busy slowdowns are wall-time ratios.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WORK_LIMITS = {"slerp": 1.3, "linear": 1.3, "task-arithmetic": 1.3, "ties": 2.0, "dare-ties": 2.0,
               "dare-linear": 2.0, "fuse": 2.0, "cores": 2.5}
MERGEKIT_LIMITS = {"slerp": 6.0, "ties": 25.0}
BUSY_LIMIT = 2.4
GB = 1e9


def checks(r: dict) -> list[tuple[str, str, str, float, float, bool, str]]:
    """(target, op, provider, measured, limit, met, note) for every row a target applies to."""
    out = []
    quiet = [x for x in r["rows"] if x["condition"] == "quiet" and x["provider"].startswith("cpift")]
    for x in quiet:
        ratios = x["ratios"]
        floor = ratios["floor-read" if x["op"] == "cores" else "floor-physical"]
        limit = WORK_LIMITS.get(x["op"])
        if limit and x.get("timed_out_runs"):
            out.append(("work / floor work", x["op"], x["provider"], float("nan"),
                        limit, False, f"killed at the {r['case_timeout_s']:.0f} s time limit: no work time"))
        elif limit and floor["work"] is not None:
            py = ratios.get("floor-python", {}).get("work")
            out.append(("work / floor work", x["op"], x["provider"], floor["work"], limit, floor["work"] <= limit,
                        "floor-read" if x["op"] == "cores" else f"python floor: {py:.2f}×" if py else ""))
        if x["op"] == "cores":
            cap = 2 * r["largest_tensor_bytes"] + GB
            out.append(("peak RSS GB (≤ 2 × largest tensor + 1 GB)", "cores", x["provider"], x["peak_rss_bytes"] / GB,
                        cap / GB, x["peak_rss_bytes"] <= cap, ""))
        else:
            cap = r["largest_shard_bytes"] + GB
            out.append(("peak RSS GB (≤ one shard + 1 GB)", x["op"], x["provider"], x["peak_rss_bytes"] / GB,
                        cap / GB, x["peak_rss_bytes"] <= cap, ""))
        if x["op"] in MERGEKIT_LIMITS and "speedup_vs_mergekit_wall" in x:
            s, limit = x["speedup_vs_mergekit_wall"], MERGEKIT_LIMITS[x["op"]]
            mk = next(m for m in r["rows"]
                      if (m["op"], m["provider"], m["condition"]) == (x["op"], "mergekit", "quiet"))
            if x.get("timed_out_runs"):
                s, met, note = float("nan"), None, "both killed at the time limit: not measured"
            elif mk.get("timed_out_runs"):
                met, note = (True if s >= limit else None), "mergekit killed at the time limit: a lower bound"
            else:
                met, note = s >= limit, ""
            out.append(("speed-up vs mergekit (wall)", x["op"], x["provider"], s, limit, met, note))
    for x in r["rows"]:
        if x["condition"] != "quiet" and x["provider"].startswith("cpift"):
            s = x.get("slowdown_vs_quiet", {"wall": None, "work": None})
            if s["wall"] is None:
                continue
            if x.get("timed_out_runs"):
                out.append((f"busy/quiet wall ({r['busy']['competitors']} competitors)", x["op"], x["provider"],
                            float("nan"), BUSY_LIMIT, None, "killed at the time limit: not measured"))
                continue
            killed = ""
            out.append((f"busy/quiet wall ({r['busy']['competitors']} competitors)", x["op"], x["provider"], s["wall"],
                        BUSY_LIMIT, s["wall"] <= BUSY_LIMIT, (f"work: {s['work']:.2f}×" if s["work"] else "") + killed))
    return out


def table(r: dict) -> str:
    lines = [f"Targets against `{r['date']}`'s run ({r['machine']['cpus']} CPUs; others used "
             f"{r['load']['others_cpu_share_p50'] * 100:.0f}% of the CPUs in the median run, at most "
             f"{r['load']['others_cpu_share_max'] * 100:.0f}%):", "",
             "| target | op | provider | measured | limit | met | measured / limit | note |",
             "|---|---|---|---|---|---|---|---|"]
    for target, op, provider, got, limit, met, note in checks(r):
        shown = ("–", "–") if got != got else (f"{got:.2f}", f"{got / limit:.2f}")  # NaN: not measured
        lines.append(f"| {target} | {op} | {provider} | {shown[0]} | {limit:.2f} | "
                     f"{'met' if met else 'unknown' if met is None else '**not met**'} | "
                     f"{shown[1]} | {note} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "bench.json"
    text = table(json.loads(path.read_text()))
    (path.parent / "bench_targets.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
