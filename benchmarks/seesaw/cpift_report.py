"""Aggregation of the CPI-FT seesaw benchmark (issue 25): the gate, per-task scores, paired differences
against Full SFT with bootstrap intervals over items and seeds, uncapped normalized scores, power.

A paired difference uses only the seeds both methods finished. The bootstrap resamples seeds and, within
each task, test items (the same items for both methods), 2000 times; the 95% interval is the 2.5–97.5
percentiles; it is conservative (resampling seeds counts item noise again: about √2 × the item-only
standard error when seeds agree). Power: the smallest difference detectable at α = 0.05 with 80% power is 2.8 × the
bootstrap standard error of the difference.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import cpift_forget
import jobs
import numpy as np

METHODS = ["full-sft", "cpi-ft", "cpi-ft-omega-val", "multistage-random", "multistage-heuristic", "replay",
           "random-core", "lota", "task-arithmetic", "ties", "phase-staged", "phase-fused"]
LABELS = {"full-sft": "Full SFT", "cpi-ft": "CPI-FT (as specified)", "cpi-ft-omega-val": "CPI-FT, ω on validation",
          "multistage-random": "Multistage random", "multistage-heuristic": "Multistage heuristic",
          "replay": "Replay control (Full SFT + calibration)", "random-core": "Random-core control",
          "lota": "LoTA-style (core only)", "task-arithmetic": "Task arithmetic", "ties": "TIES",
          "phase-staged": "CPI-FT phase: staged", "phase-fused": "CPI-FT phase: fused"}
B, GATE_DROP = 2000, 0.10


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _last_write(work: Path) -> float:
    """When the newest score was written (the run's wall time ends there, whenever the report is made)."""
    return max([p.stat().st_mtime for p in work.glob("**/scores/*.json")] or [time.time()])


def choose_lr(work: Path, cfg: dict) -> float:
    """The grid's lr with the best mean validation EM of the seed-0 probes and Full SFT together."""
    best, key = None, -1.0
    for lr in cfg["lrs"]:
        sd = work / f"lr{lr:g}" / "s0" / "scores"
        full = _load(sd / "full-sft.val.json")
        probes = [_load(sd / f"probe-{t}.val.json") for t in cfg["tasks"]]
        if full is None or None in probes:
            continue
        m = np.mean([full[t]["exact_match"] for t in cfg["tasks"]] + [p[t]["exact_match"] for p, t in
                                                                        zip(probes, cfg["tasks"])])
        if m > key:
            best, key = lr, m
    if best is None:
        raise SystemExit("lr grid: no lr finished its probes and Full SFT")
    return best


def scores(sd: Path, method: str, task: str, split: str = "test") -> np.ndarray | None:
    name = f"probe-{task}" if method == "probe" else method
    s = _load(sd / "scores" / f"{name}.{split}.json")
    return np.array(s[task]["hits"], dtype=float) if s and task in s else None


def paired(a: dict[int, dict[str, np.ndarray]], b: dict[int, dict[str, np.ndarray]], tasks: list[str],
           seed: int = 0) -> dict | None:
    """Mean of a − b over the common seeds, per task and over tasks, with bootstrap intervals."""
    seeds = sorted(s for s in a if s in b and all(t in a[s] and t in b[s] for t in tasks))
    if not seeds:
        return None
    rng = np.random.default_rng(seed)
    d = {t: np.stack([a[s][t] - b[s][t] for s in seeds]) for t in tasks}  # seeds × items
    boot = {t: np.empty(B) for t in tasks}
    for i in range(B):
        ks = rng.integers(len(seeds), size=len(seeds))
        for t in tasks:
            boot[t][i] = d[t][ks][:, rng.integers(d[t].shape[1], size=d[t].shape[1])].mean()
    mean_boot = np.mean([boot[t] for t in tasks], axis=0)

    def summary(x: float, bt: np.ndarray) -> dict:
        lo, hi = np.percentile(bt, [2.5, 97.5])
        return {"diff": float(x), "ci": [float(lo), float(hi)], "se": float(bt.std()), "mdd": float(2.8 * bt.std())}

    out = {"seeds": seeds, "tasks": {t: summary(d[t].mean(), boot[t]) for t in tasks}}
    out["mean"] = summary(float(np.mean([d[t].mean() for t in tasks])), mean_boot)
    return out


def aggregate(work: Path, *, cfg: dict, scale: str, base: str) -> dict:
    tasks = cfg["tasks"]
    lr_file = _load(work / "lr.json")
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "scale": scale,
                 "machine": f"{platform.machine()}, {jobs.device()}, {platform.processor() or platform.system()}",
                 "base": base, "tasks": tasks, "settings": {k: v for k, v in cfg.items() if k != "wall_start"},
                 "wall_minutes": (_last_write(work) - cfg["wall_start"]) / 60,
                 "budget_note": cfg.get("budget_note", "")}
    res["lr_grid"] = {}
    for lr in cfg["lrs"]:
        sd = work / f"lr{lr:g}" / "s0" / "scores"
        full, probes = _load(sd / "full-sft.val.json"), {t: _load(sd / f"probe-{t}.val.json") for t in tasks}
        res["lr_grid"][f"{lr:g}"] = {"full-sft": {t: full[t]["exact_match"] for t in tasks} if full else None,
                                     "probes": {t: p[t]["exact_match"] for t, p in probes.items() if p}}
    if not lr_file:
        return res
    lr = lr_file["lr"]
    res["lr"] = lr
    root = work / f"lr{lr:g}"
    base_test = _load(work / "scores" / "base.test.json") or {}
    res["base_em"] = {t: base_test[t]["exact_match"] for t in base_test}
    hits: dict[str, dict[int, dict]] = {}
    for m in ["probe", *METHODS]:
        hits[m] = {}
        for s in cfg["seeds"]:
            row = {t: h for t in tasks if (h := scores(root / f"s{s}", m, t)) is not None}
            if row:
                hits[m][s] = row
    res["seeds_done"] = {m: sorted(s for s, r in hits[m].items() if len(r) == len(tasks)) for m in hits}
    res["gate"] = gate(root, hits, cfg)
    res["em"] = {m: {t: _mean_em(hits[m], t) for t in tasks} for m in hits if hits[m]}
    res["normalized"] = {m: normalized(res["em"][m], res["em"].get("probe", {}), res["base_em"])
                         for m in res["em"]}
    res["vs_full_sft"] = {m: paired(hits[m], hits["full-sft"], tasks) for m in METHODS[1:] if hits[m]}
    res["vs_cpi_ft"] = {m: paired(hits["cpi-ft"], hits[m], tasks) for m in
                        ("multistage-random", "multistage-heuristic", "replay", "random-core") if hits[m]}
    res["em_ci"] = {m: paired(hits[m], {s: {t: 0 * h for t, h in r.items()} for s, r in hits[m].items()}, tasks)
                    for m in hits if res["seeds_done"].get(m)}  # EM with its interval: paired against zeros
    res["forgetting"] = cpift_forget.table(root, cfg["seeds"], cfg["forget"], paired) if "forget" in cfg else {}
    res["omega_chosen"] = {s: (_load(root / f"s{s}" / "scores" / "cpi-ft-omega-val.test.json") or {}).get("_chosen")
                           for s in cfg["seeds"]}
    return res


