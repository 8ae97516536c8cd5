"""The results of ``cpift-merge bench`` (merge/tools/bench.py): rows summarised from the runs, a markdown page
and a bar chart drawn from them, and the SLERP parity check between cpift's and mergekit's outputs."""

from __future__ import annotations

import math
import os
import platform
import statistics
from pathlib import Path

from cpift.errors import ParameterError
from cpift.merge.io.png import write_png

NOT_ASKED = "not asked (--cold)"  # the result's cold_cache when --cold was not given: nothing is printed


def machine() -> dict:
    """What the results were measured on."""
    import psutil
    import torch

    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:  # not Linux: the platform string says enough
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_bytes": psutil.virtual_memory().total,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("cpift", "torch", "numba", "numpy", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _q(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _stats(xs: list[float] | None) -> dict | None:
    if not xs or any(x is None for x in xs):
        return None
    return {"p50": statistics.median(xs), "p20": _q(xs, 0.2), "p80": _q(xs, 0.8), "all": xs}


def _command(cmd: tuple[str, ...]) -> str:
    return " ".join("<script>" if "\n" in a else a for a in cmd)


def _row(case, condition: str, runs: list[dict], in_bytes: int, *, date: str, machine: dict) -> dict:
    walls, works = [s["wall"] for s in runs], [s["work"] for s in runs]
    return {"op": case.op, "provider": case.provider, "condition": condition, "inputs": len(case.inputs),
            "input_bytes": in_bytes,
            "config": {"params": case.params, "backend": case.backend, "command": _command(case.cmd),
                       "competitors": int(condition.removeprefix("busy-")) if condition != "quiet" else 0},
            "wall_s": _stats(walls), "work_s": _stats(works),
            "gbps_input_wall": _stats([in_bytes / w / 1e9 for w in walls]),
            "gbps_input_work": _stats([in_bytes / w / 1e9 for w in works]) if _stats(works) else None,
            "peak_rss_bytes": max(s["rss"] for s in runs),
            "timed_out_runs": sum(bool(s.get("timed_out")) for s in runs),
            "others_cpu_share_p50": statistics.median(s["others_cpu_share"] for s in runs),
            "others_cpu_share_all": [s["others_cpu_share"] for s in runs],
            "competitors_cpu_share_p50": statistics.median(s["competitors_cpu_share"] for s in runs),
            "device": "cpu", "date": date,
            "machine": f"{machine['cpus']} CPUs {machine['cpu_model']}".strip()}


def _ratio(a: dict | None, b: dict | None) -> float | None:
    return a["p50"] / b["p50"] if a and b and b["p50"] else None


def summarize(cases: list, samples: dict, compile_runs: dict, size: dict, cold_walls: dict, *, date: str,
              machine: dict) -> dict:
    """Rows (one per case and condition, quiet first), the cold-compile rows and the load, from the
    runs of merge/tools/bench.py (``samples[(case, condition)]``: one dict per run)."""
    rows, by = [], {}
    conditions = list(dict.fromkeys(c for _, c in samples))
    for condition in conditions:
        for case in cases:
            if (case, condition) in samples:
                row = _row(case, condition, samples[(case, condition)], sum(size[p] for p in case.inputs),
                           date=date, machine=machine)
                by[(case.op, case.provider, case.inputs, condition)] = row
                rows.append(row)
    for case in cases:
        for condition in conditions:
            row = by.get((case.op, case.provider, case.inputs, condition))
            if row is not None:
                _compare(row, case, condition, by, cold_walls)
    compiled = [_compiled(case, cold, by) for case, cold in compile_runs.items()]
    shares = [(s["others_cpu_share"], case, cond) for (case, cond), runs in samples.items() for s in runs]
    worst = max(shares, key=lambda x: x[0])
    load = {"others_cpu_share_p50": statistics.median(x[0] for x in shares), "others_cpu_share_max": worst[0],
            "worst_run": f"{worst[1].provider} {worst[1].op} ({worst[2]})"}
    return {"rows": rows, "compile": compiled, "load": load}


