"""Aggregate the seesaw runs into seesaw.json, seesaw.md (tables shaped like the paper's) and PNG charts.

Normalized score of a method on a task = its exact match / the exact match of that seed's single-task
probe on the task. A task whose probe scores below MIN_PROBE_EM in a seed is left out of that seed's
mean (a ratio over a near-zero denominator measures noise); the mean over tasks also comes in a
loss-based form, probe loss / method loss, defined for every task. Spreads are sample standard
deviations over seeds (0 with one seed).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

MIN_PROBE_EM = 0.05


def mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def normalized(scores: dict, probe: dict, tasks: list[str]) -> tuple[dict, float | None, float]:
    """Per-task EM ratios, their mean over the tasks the probe learned (None if none), mean loss ratio."""
    per = {t: scores[t]["exact_match"] / probe[t]["exact_match"] for t in tasks
           if probe[t]["exact_match"] >= MIN_PROBE_EM}
    mean = statistics.fmean(per.values()) if per else None
    by_loss = statistics.fmean(probe[t]["loss"] / scores[t]["loss"] for t in tasks)
    return per, mean, by_loss


def aggregate(work: Path, *, scale: str, seeds: list[int], tasks: list[str], methods, sensitivity: dict,
              forget_seeds: list[int], sens_seeds: list[int], cal_sweep: list[int], base: str,
              settings: dict) -> dict:
    probes = {s: load_json(work / f"s{s}" / "probe_eval.json") for s in seeds}
    out = {"scale": scale, "base": base, "settings": settings, "seeds": seeds, "tasks": tasks,
           "normalization": f"method EM / same-seed probe EM; tasks with probe EM < {MIN_PROBE_EM} are left out "
                            "of that seed's mean; mean_normalized_loss = mean of probe loss / method loss",
           "probes": {"per_task": {t: {"exact_match": mean_std([probes[s][t]["exact_match"] for s in seeds]),
                                       "loss": mean_std([probes[s][t]["loss"] for s in seeds])} for t in tasks}},
           "methods": {}}
    for m in methods:
        reps = {s: load_json(work / f"s{s}" / m / "report.json") for s in seeds}
        per_task, means, by_loss, left_out = {}, [], [], {}
        norms = {s: normalized(reps[s]["tasks"], probes[s], tasks) for s in seeds}
        for t in tasks:
            per_task[t] = {"exact_match": mean_std([reps[s]["tasks"][t]["exact_match"] for s in seeds]),
                           "loss": mean_std([reps[s]["tasks"][t]["loss"] for s in seeds])}
            ratios = [norms[s][0][t] for s in seeds if t in norms[s][0]]
            per_task[t]["normalized"] = mean_std(ratios) if ratios else None
        for s in seeds:
            if norms[s][1] is not None:
                means.append(norms[s][1])
            by_loss.append(norms[s][2])
            left_out[s] = [t for t in tasks if t not in norms[s][0]]
        out["methods"][m] = {"per_task": per_task, "mean_normalized": mean_std(means) if means else None,
                             "mean_normalized_loss": mean_std(by_loss), "tasks_left_out": left_out,
                             "stages": {s: reps[s]["stages"] for s in seeds},
                             "optimizer_steps": reps[seeds[0]]["optimizer_steps"],
                             "per_seed": {s: {"mean_normalized": norms[s][1], "tasks": reps[s]["tasks"]}
                                          for s in seeds}}
    phases = {s: load_json(p) for s in seeds if (p := work / f"s{s}" / "cpi_phases.json").exists()}
    if phases:
        ss = list(phases)
        out["cpi_phases"] = {"seeds": ss, "phases": {
            ph: {t: {"exact_match": mean_std([phases[s][ph][t]["exact_match"] for s in ss]),
                     "loss": mean_std([phases[s][ph][t]["loss"] for s in ss])} for t in tasks}
            for ph in phases[ss[0]]}}
    tr = {s: load_json(p) for s in seeds if (p := work / f"s{s}" / "core_transplant.json").exists()}
    if tr:
        ss = list(tr)
        out["core_transplant"] = {"seeds": ss, "p": {
            p: {t: {v: {"exact_match": mean_std([tr[s][p][t][v]["exact_match"] for s in ss if p in tr[s]]),
                        "loss": mean_std([tr[s][p][t][v]["loss"] for s in ss if p in tr[s]])}
                    for v in ("core_only", "without_core")} | {"where": tr[ss[0]][p][t]["where"]} for t in tasks}
            for p in tr[ss[0]]}}
    out["core_overlap"] = {s: load_json(work / f"s{s}" / "cpi-ft" / "cluster.json") for s in seeds}
    out["forgetting"] = _forgetting(work, forget_seeds)
    out["sensitivity"] = _sensitivity(work, sensitivity, probes, tasks, sens_seeds)
    out["calibration_budget"] = _calibration(work, cal_sweep, probes, tasks, seeds)
    return out


def _forgetting(work: Path, seeds: list[int]) -> dict:
    runs = {s: load_json(work / f"s{s}" / "forget" / "forgetting.json") for s in seeds}
    a, b = runs[seeds[0]]["A"], runs[seeds[0]]["B"]
    res = {"A": a, "B": b, "seeds": seeds,
           "definition": "drop on A = EM_A after training A − EM_A at the end (points); gain on B = EM_B at the "
                         "end − EM_B after training A", "methods": {}}
    for m in runs[seeds[0]]["methods"]:
        cols = {"A_after_A": [], "A_final": [], "drop_A": [], "B_after_A": [], "B_final": [], "gain_B": [],
                "A_loss_increase": []}
        for s in seeds:
            before, after = runs[s]["after_A"], runs[s]["methods"][m]
            cols["A_after_A"].append(100 * before[a]["exact_match"])
            cols["A_final"].append(100 * after[a]["exact_match"])
            cols["drop_A"].append(100 * (before[a]["exact_match"] - after[a]["exact_match"]))
            cols["B_after_A"].append(100 * before[b]["exact_match"])
            cols["B_final"].append(100 * after[b]["exact_match"])
            cols["gain_B"].append(100 * (after[b]["exact_match"] - before[b]["exact_match"]))
            cols["A_loss_increase"].append(after[a]["loss"] - before[a]["loss"])
        res["methods"][m] = {k: mean_std(v) for k, v in cols.items()}
    return res


def _sensitivity(work: Path, configs: dict, probes: dict, tasks: list[str], seeds: list[int]) -> dict:
    res = {"seeds": seeds, "runs": {}}
    for name, pt in configs.items():
        means, by_loss, jac, em, stages = [], [], [], {t: [] for t in tasks}, {}
        for s in seeds:
            wd = work / f"s{s}" / ("cpi-ft" if name == "main" else f"sens-{name}")
            rep, cl = load_json(wd / "report.json"), load_json(wd / "cluster.json")
            _, mean, loss = normalized(rep["tasks"], probes[s], tasks)
            if mean is not None:
                means.append(mean)
            by_loss.append(loss)
            n = len(cl["tasks"])
            off = [cl["jaccard"][i][j] for i in range(n) for j in range(n) if i < j]
            jac.append(statistics.fmean(off) if off else 0.0)
            for t in tasks:
                em[t].append(rep["tasks"][t]["exact_match"])
            stages[s] = rep["stages"]
        res["runs"][name] = {**pt, "mean_normalized": mean_std(means) if means else None,
                             "mean_normalized_loss": mean_std(by_loss), "mean_jaccard": mean_std(jac),
                             "exact_match": {t: mean_std(v) for t, v in em.items()}, "stages": stages}
    return res


def _calibration(work: Path, steps: list[int], probes: dict, tasks: list[str], seeds: list[int]) -> dict:
    """CPI-FT's final score against its calibration steps per task (the first entry is the main run)."""
    res = {"seeds": seeds, "runs": {}}
    for i, n in enumerate(steps):
        means, by_loss, em = [], [], {t: [] for t in tasks}
        for s in seeds:
            rep = load_json(work / f"s{s}" / ("cpi-ft" if i == 0 else f"calib-{n}") / "report.json")
            _, mean, loss = normalized(rep["tasks"], probes[s], tasks)
            if mean is not None:
                means.append(mean)
            by_loss.append(loss)
            for t in tasks:
                em[t].append(rep["tasks"][t]["exact_match"])
        res["runs"][str(n)] = {"steps_per_task": n, "mean_normalized": mean_std(means) if means else None,
                               "mean_normalized_loss": mean_std(by_loss),
                               "exact_match": {t: mean_std(v) for t, v in em.items()}}
    return res


