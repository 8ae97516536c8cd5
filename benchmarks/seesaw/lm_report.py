"""Aggregate the SmolLM2 runs into seesaw-smollm2.json, .md and PNGs: the task check, the gate, Table 1
(methods), the protocol ablations and Table 2 (forgetting).

Normalized score of a method on a task = (EM − base EM) / (probe EM − base EM), capped at 1, beside the
raw EMs; a task whose probe gains less than MIN_GAIN over the base in a seed has no normalized score
in that seed (a ratio over a near-zero gain measures noise). Spreads: sample standard deviation over
seeds (0 with one seed); ``se``: the binomial standard error of one EM, √(EM(1 − EM)/n), the eval
sampling noise that one seed cannot average away.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

from report import load_json as _load
from report import mean_std as _ms

METHODS = ("full-sft", "multistage-random", "multistage-heuristic", "cpi-ft", "task-arithmetic", "ties")
MIN_GAIN = 0.05
BASE_MAX, PROBE_MIN = 0.20, 0.40  # a task has signal: the base at most 20% EM, a probe at least 40%


def save(fig, path: Path) -> None:
    """Write a chart atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _se(em: float, n: int) -> float:
    return math.sqrt(em * (1 - em) / n) if n else 0.0


def norm(em: float, base: float, probe: float) -> float | None:
    gain = probe - base
    return None if gain < MIN_GAIN else min(1.0, (em - base) / gain)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpus": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def _scores(rep: dict, tasks: list[str], base: dict, probe: dict) -> dict:
    per = {}
    for t in tasks:
        em, n = rep[t]["exact_match"], rep[t]["n"]
        per[t] = {"exact_match": em, "se": _se(em, n), "normalized": norm(em, base[t]["exact_match"],
                                                                         probe[t]["exact_match"])}
    vals = [v["normalized"] for v in per.values() if v["normalized"] is not None]
    return {"per_task": per, "mean_normalized": statistics.fmean(vals) if vals else None,
            "mean_em": statistics.fmean(v["exact_match"] for v in per.values())}


def _over_seeds(runs: list[dict], tasks: list[str]) -> dict:
    out = {"per_task": {}, "seeds": len(runs)}
    for t in tasks:
        ems = [r["per_task"][t]["exact_match"] for r in runs]
        ns = [r["per_task"][t]["normalized"] for r in runs if r["per_task"][t]["normalized"] is not None]
        out["per_task"][t] = {"exact_match": _ms(ems), "se": statistics.fmean(r["per_task"][t]["se"] for r in runs),
                              "normalized": _ms(ns) if ns else None}
    means = [r["mean_normalized"] for r in runs if r["mean_normalized"] is not None]
    out["mean_normalized"] = _ms(means) if means else None
    out["mean_em"] = _ms([r["mean_em"] for r in runs])
    return out