def _compare(row: dict, case, condition: str, by: dict, cold_walls: dict) -> None:
    """Add a row's ratios: to its floors, to mergekit, busy to quiet; its cold wall time."""
    if case.op != "floor":
        row["ratios"] = {}
        for kind in (("read",) if case.op == "cores" else ("physical", "python")):
            floor = by.get(("floor", f"floor-{kind}-{len(case.inputs)}", case.inputs, condition))
            if floor is not None:
                row["ratios"][f"floor-{kind}"] = {"wall": _ratio(row["wall_s"], floor["wall_s"]),
                                                  "work": _ratio(row["work_s"], floor["work_s"])}
    mk = by.get((case.op, "mergekit", case.inputs, condition))
    if case.provider.startswith("cpift") and mk is not None:
        row["speedup_vs_mergekit_wall"] = _ratio(mk["wall_s"], row["wall_s"])
    quiet = by.get((case.op, case.provider, case.inputs, "quiet"))
    if condition != "quiet" and quiet is not None and not (row["timed_out_runs"] or quiet["timed_out_runs"]):
        row["slowdown_vs_quiet"] = {"wall": _ratio(row["wall_s"], quiet["wall_s"]),
                                    "work": _ratio(row["work_s"], quiet["work_s"])}
    if (case, condition) in cold_walls:
        row["cold_wall_s"] = cold_walls[(case, condition)]
        if condition != "quiet" and (case, "quiet") in cold_walls:
            row["cold_slowdown_vs_quiet"] = row["cold_wall_s"] / cold_walls[(case, "quiet")]


def _compiled(case, cold: dict, by: dict) -> dict:
    """A fused-backend case's cold-compile row, against its warm runs and the torch backend's."""
    warm = by.get((case.op, case.provider, case.inputs, "quiet"))
    ref = by.get((case.op, "cpift-torch", case.inputs, "quiet"))
    warm_work = warm["work_s"]["p50"] if warm and warm["work_s"] else None
    return {"op": case.op, "provider": case.provider, "cold_wall_s": cold["wall"],
            "cold_work_s": cold["work"], "warm_wall_s_p50": warm and warm["wall_s"]["p50"],
            "warm_work_s_p50": warm_work,
            "compile_s": cold["work"] - warm_work if cold["work"] is not None and warm_work else None,
            "cold_wall_vs_torch_wall": cold["wall"] / ref["wall_s"]["p50"] if ref else None,
            "others_cpu_share": cold["others_cpu_share"],
            "numba_cache": "empty (a fresh NUMBA_CACHE_DIR)"}


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


def slerp_parity(cases: list) -> dict | None:
    """cpift's SLERP output against mergekit's, when both ran (each case's last output is still there)."""
    by_key = {(c.op, c.provider): c for c in cases}
    slerp_cpift = by_key.get(("slerp", "cpift-cpu")) or by_key.get(("slerp", "cpift-torch"))
    if slerp_cpift is None or ("slerp", "mergekit") not in by_key:
        return None
    par = parity(slerp_cpift.out, by_key[("slerp", "mergekit")].out)
    par["cpift"] = slerp_cpift.provider
    return par


def _f(v: float | None, spec: str = ".2f") -> str:
    return "" if v is None else format(v, spec)


def _spread(st: dict | None, x: dict | None = None) -> str:
    out = "" if st is None else f"{st['p50']:.2f} ({st['p20']:.2f}–{st['p80']:.2f})"
    if x is not None and x.get("timed_out_runs"):
        out += f" {x['timed_out_runs']} killed at the time limit"
    return out


def _x(v: float | None, spec: str = ".2f") -> str:
    return "" if v is None else format(v, spec) + "×"


def _floor_ratio(x: dict) -> float | None:
    hit = x.get("ratios", {}).get("floor-read" if x["op"] == "cores" else "floor-physical")
    return hit and hit["work"]