def _pm(d: dict | None, scale: float = 1.0, fmt: str = ".1f") -> str:
    if d is None:
        return "n/a"
    return f"{scale * d['mean']:{fmt}} ± {scale * d['std']:{fmt}}"


def verdict(res: dict) -> list[str]:
    """Did CPI-FT beat each baseline by more than the seed spread (sum of the two standard deviations)?"""
    cpi = res["methods"]["cpi-ft"]["mean_normalized"]
    lines = []
    for m, v in res["methods"].items():
        if m == "cpi-ft" or v["mean_normalized"] is None or cpi is None:
            continue
        d, spread = cpi["mean"] - v["mean_normalized"]["mean"], cpi["std"] + v["mean_normalized"]["std"]
        word = ("beats" if d > spread else "loses to" if d < -spread else "is within the seed spread of")
        lines.append(f"- CPI-FT {word} {m}: {cpi['mean']:.3f} vs {v['mean_normalized']['mean']:.3f} "
                     f"(difference {d:+.3f}, spread {spread:.3f}).")
    f = res["forgetting"]["methods"]
    if "full-sft" in f and "cpi-ft" in f:
        full, cpi_d = f["full-sft"]["drop_A"]["mean"], f["cpi-ft"]["drop_A"]["mean"]
        frozen = f["cpi-frozen-core"]["drop_A"]["mean"]
        share = f" ({100 * (full - cpi_d) / full:.0f}% of it)" if full > 0 else ""
        lines.append(f"- Forgetting of {res['forgetting']['A']} after {res['forgetting']['B']}: full SFT drops "
                     f"{full:.1f} points, CPI-FT {cpi_d:.1f} (removes {full - cpi_d:.1f} points{share}); "
                     f"freezing A's core alone during B drops {frozen:.1f}.")
    return lines