def aggregate(work: Path, *, scale: str, cfg: dict, tasks: list[str], base: str, timing: dict,
              variants: list[str], wall: float) -> dict:
    seeds = cfg["seeds"]
    base_eval = _load(work / "base_eval.json")
    probes = {s: _load(work / f"s{s}" / "probe_eval.json") for s in seeds}
    res = {"benchmark": "seesaw-smollm2", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": machine(), "scale": scale, "base": base, "settings": cfg, "timing": timing,
           "wall_seconds": round(wall, 1), "seeds": seeds, "tasks": tasks,
           "normalization": "(EM - base EM) / (probe EM - base EM), capped at 1; "
                            f"none where the probe gains < {MIN_GAIN}"}
    res["task_check"] = {t: {"base_em": base_eval[t]["exact_match"], "n": base_eval[t]["n"],
                             "probe_em": _ms([probes[s][t]["exact_match"] for s in seeds]),
                             "base_ok": base_eval[t]["exact_match"] <= BASE_MAX,
                             "probe_ok": min(probes[s][t]["exact_match"] for s in seeds) >= PROBE_MIN} for t in tasks}
    res["gate"] = {}
    for p in cfg["gate_p"]:
        g = {s: _load(work / f"s{s}" / "gate" / f"p{p:g}.json") for s in seeds}
        entry = {"gaussian_share": g[seeds[0]]["gaussian_share"], "random_jaccard": g[seeds[0]]["jaccard"]["random"],
                 "entries_by_kind": g[seeds[0]]["entries_by_kind"], "tasks": {}, "jaccard": {}}
        for t in tasks:
            rows = [g[s]["tasks"][t] for s in seeds]
            kinds = rows[0]["where"]
            entry["tasks"][t] = {
                "share_of_delta_sq": _ms([r["share_of_delta_sq"] for r in rows]),
                "core_only": _ms([r["core_only"]["exact_match"] for r in rows]),
                "without_core": _ms([r["without_core"]["exact_match"] for r in rows]),
                "probe": _ms([probes[s][t]["exact_match"] for s in seeds]), "base": base_eval[t]["exact_match"],
                "delta_rel_norm": _ms([r["delta_rel_norm"] for r in rows]),
                "moved_1e-3": _ms([r["moved_1e-3"] for r in rows]),
                "where": {k: statistics.fmean(r["where"].get(k, 0.0) for r in rows) for k in kinds}}
        names = g[seeds[0]]["jaccard"]["tasks"]
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                entry["jaccard"][f"{names[i]}|{names[j]}"] = _ms([g[s]["jaccard"]["matrix"][i][j] for s in seeds])
        res["gate"][f"{p:g}"] = entry

    def method(folder: str) -> dict:
        runs, steps, secs = [], [], []
        for s in seeds:
            rep = _load(work / f"s{s}" / folder / "report.json")
            runs.append(_scores(rep["tasks"], tasks, base_eval, probes[s]))
            steps.append(rep["optimizer_steps"])
            secs.append(rep["wall_seconds"])
        return {**_over_seeds(runs, tasks), "optimizer_steps": max(steps), "wall_seconds": _ms(secs)}

    res["methods"] = {m: method(m) for m in METHODS}
    res["ablations"] = {"main (omega 1/(k+1), mixed calibration)": res["methods"]["cpi-ft"]}
    res["ablations"].update({v: method(f"var-{v}") for v in variants})
    res["forgetting"] = forgetting(work, seeds)
    return res


def forgetting(work: Path, seeds: list[int]) -> dict:
    runs = [_load(work / f"s{s}" / "forget" / "forgetting.json") for s in seeds]
    a, b = runs[0]["A"], runs[0]["B"]
    out = {"A": a, "B": b, "after_A": {t: _ms([r["after_A"][t]["exact_match"] for r in runs]) for t in (a, b)},
           "methods": {}}
    for m in runs[0]["methods"]:
        drops = [r["after_A"][a]["exact_match"] - r["methods"][m][a]["exact_match"] for r in runs]
        gains = [r["methods"][m][b]["exact_match"] - r["after_A"][b]["exact_match"] for r in runs]
        out["methods"][m] = {"A": _ms([r["methods"][m][a]["exact_match"] for r in runs]),
                             "B": _ms([r["methods"][m][b]["exact_match"] for r in runs]),
                             "drop_A": _ms(drops), "gain_B": _ms(gains)}
    seq = out["methods"]["full-sft"]["drop_A"]["mean"]
    for m, v in out["methods"].items():  # share of sequential SFT's drop on A that the method removes
        v["forgetting_removed"] = None if seq <= 0 else 1 - v["drop_A"]["mean"] / seq
    return out


def _f(d, digits: int = 3) -> str:
    if d is None:
        return "–"
    if isinstance(d, dict):
        return f"{d['mean']:.{digits}f}" + (f" ± {d['std']:.{digits}f}" if d.get("n", 1) > 1 else "")
    return f"{d:.{digits}f}"