def _conditions(r: dict) -> str:
    m, v = r["machine"], r.get("versions", {})
    threads = r.get("threads")
    return (f"Machine: {m['cpus']} CPUs ({m.get('cpu_model') or 'model unknown'}), "
            f"{m.get('memory_bytes', 0) / 2**30:.0f} GiB, {m['platform']}; cpift {v.get('cpift')}, torch {m['torch']}, "
            f"numba {v.get('numba')}, safetensors {v.get('safetensors')}"
            + (f", {r['mergekit']}" if r.get("mergekit") else "") + f". Model: {r['model']}. "
            f"Median (p20–p80) of {r['repeat']} runs per case"
            + (f" ({r['mergekit_repeat']} for mergekit)"
               if r.get("mergekit") and r.get("mergekit_repeat", r["repeat"]) != r["repeat"] else "")
            + ", cases alternating, warm page cache; wall = the whole command including interpreter start-up, "
            "work = the time the tool itself reports"
            + (f"; both tools with {threads} thread{'s' if threads != 1 else ''}." if threads
               else "; each tool with its default threads (cpift: one per core)."))


def markdown(r: dict) -> str:
    """The results as a markdown page: conditions, the quiet and busy tables, cold compile, parity."""
    lines = [*_md_intro(r), *_md_quiet(r), *_md_busy(r), *_md_compile(r), *_md_parity(r), *_md_cold(r), ""]
    return "\n".join(lines)


def _md_intro(r: dict) -> list[str]:
    """The title, the conditions, what the floors are and the machine's load."""
    load = r.get("load", {})
    lines = [f"# Merge throughput ({r['date']})", "", _conditions(r), "",
             "Floors: floor-physical = every input byte read with 8 MiB sequential reads and one model's bytes "
             "written to a new file (page cache, no fsync), as cat/dd would; floor-python = every tensor opened "
             "with safetensors' get_tensor and one model written with save_file (get_tensor maps the file without "
             "copying, so only the written model's bytes are touched); floor-read = the read pass alone (the floor "
             "of cores, whose masks are small).", ""]
    if load:
        lines += [f"Load: other processes (not the bench's competitors) used {load['others_cpu_share_p50'] * 100:.0f}% "
                  f"of the CPUs during the median run, at most {load['others_cpu_share_max'] * 100:.0f}% (during "
                  f"{load.get('worst_run', 'one run')}); load average {load['loadavg_start'][0]:.2f} at the start, "
                  f"{load['loadavg_end'][0]:.2f} at the end." + (f" {r['note']}" if r.get("note") else ""), ""]
    return lines


