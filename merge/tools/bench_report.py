"""The results of ``cpift-merge bench`` (merge/tools/bench.py) as a markdown table and a bar chart, and the
SLERP parity check between cpift's and mergekit's outputs."""

from __future__ import annotations

import math
import os
from pathlib import Path

from cpift.errors import ParameterError
from cpift.merge.io.png import write_png


def parity(a: Path, b: Path) -> dict:
    """How far cpift's output is from mergekit's: bit-identical entries, entries within one bf16 ulp,
    and the largest absolute difference in ulps of its tensor's largest |value| (ulps of the entry
    itself mislead where the result cancels to almost 0: 1e-9 there is many ulps of a 1e-8 value)."""
    from safetensors.torch import load_file

    def load(d: Path) -> dict:
        s = {}
        for f in sorted(d.glob("*.safetensors")):
            s.update(load_file(str(f)))
        return s

    x, y = load(a), load(b)
    total = same = near = 0
    worst = 0.0
    for name, t in x.items():
        u = y[name]
        total += t.numel()
        same += int((t == u).sum())
        ulp = (t.float().abs().clamp(min=1e-30).log2().floor() - 7).exp2()  # bf16: 8 significant bits
        near += int(((t.float() - u.float()).abs() <= ulp).sum())
        scale_ulp = 2.0 ** (math.floor(math.log2(float(t.float().abs().max()) or 1e-30)) - 7)
        worst = max(worst, float((t.float() - u.float()).abs().max()) / scale_ulp)
    return {"entries": total, "identical_fraction": same / total, "within_1_ulp_fraction": near / total,
            "max_diff_in_ulps_of_tensor_scale": worst, "tensors": len(x), "same_names": set(x) == set(y)}


def _f(v: float | None, spec: str = ".2f") -> str:
    return "" if v is None else format(v, spec)


def markdown(r: dict) -> str:
    """The results as a markdown page: conditions, one table row per case, parity, cold runs."""
    load = r.get("load", {})
    lines = [f"# Merge throughput ({r['date']})", "",
             f"Machine: {r['machine']['cpus']} CPUs, {r['machine']['platform']}, torch {r['machine']['torch']}. "
             f"Model: {r['model']}. Median of {r['repeat']} runs, cases alternating, warm page cache; wall = the "
             f"whole command including interpreter start-up, work = the time the tool itself reports"
             + (f"; both tools with {r['threads']} torch thread{'s' if r['threads'] != 1 else ''}." if r.get("threads")
                else "; each tool with its default torch threads."), ""]
    if load:
        worst = max(r["rows"], key=lambda x: max(x.get("others_cpu_share_all", [0])))
        peak = (f", at most {load['others_cpu_share_max'] * 100:.0f}% (during a run of {worst['provider']} {worst['op']})"
                if "others_cpu_share_max" in load else "")
        lines += [f"Load: other processes used {load['others_cpu_share_p50'] * 100:.0f}% of the CPUs during the "
                  f"median run{peak} (load average {load['loadavg_start'][0]:.2f} at the start, "
                  f"{load['loadavg_end'][0]:.2f} at the end)." + (f" {r['note']}" if r.get("note") else ""), ""]
    lines += ["| op | provider | inputs | wall s (p50) | p20–p80 | work s | GB/s input (wall) | peak RSS GB "
              "| × floor (wall) | × floor (work) | speed-up vs mergekit | others' CPU |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        w = x["wall_s"]
        lines.append(
            f"| {x['op']} | {x['provider']} | {x['inputs']} | {w['p50']:.2f} | {w['p20']:.2f}–{w['p80']:.2f} | "
            f"{_f(x['work_s_p50'])} | {x['gbps_input_wall']:.2f} | {x['peak_rss_bytes'] / 1e9:.2f} | "
            f"{x['ratio_to_floor_wall']:.2f} | {_f(x['ratio_to_floor_work'])} | "
            f"{_f(x.get('speedup_vs_mergekit_wall'), '.1f') + ('×' if 'speedup_vs_mergekit_wall' in x else '')} | "
            f"{x.get('others_cpu_share_p50', 0) * 100:.0f}% |")
    p = r.get("slerp_parity_vs_mergekit")
    if p:
        lines += ["", f"SLERP parity with {r['mergekit']}: {p['identical_fraction'] * 100:.3f}% of "
                  f"{p['entries']:,} entries bit-identical, {p['within_1_ulp_fraction'] * 100:.4f}% within one "
                  f"bf16 ulp of the entry; largest difference {p['max_diff_in_ulps_of_tensor_scale']:.2f} bf16 ulp "
                  f"of its tensor's largest |value|."]
    cold = [x for x in r["rows"] if "cold_wall_s" in x]
    if cold:
        lines += ["", "Cold page cache (dropped before each command, one run each):", "",
                  "| op | provider | wall s | GB/s input |", "|---|---|---|---|"]
        lines += [f"| {x['op']} | {x['provider']} | {x['cold_wall_s']:.2f} | "
                  f"{x['input_bytes'] / x['cold_wall_s'] / 1e9:.2f} |" for x in cold]
    else:
        lines += ["", f"Cold cache: {r['cold_cache']}"]
    lines.append("")
    return "\n".join(lines)


def plot(r: dict, path: str | os.PathLike) -> Path:
    """Bar chart of wall seconds per case (median, p20–p80 whiskers) into a PNG.

    Raises:
        ParameterError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ParameterError("--plot: needs matplotlib (pip install 'cpift[plot]')") from None
    rows = r["rows"]
    p50 = [x["wall_s"]["p50"] for x in rows]
    err = [[x["wall_s"]["p50"] - x["wall_s"]["p20"] for x in rows],
           [x["wall_s"]["p80"] - x["wall_s"]["p50"] for x in rows]]
    colors = {"floor": "#999999", "cpift": "#1f77b4", "mergekit": "#d62728"}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.5))
    ax.bar(range(len(rows)), p50, yerr=err, capsize=3,
           color=[colors.get(x["provider"].split("-")[0], "#999999") for x in rows])
    for i, v in enumerate(p50):
        ax.text(i, v, f"{v:.1f}s", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [f"{x['op']}\n{x['provider']}" for x in rows], fontsize=8)
    ax.set_ylabel("wall seconds (median, p20–p80), lower is better")
    gb = max(r["model_bytes"].values()) / 1e9
    ax.set_title(f"Merging {gb:.2f} GB {r.get('dtype', '')} models, {r['machine']['cpus']} CPUs, warm cache "
                 f"({r['date'][:10]})", fontsize=10)
    fig.tight_layout()
    return write_png(fig, path, dpi=110)