def _mean_em(by_seed: dict, task: str) -> float | None:
    xs = [r[task].mean() for r in by_seed.values() if task in r]
    return float(np.mean(xs)) if xs else None


def normalized(em: dict, probe: dict, base: dict) -> dict:
    """(EM − base) / (probe − base) per task, uncapped, and its mean (None where undefined)."""
    out = {}
    for t, v in em.items():
        p, b = probe.get(t), base.get(t)
        out[t] = None if v is None or p is None or b is None or p - b <= 0 else (v - b) / (p - b)
    vals = [v for v in out.values() if v is not None]
    return {**out, "mean": float(np.mean(vals)) if len(vals) == len(out) else None}


def gate(root: Path, hits: dict, cfg: dict) -> dict:
    """Full SFT − probe per task: passes when the drop is ≥ 0.10 and the 95% interval excludes 0."""
    d = paired(hits["full-sft"], hits["probe"], cfg["tasks"])
    if d is None:
        return {}
    out = {"seeds": d["seeds"], "tasks": {}}
    for t, x in d["tasks"].items():
        em = {m: float(np.mean([hits[m][s][t].mean() for s in d["seeds"]])) for m in ("probe", "full-sft")}
        out["tasks"][t] = {**x, "probe_em": em["probe"], "full_sft_em": em["full-sft"],
                           "passes": x["diff"] <= -GATE_DROP and x["ci"][1] < 0}
    for t in cfg["tasks"]:
        cross = {}
        for m, name in (("full-sft", "full-sft"), ("probe", f"probe-{t}")):
            xs = [(_load(root / f"s{s}" / "scores" / f"{name}.cross.json") or {}).get(t) for s in d["seeds"]]
            xs = [x for x in xs if x]
            if xs:
                cross[m] = float(np.mean([x["exact_match"] for x in xs]))
                cross["seeds"] = len(xs)
        if cross:
            out["tasks"][t]["cross_talk"] = cross
    return out