def _md_quiet(r: dict) -> list[str]:
    """The quiet runs' table."""
    quiet = [x for x in r["rows"] if x.get("condition", "quiet") == "quiet"]
    lines = ["| op | provider | inputs | wall s p50 (p20–p80) | work s p50 (p20–p80) | GB/s input (work) "
             "| peak RSS GB | × floor-physical or -read (work) | × floor-python (work) | × floor-physical (wall) "
             "| vs mergekit (wall) | others' CPU |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in quiet:
        ratios, merge = x.get("ratios", {}), x["op"] == "cores"  # cores: against its read pass only
        lines.append(
            f"| {x['op']} | {x['provider']} | {x['inputs']} | {_spread(x['wall_s'], x)} | {_spread(x['work_s'])} | "
            f"{_f(x['gbps_input_work'] and x['gbps_input_work']['p50'])} | {x['peak_rss_bytes'] / 1e9:.2f} | "
            f"{_x(_floor_ratio(x))} | {_x(None if merge else ratios.get('floor-python', {}).get('work'))} | "
            f"{_x(None if merge else ratios.get('floor-physical', {}).get('wall'))} | "
            f"{_x(x.get('speedup_vs_mergekit_wall'), '.1f')} | "
            f"{x['others_cpu_share_p50'] * 100:.0f}% |")
    return lines


def _md_busy(r: dict) -> list[str]:
    """The runs beside competing processes, if any."""
    busy, lines = r.get("busy", {}), []
    busy_rows = [x for x in r["rows"] if x.get("condition", "quiet") != "quiet"]
    if busy_rows:
        lines += ["", f"With {busy['competitors']} competing CPU-bound processes (`python -S -c` of a pure-Python "
                  f"busy loop, not pinned, started before and killed after each round; {busy['repeat']} "
                  f"round{'s' if busy['repeat'] != 1 else ''}; mergekit not run):", "",
                  "| op | provider | wall s p50 (p20–p80) | work s p50 (p20–p80) | busy/quiet (wall) "
                  "| busy/quiet (work) | × floor-physical or -read (work) | peak RSS GB | others' CPU "
                  "| competitors' CPU |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for x in busy_rows:
            slow = {} if x.get("timed_out_runs") else x.get("slowdown_vs_quiet", {})  # killed: not measured
            lines.append(f"| {x['op']} | {x['provider']} | {_spread(x['wall_s'], x)} | {_spread(x['work_s'])} | "
                         f"{_x(slow.get('wall'))} | {_x(slow.get('work'))} | {_x(_floor_ratio(x))} | "
                         f"{x['peak_rss_bytes'] / 1e9:.2f} | {x['others_cpu_share_p50'] * 100:.0f}% | "
                         f"{x['competitors_cpu_share_p50'] * 100:.0f}% |")
    return lines


def _md_compile(r: dict) -> list[str]:
    """The fused kernels' cold compile, if measured."""
    lines: list[str] = []
    if r.get("compile"):
        lines += ["", "Cold compile of the fused kernels (one run each with an empty numba cache, before the warm "
                  "runs, which reuse the cache it fills):", "",
                  "| op | provider | cold wall s | cold work s | warm work s (p50) | compile s (cold − warm work) "
                  "| cold wall / cpift-torch wall |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {c['op']} | {c['provider']} | {c['cold_wall_s']:.2f} | {_f(c['cold_work_s'])} | "
                  f"{_f(c['warm_work_s_p50'])} | {_f(c['compile_s'])} | {_x(c['cold_wall_vs_torch_wall'])} |"
                  for c in r["compile"]]
    return lines


def _md_parity(r: dict) -> list[str]:
    """SLERP parity with mergekit, if both ran."""
    lines: list[str] = []
    p = r.get("slerp_parity_vs_mergekit")
    if p:
        lines += ["", f"SLERP parity ({p.get('cpift', 'cpift')}) with {r['mergekit']}: "
                  f"{p['identical_fraction'] * 100:.3f}% of "
                  f"{p['entries']:,} entries bit-identical, {p['within_1_ulp_fraction'] * 100:.4f}% within one "
                  f"bf16 ulp of the entry; largest difference {p['max_diff_in_ulps_of_tensor_scale']:.2f} bf16 ulp "
                  f"of its tensor's largest |value|."]
    return lines


def _md_cold(r: dict) -> list[str]:
    """The cold page cache runs, or why there are none when they were asked for."""
    lines: list[str] = []
    cold = [x for x in r["rows"] if "cold_wall_s" in x]
    if cold:
        disk = {(x["input_bytes"], x["condition"]): x["cold_wall_s"] for x in cold
                if x["provider"].startswith("floor-disk-")}
        lines += ["", "Cold page cache (the inputs evicted with posix_fadvise DONTNEED per file before each "
                  "command, one run each; the disk floor reads every input byte with O_DIRECT and writes one "
                  "model; busy: beside the competing processes, against the disk floor measured beside them):",
                  "", "| op | provider | condition | wall s | GB/s input | × disk floor | busy/quiet |",
                  "|---|---|---|---|---|---|---|"]
        for x in cold:
            floor = disk.get((x["input_bytes"], x["condition"]))
            lines.append(f"| {x['op']} | {x['provider']} | {x['condition']} | {x['cold_wall_s']:.2f} | "
                         f"{x['input_bytes'] / x['cold_wall_s'] / 1e9:.2f} | "
                         f"{_x(x['cold_wall_s'] / floor) if floor else '-'} | "
                         f"{_x(x['cold_slowdown_vs_quiet']) if x.get('cold_slowdown_vs_quiet') else '-'} |")
    elif r.get("cold_cache") != NOT_ASKED:  # asked for and skipped: say why; not asked: say nothing
        lines += ["", f"Cold page cache: {r['cold_cache']}"]
    return lines


_COLORS = {"floor": "#999999", "cpift-torch": "#ff7f0e", "cpift-cpu": "#1f77b4", "mergekit": "#d62728"}


def plot(r: dict, path: str | os.PathLike) -> Path:
    """Wall seconds per case, quiet and busy (median, p20–p80 whiskers), and each cpift case's work
    against its floor's, into a PNG.

    Raises:
        ParameterError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ParameterError("--plot: needs matplotlib (pip install 'cpift[plot]')") from None
    quiet = [x for x in r["rows"] if x.get("condition", "quiet") == "quiet"]
    busy = {(x["op"], x["provider"], x["inputs"]): x for x in r["rows"] if x.get("condition", "quiet") != "quiet"}
    color = [_COLORS.get(x["provider"], _COLORS.get(x["provider"].split("-")[0], "#999999")) for x in quiet]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(7.0, 0.8 * len(quiet) + 2), 8.5),
                                  gridspec_kw={"height_ratios": [3, 2]})
    _wall_bars(ax, r, quiet, busy, color)
    _floor_bars(ax2, quiet)
    fig.tight_layout()
    return write_png(fig, path, dpi=110)


def _wall_bars(ax, r: dict, quiet: list[dict], busy: dict, color: list[str]) -> None:
    """The top panel: wall seconds per case, quiet and (hatched) busy, with the legend and title."""
    width = 0.4 if busy else 0.8
    for k, rows in enumerate([quiet, [busy.get((x["op"], x["provider"], x["inputs"])) for x in quiet]]):
        xs = [i + (k - 0.5) * width if busy else i for i in range(len(quiet)) if rows[i] is not None]
        have = [x for x in rows if x is not None]
        if not have:
            continue
        p50 = [x["wall_s"]["p50"] for x in have]
        err = [[x["wall_s"]["p50"] - x["wall_s"]["p20"] for x in have],
               [x["wall_s"]["p80"] - x["wall_s"]["p50"] for x in have]]
        ax.bar(xs, p50, width, yerr=err, capsize=2, hatch="//" if k else None, edgecolor="white" if k else None,
               color=[color[i] for i in range(len(quiet)) if rows[i] is not None])
        for xpos, v in zip(xs, p50):
            ax.text(xpos, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    from matplotlib.patches import Patch

    seen = dict.fromkeys(_COLORS.get(x["provider"], _COLORS.get(x["provider"].split("-")[0])) for x in quiet)
    names = {v: k for k, v in _COLORS.items()}
    ax.legend(handles=[Patch(color=c, label=names.get(c, "other")) for c in seen if c], fontsize=7, loc="upper left")
    labels = [f"{x['op']}\n{x['provider']}" for x in quiet]
    ax.set_xticks(range(len(quiet)), labels, fontsize=7, rotation=90)
    ax.set_ylabel("wall s (median, p20–p80)")
    gb = max(r["model_bytes"].values()) / 1e9
    ax.set_title(f"Merging {gb:.2f} GB {r.get('dtype', '')} models, {r['machine']['cpus']} CPUs "
                 f"({r['machine'].get('cpu_model', '')}), warm cache,\n"
                 + (f"plain: quiet, hatched: {busy and r['busy']['competitors']} competing processes " if busy else "")
                 + f"({r['date'][:16]})", fontsize=9)


def _floor_bars(ax2, quiet: list[dict]) -> None:
    """The bottom panel: each cpift case's work against its floor's."""
    cp = [x for x in quiet if x["provider"].startswith("cpift") and _floor_ratio(x)]
    ax2.bar(range(len(cp)), [_floor_ratio(x) for x in cp], color=[_COLORS.get(x["provider"], "#1f77b4") for x in cp])
    for i, x in enumerate(cp):
        ax2.text(i, _floor_ratio(x), f"{_floor_ratio(x):.1f}×", ha="center", va="bottom", fontsize=7)
    ax2.set_xticks(range(len(cp)), [f"{x['op']}\n{x['provider']}" for x in cp], fontsize=7, rotation=90)
    ax2.set_ylabel("work / floor work (physical;\ncores: read pass), quiet")
    ax2.axhline(1.0, color="#999999", lw=0.8)