def write(res: dict, out: Path, name: str = "seesaw") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    tasks, seeds = res["tasks"], res["seeds"]
    st = res["settings"]
    md = [f"# Seesaw benchmark ({res['scale']} scale"
          f"{', variant ' + name.removeprefix('seesaw-') if name != 'seesaw' else ''})", "",
          f"Base `{Path(res['base']).name}`; tasks {', '.join(tasks)} ({st['n_train']} train / {st['n_eval']} eval "
          f"each); seeds {seeds}; probe {st['probe_steps']} steps, main training {st['steps_per_task']} steps per "
          f"task, calibration {st['cal_steps']} steps per task on {st['cal_examples']} examples, batch "
          f"{st['batch']}, lr {st['lr']:g}. Mean ± sample std over seeds. Normalization: {res['normalization']}.",
          "", "## Table 1: exact match (%) per task and mean normalized score", "",
          "| method | " + " | ".join(tasks) + " | mean normalized (EM) | mean normalized (loss) | optimizer steps |",
          "|---|" + "---:|" * (len(tasks) + 3)]
    pr = res["probes"]["per_task"]
    md.append("| single-task probes | " + " | ".join(_pm(pr[t]["exact_match"], 100) for t in tasks) + " | 1 | 1 | |")
    for m, v in res["methods"].items():
        md.append(f"| {m} | " + " | ".join(_pm(v["per_task"][t]["exact_match"], 100) for t in tasks) +
                  f" | {_pm(v['mean_normalized'], 1, '.3f')} | {_pm(v['mean_normalized_loss'], 1, '.3f')} | "
                  f"{v['optimizer_steps']} |")
    left = sorted({t for v in res["methods"].values() for ts in v["tasks_left_out"].values() for t in ts})
    md += ["", f"Tasks left out of the EM-normalized mean in some seed (probe EM < 5%): {', '.join(left) or 'none'}.",
           "", "Response loss per task (mean ± std):", "",
           "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    md.append("| single-task probes | " + " | ".join(_pm(pr[t]["loss"], 1, ".3f") for t in tasks) + " |")
    for m, v in res["methods"].items():
        md.append(f"| {m} | " + " | ".join(_pm(v["per_task"][t]["loss"], 1, ".3f") for t in tasks) + " |")
    f = res["forgetting"]
    md += ["", f"## Table 2: forgetting, {f['A']} (A) then {f['B']} (B), seeds {f['seeds']}", "",
           f"{f['definition']}. With one task per stage, multi-stage SFT is the same schedule as sequential full "
           "SFT, so one row covers both; `cpi-frozen-core` is stage B with A's core frozen (before fusion), "
           "`cpi-ft` the whole pipeline (+ fuse + calibration).", "",
           "| method | A after A | A at end | drop on A | B after A | B at end | gain on B | A loss increase |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, v in f["methods"].items():
        md.append(f"| {m} | " + " | ".join(_pm(v[k]) for k in ("A_after_A", "A_final", "drop_A", "B_after_A",
                                                                   "B_final", "gain_B")) +
                  f" | {_pm(v['A_loss_increase'], 1, '.3f')} |")
    sv = res["sensitivity"]
    md += ["", f"## Sensitivity of CPI-FT (seeds {sv['seeds']}; one parameter moved at a time from p = 1, τ = 0.1)",
           "", "| run | p | τ | stages (seed 0) | mean Jaccard | mean normalized (EM) | mean normalized (loss) |",
           "|---|---:|---:|---|---:|---:|---:|"]
    for n, v in sv["runs"].items():
        stages = " → ".join("{" + ",".join(g) + "}" for g in v["stages"][sv["seeds"][0]])
        md.append(f"| {n} | {v['p']:g} | {v['tau']:g} | {stages} | {_pm(v['mean_jaccard'], 1, '.3f')} | "
                  f"{_pm(v['mean_normalized'], 1, '.3f')} | {_pm(v['mean_normalized_loss'], 1, '.3f')} |")
    cb = res["calibration_budget"]
    md += ["", f"## CPI-FT calibration budget (seeds {cb['seeds']}; everything before calibration shared)", "",
           "| calibration steps per task | " + " | ".join(tasks) + " | mean normalized (EM) | mean normalized (loss) |",
           "|---:|" + "---:|" * (len(tasks) + 2)]
    for n, v in cb["runs"].items():
        md.append(f"| {n} | " + " | ".join(_pm(v["exact_match"][t], 100) for t in tasks) +
                  f" | {_pm(v['mean_normalized'], 1, '.3f')} | {_pm(v['mean_normalized_loss'], 1, '.3f')} |")
    if "cpi_phases" in res:
        ph = res["cpi_phases"]
        md += ["", f"## CPI-FT phase by phase: exact match (%), seeds {ph['seeds']}", "",
               "`base`: the pre-trained model; `backbone`: after the staged SFT (earlier cores frozen); `fused`: "
               "cores transplanted from the probes, the rest SLERP-merged; `calibrated`: the final model.", "",
               "| phase | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        md.append("| single-task probes | " + " | ".join(_pm(pr[t]["exact_match"], 100) for t in tasks) + " |")
        for phase, per in ph["phases"].items():
            md.append(f"| {phase} | " + " | ".join(_pm(per[t]["exact_match"], 100) for t in tasks) + " |")
    if "core_transplant" in res:
        ct = res["core_transplant"]
        base_row = res.get("cpi_phases", {}).get("phases", {}).get("base")
        md += ["", "## Where a probe's skill lives: its core alone vs the probe without its core "
                   f"(seeds {ct['seeds']})",
               "", "Exact match (%) on the probe's own task. `core only`: the base with the probe's core entries "
               "transplanted (the rest at the base); `without core`: the probe with its core entries reset to the "
               "base. If the core held the skill, `core only` would approach the probe and `without core` the base.",
               "", "| p | model | " + " | ".join(tasks) + " |", "|---:|---|" + "---:|" * len(tasks)]
        md.append("| | single-task probe | " + " | ".join(_pm(pr[t]["exact_match"], 100) for t in tasks) + " |")
        if base_row:
            md.append("| | base | " + " | ".join(_pm(base_row[t]["exact_match"], 100) for t in tasks) + " |")
        for p, per in ct["p"].items():
            for v in ("core_only", "without_core"):
                md.append(f"| {p} | {v.replace('_', ' ')} | " +
                          " | ".join(_pm(per[t][v]["exact_match"], 100) for t in tasks) + " |")
        kinds = sorted({k for t in tasks for k in ct["p"]["1"][t]["where"]})
        md += ["", f"Where the p = 1 cores lie (share of the core's entries by tensor kind, seed {ct['seeds'][0]}):",
               "", "| task | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
        for t in tasks:
            w = ct["p"]["1"][t]["where"]
            md.append(f"| {t} | " + " | ".join(f"{100 * w.get(k, 0):.0f}%" for k in kinds) + " |")
    md += ["", "## Core overlap (Jaccard, p = 1, seed 0)", ""]
    cl = res["core_overlap"][seeds[0]]
    md += ["| | " + " | ".join(cl["tasks"]) + " |", "|---|" + "---:|" * len(cl["tasks"])]
    md += [f"| {t} | " + " | ".join(f"{x:.3f}" for x in row) + " |" for t, row in zip(cl["tasks"], cl["jaccard"])]
    md += ["", "## Verdict (computed)", "", *verdict(res), "",
           f"![per-task exact match]({name}_tasks.png)", "", f"![forgetting]({name}_forgetting.png)", ""]
    notes = Path(__file__).with_name(f"analysis_{res['scale']}{name.removeprefix('seesaw')}.md")
    if notes.exists():
        md += [notes.read_text()]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    charts(res, out, name)


def charts(res: dict, out: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = res["tasks"]
    rows = {"probes": res["probes"]["per_task"], **{m: v["per_task"] for m, v in res["methods"].items()}}
    fig, ax = plt.subplots(figsize=(10, 4))
    w = 0.8 / len(rows)
    for i, (m, per) in enumerate(rows.items()):
        xs = [j + (i - len(rows) / 2 + 0.5) * w for j in range(len(tasks))]
        ax.bar(xs, [100 * per[t]["exact_match"]["mean"] for t in tasks], w, label=m,
               yerr=[100 * per[t]["exact_match"]["std"] for t in tasks], capsize=2)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("exact match (%)")
    ax.set_title(f"Seesaw ({res['scale']}): per-task exact match, mean ± std over seeds {res['seeds']}")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out / f"{name}_tasks.png", dpi=110)
    plt.close(fig)

    f = res["forgetting"]
    ms = list(f["methods"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (key, label) in enumerate([("drop_A", f"drop on A ({f['A']})"), ("gain_B", f"gain on B ({f['B']})")]):
        ax.bar([j + (i - 0.5) * 0.38 for j in range(len(ms))], [f["methods"][m][key]["mean"] for m in ms], 0.38,
               yerr=[f["methods"][m][key]["std"] for m in ms], capsize=3, label=label)
    ax.set_xticks(range(len(ms)), ms)
    ax.set_ylabel("exact-match points")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title("Sequential A → B: forgetting and gain")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{name}_forgetting.png", dpi=110)
    plt.close(fig)