def _fmt(x: float | None, signed: bool = False) -> str:
    return "n/a" if x is None else (f"{x:+.3f}" if signed else f"{x:.3f}")


def _cross(ct: dict | None) -> str:
    return f"{_fmt(ct.get('probe'))} / {_fmt(ct.get('full-sft'))} ({ct['seeds']} seed)" if ct else ""


def _diff(x: dict) -> str:
    return f"{x['diff']:+.3f} [{x['ci'][0]:+.3f}, {x['ci'][1]:+.3f}]"


def markdown(res: dict) -> str:
    tasks = res["tasks"]
    s = res["settings"]
    md = [f"# CPI-FT seesaw benchmark ({res['scale']}): SmolLM2-135M-Instruct, tasks that interfere", "",
          f"{res['date']}; {res['machine']}; base `{res['base']}`.", "",
          f"Settings: tasks {', '.join(tasks)}; seeds {s['seeds']}; {s['n_train']} training rows, "
          f"{s['n_val']} validation and {s['n_test']} test items per task; batch {s['batch']}; "
          f"S = {s.get('S')} steps per task (probe S, staged methods N × S), calibration {s.get('C')} per task; "
          f"lr grid {s['lrs']} (chosen on validation: {res.get('lr')}); teacher-forced exact match per item; "
          f"float32 intermediate models. Wall time so far: {res['wall_minutes']:.0f} min. {res['budget_note']}", ""]
    md += ["## lr grid (seed 0, validation EM)", "", "| lr | Full SFT mean | probes mean |", "|---|---:|---:|"]
    for lr, g in res["lr_grid"].items():
        f = np.mean(list(g["full-sft"].values())) if g["full-sft"] else None
        p = np.mean(list(g["probes"].values())) if len(g["probes"]) == len(tasks) else None
        md.append(f"| {lr} | {_fmt(f)} | {_fmt(p)} |")
    g = res.get("gate") or {}
    md += ["", "## The seesaw gate (test split)", ""]
    if g:
        md += [f"Seeds {g['seeds']}. Passes when Full SFT − probe ≤ −0.10 and the 95% interval excludes 0.", "",
               "| task | base | probe | Full SFT | Full SFT − probe [95% CI] | detectable | passes | cross-talk "
               "(probe / Full SFT) |", "|---|---:|---:|---:|---|---:|---|---|"]
        for t, x in g["tasks"].items():
            ct = x.get("cross_talk")
            md.append(f"| {t} | {_fmt(res['base_em'].get(t))} | {_fmt(x['probe_em'])} | "
                      f"{_fmt(x['full_sft_em'])} | {_diff(x)} | {x['mdd']:.3f} | "
                      f"{'**yes**' if x['passes'] else 'no'} | "
                      f"{_cross(ct)} |")
    else:
        md.append("Not finished.")
    md += ["", "## Methods (test EM, mean over finished seeds; normalized = (EM − base)/(probe − base), uncapped)",
           "", "| method | seeds | " + " | ".join(tasks) + " | mean EM | normalized |",
           "|---|---|" + "---:|" * (len(tasks) + 2)]
    for m in ["probe", *METHODS]:
        if m in res["em"]:
            em = res["em"][m]
            vals = [v for v in em.values() if v is not None]
            md.append(f"| {LABELS.get(m, 'Probes (single task)')} | {res['seeds_done'][m]} | "
                      + " | ".join(_fmt(em[t]) for t in tasks)
                      + f" | {_fmt(float(np.mean(vals)) if len(vals) == len(tasks) else None)} | "
                      f"{_fmt(res['normalized'][m]['mean'])} |")
    md += ["", "## Paired differences against Full SFT (EM, 95% bootstrap CI over items and seeds)", "",
           "| method | seeds | " + " | ".join(tasks) + " | mean | detectable (mean) |",
           "|---|---|" + "---|" * len(tasks) + "---|---:|"]
    for m, x in res.get("vs_full_sft", {}).items():
        if x:
            md.append(f"| {LABELS[m]} | {x['seeds']} | " + " | ".join(_diff(x["tasks"][t]) for t in tasks)
                      + f" | {_diff(x['mean'])} | {x['mean']['mdd']:.3f} |")
    md += ["", "## CPI-FT (as specified) minus each baseline and control", "", "| vs | seeds | mean [95% CI] |",
           "|---|---|---|"]
    for m, x in res.get("vs_cpi_ft", {}).items():
        if x:
            md.append(f"| {LABELS[m]} | {x['seeds']} | {_diff(x['mean'])} |")
    md += ["", f"ω chosen on validation per seed: {res.get('omega_chosen')}", ""]
    md += ["## Verdict (generated from the numbers above)", "", *verdict(res), "",
           "## What finished", "", "Seeds finished per method (all tasks scored on the test split): "
           + "; ".join(f"{LABELS.get(m, 'probes')}: {v}" for m, v in res.get("seeds_done", {}).items()) + ".", ""]
    md += cpift_forget.markdown(res.get("forgetting") or {})
    return "\n".join(md) + "\n"