def markdown(r: dict) -> str:
    tasks, mc = r["tasks"], r["machine"]
    lines = [f"# CPI-FT on SmolLM2-135M-Instruct ({r['scale']} scale)", "",
             f"{r['date']}; {mc['cpu']} ({mc['cpus']} CPUs){', ' + mc['gpu'] if mc['gpu'] else ''}; "
             f"torch {mc['torch']}; "
             f"wall {r['wall_seconds'] / 60:.1f} min; seeds {r['seeds']}; base `{Path(r['base']).name}`.", "",
             f"Timed probe: {r['timing']['seconds_per_step']:.2f} s per SFT step ({r['timing']['tokens_per_step']:.0f} "
             f"tokens), {r['timing']['eval_seconds']:.1f} s per eval. Settings: " +
             ", ".join(f"{k} {r['settings'][k]}" for k in ("n_train", "n_eval", "batch", "lr", "probe_steps",
                                                           "steps_per_task", "cal_steps", "cal_examples")) + ".", "",
             "## Tasks: signal check", "", "| task | base EM | probe EM | base ≤ 20% | probe ≥ 40% |",
             "|---|---:|---:|---|---|"]
    for t, c in r["task_check"].items():
        lines.append(f"| {t} | {c['base_em']:.3f} | {_f(c['probe_em'])} | {'yes' if c['base_ok'] else 'NO'} | "
                     f"{'yes' if c['probe_ok'] else 'NO'} |")
    lines += ["", "## The localization gate (the premise)", "",
              "Core = top p% of |θ_probe − θ_base| over the whole model. *core only*: the base with the probe's core "
              "entries; *without core*: the probe with its core reset to the base; EM on the probe's own task.", "",
              "| p % | task | share of ‖δ‖² in core (Gaussian) | core only EM | without core EM | probe EM | base EM |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for p, g in r["gate"].items():
        for t in tasks:
            x = g["tasks"][t]
            lines.append(f"| {p} | {t} | {_f(x['share_of_delta_sq'])} ({g['gaussian_share']:.3f}) | "
                         f"{_f(x['core_only'])} | "
                         f"{_f(x['without_core'])} | {_f(x['probe'])} | {x['base']:.3f} |")
    p1 = r["gate"].get("1") or next(iter(r["gate"].values()))
    kinds = list(p1["entries_by_kind"])
    total = sum(p1["entries_by_kind"].values())
    lines += ["", "Where the core lies (share of the core by kind; the kind's share of all entries in the header):", "",
              "| p % | task | " + " | ".join(f"{k} ({p1['entries_by_kind'][k] / total:.1%})" for k in kinds) + " |",
              "|---:|---|" + "---:|" * len(kinds)]
    for p, g in r["gate"].items():
        for t in tasks:
            lines.append(f"| {p} | {t} | "
                         + " | ".join(f"{g['tasks'][t]['where'].get(k, 0):.1%}" for k in kinds) + " |")
    lines += ["", "Pairwise Jaccard of the cores against two random sets of the same size (p/(200 − p)):", "",
              "| p % | pair | Jaccard | random |", "|---:|---|---:|---:|"]
    for p, g in r["gate"].items():
        lines += [f"| {p} | {k} | {_f(v, 4)} | {g['random_jaccard']:.4f} |" for k, v in g["jaccard"].items()]
    d = {t: p1["tasks"][t] for t in tasks}
    lines += ["", "Update density: " + "; ".join(f"{t}: ‖δ‖/‖θ0‖ {_f(v['delta_rel_norm'], 4)}, "
                                              f"{v['moved_1e-3']['mean']:.4%} of entries move > 1e-3"
                                              for t, v in d.items()),
              "", "## Table 1: methods on equal terms", "",
              "Raw EM (± binomial SE of the eval) and the normalized score (capped at 1) per task.", "",
              "| method | " + " | ".join(tasks) + " | mean normalized | mean EM | optimizer steps |",
              "|---|" + "---:|" * (len(tasks) + 3)]
    for m, v in r["methods"].items():
        cells = [f"{v['per_task'][t]['exact_match']['mean']:.3f} ± {v['per_task'][t]['se']:.3f} "
                 f"({_f(v['per_task'][t]['normalized'], 2)})" for t in tasks]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_f(v['mean_normalized'])} | {_f(v['mean_em'])} | "
                     f"{v['optimizer_steps']} |")
    lines += ["", "Optimizer steps of each method's whole run: CPI-FT's count its probes, staged backbone and "
              "calibration; task arithmetic and TIES merge the same probes (their steps are the probes').", "",
              "## Protocol ablations (CPI-FT)", "", "| variant | " + " | ".join(tasks) + " | mean normalized |",
              "|---|" + "---:|" * (len(tasks) + 1)]
    for k, v in r["ablations"].items():
        lines.append(f"| {k} | " + " | ".join(_f(v["per_task"][t]["exact_match"]) for t in tasks) +
                     f" | {_f(v['mean_normalized'])} |")
    fg = r["forgetting"]
    lines += ["", f"## Table 2: forgetting ({fg['A']} then {fg['B']})", "",
              f"After A alone: {fg['A']} {_f(fg['after_A'][fg['A']])}, {fg['B']} {_f(fg['after_A'][fg['B']])}. "
              "With two tasks, sequential full SFT and multi-stage SFT are the same run.", "",
              f"| method | {fg['A']} EM | {fg['B']} EM | drop on A | gain on B | forgetting removed |",
              "|---|---:|---:|---:|---:|---:|"]
    for m, v in fg["methods"].items():
        lines.append(f"| {m} | {_f(v['A'])} | {_f(v['B'])} | {_f(v['drop_A'])} | {_f(v['gain_B'])} | "
                     f"{_f(v['forgetting_removed'], 2)} |")
    return "\n".join(lines) + "\n"


def plots(r: dict, out: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = r["tasks"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(r["methods"])
    for i, (m, v) in enumerate(r["methods"].items()):
        ax.bar([j + i * width for j in range(len(tasks))], [v["per_task"][t]["exact_match"]["mean"] for t in tasks],
               width, yerr=[v["per_task"][t]["se"] for t in tasks], label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("exact match")
    ax.set_title(f"SmolLM2-135M: per-task EM by method ({r['scale']}, {r['date']})")
    ax.legend(fontsize=7, ncol=3)
    save(fig, out / f"{name}_tasks.png")
    fg = r["forgetting"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ms = list(fg["methods"])
    ax.bar([i - 0.2 for i in range(len(ms))], [fg["methods"][m]["drop_A"]["mean"] for m in ms], 0.4,
           label=f"drop on {fg['A']}")
    ax.bar([i + 0.2 for i in range(len(ms))], [fg["methods"][m]["gain_B"]["mean"] for m in ms], 0.4,
           label=f"gain on {fg['B']}")
    ax.set_xticks(range(len(ms)), ms)
    ax.set_ylabel("exact match")
    ax.set_title("forgetting: A then B")
    ax.legend(fontsize=8)
    save(fig, out / f"{name}_forgetting.png")
    fig, axes = plt.subplots(1, len(r["gate"]), figsize=(4 * len(r["gate"]), 3.5), squeeze=False)
    for ax, (p, g) in zip(axes[0], r["gate"].items()):
        for k, (key, label) in enumerate((("core_only", "core only"), ("without_core", "without core"),
                                          ("probe", "probe"))):
            ax.bar([j + k * 0.27 for j in range(len(tasks))], [g["tasks"][t][key]["mean"] for t in tasks], 0.27,
                   label=label)
        ax.set_xticks([j + 0.27 for j in range(len(tasks))], tasks)
        ax.set_title(f"p = {p}%")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("exact match on own task")
    axes[0][0].legend(fontsize=7)
    save(fig, out / f"{name}_gate.png")


def write(r: dict, out: Path, *, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(r, indent=2) + "\n"), (".md", markdown(r))):
        tmp = out / f".{name}{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / f"{name}{suffix}")
    plots(r, out, name)


def reaggregate(results: Path, work: Path) -> None:
    """Rebuild the JSON, markdown and charts from a finished WORK with the settings recorded in ``results``
    (after a change to this module; reruns nothing)."""
    old = json.loads(results.read_text())
    variants = [k for k in old["ablations"] if not k.startswith("main")]
    new = aggregate(work, scale=old["scale"], cfg=old["settings"], tasks=old["tasks"], base=old["base"],
                    timing=old["timing"], variants=variants, wall=old["wall_seconds"])
    new["date"] = old["date"]
    write(new, results.parent, name=results.stem)


if __name__ == "__main__":
    import sys

    reaggregate(Path(sys.argv[1]), Path(sys.argv[2]))