def _word(x: dict) -> str:
    lo, hi = x["ci"]
    return "better" if lo > 0 else "worse" if hi < 0 else "not distinguishable"


def verdict(res: dict) -> list[str]:
    """One line per finding: the gate per family, CPI-FT against Full SFT and each baseline and control."""
    g = (res.get("gate") or {}).get("tasks") or {}
    out = []
    if g:
        passed = [t for t, x in g.items() if x["passes"]]
        out.append(f"- Seesaw gate (seeds {res['gate']['seeds']}): passes for {', '.join(passed) or 'no task'}; "
                   + "; ".join(f"{t} {_diff(x)}" for t, x in g.items()) + ".")
        if not passed:
            out.append("- No task passes: the comparison below is in a regime without a seesaw.")
    for m in ("cpi-ft", "cpi-ft-omega-val"):
        x = (res.get("vs_full_sft") or {}).get(m)
        if x:
            out.append(f"- {LABELS[m]} − Full SFT, mean EM over tasks: {_diff(x['mean'])} (seeds {x['seeds']}; "
                       f"detectable ≈ {x['mean']['mdd']:.3f}): {_word(x['mean'])}.")
    for m, x in (res.get("vs_cpi_ft") or {}).items():
        if x:
            out.append(f"- CPI-FT − {LABELS[m]}: {_diff(x['mean'])} (seeds {x['seeds']}): "
                       f"CPI-FT {_word(x['mean'])}.")
    return out


def charts(res: dict, out: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    g = res.get("gate") or {}
    if g:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ts = list(g["tasks"])
        x = [g["tasks"][t]["diff"] for t in ts]
        err = [[v - g["tasks"][t]["ci"][0] for v, t in zip(x, ts)], [g["tasks"][t]["ci"][1] - v for v, t in zip(x, ts)]]
        ax.bar(ts, x, yerr=err, capsize=4, color=["tab:red" if g["tasks"][t]["passes"] else "tab:gray" for t in ts])
        ax.axhline(-GATE_DROP, ls="--", c="k", lw=0.8)
        ax.set_ylabel("Full SFT − probe EM")
        ax.set_title("Seesaw gate (red: passes)")
        fig.tight_layout()
        paths.append(out / f"{name}_gate.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    vs = {m: x for m, x in res.get("vs_full_sft", {}).items() if x}
    if vs:
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(vs) + 1.2))
        ms = list(vs)
        x = [vs[m]["mean"]["diff"] for m in ms]
        err = [[v - vs[m]["mean"]["ci"][0] for v, m in zip(x, ms)], [vs[m]["mean"]["ci"][1] - v for v, m in zip(x, ms)]]
        ax.barh([LABELS[m] for m in ms], x, xerr=err, capsize=3)
        ax.axvline(0, c="k", lw=0.8)
        ax.set_xlabel("mean EM minus Full SFT (95% CI)")
        fig.tight_layout()
        paths.append(out / f"{name}_vs_full_sft.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    paths += _em_chart(res, out, name, plt)
    fg = res.get("forgetting") or {}
    if fg.get("rows"):
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(fg["rows"]) + 1.2))
        rows = list(fg["rows"])
        x = [fg["rows"][m]["drop_a"]["diff"] for m in rows]
        ci = [fg["rows"][m]["drop_a"]["ci"] for m in rows]
        ax.barh([cpift_forget.LABELS[m] for m in rows], x, xerr=[[v - c[0] for v, c in zip(x, ci)],
                                                                  [c[1] - v for v, c in zip(x, ci)]], capsize=3)
        ax.axvline(0, c="k", lw=0.8)
        ax.set_xlabel(f"drop of {fg['A']} EM after training {fg['B']} (95% CI)")
        fig.tight_layout()
        paths.append(out / f"{name}_forgetting.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def _em_chart(res: dict, out: Path, name: str, plt) -> list[Path]:
    """Per-task test EM by method with 95% intervals (bootstrap over items and seeds)."""
    ci = {m: x for m, x in (res.get("em_ci") or {}).items() if x}
    if not ci:
        return []
    tasks, ms = res["tasks"], list(ci)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(ms) * len(tasks) / 3), 4))
    w = 0.8 / len(ms)
    for i, m in enumerate(ms):
        x = [ci[m]["tasks"][t]["diff"] for t in tasks]
        err = [[v - ci[m]["tasks"][t]["ci"][0] for v, t in zip(x, tasks)],
               [ci[m]["tasks"][t]["ci"][1] - v for v, t in zip(x, tasks)]]
        ax.bar(np.arange(len(tasks)) + i * w, x, w, yerr=err, capsize=2, label=LABELS.get(m, "Probes (single task)"))
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - w / 2, tasks)
    ax.set_ylabel("test exact match (95% CI)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / f"{name}_tasks.png", dpi=100)
    plt.close(fig)
    return [out / f"{name}_tasks.png"]


def write(res: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    jobs.write_json(out / f"{name}.json", res)
    md = out / f"{name}.md"
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(markdown(res))
    tmp.replace(md)
    charts(res, out, name)
