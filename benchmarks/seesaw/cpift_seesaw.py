"""CPI-FT on SmolLM2-135M-Instruct with tasks that interfere (issue 25): the seesaw gate first, then
every method and control with common seeds, teacher-forced exact match per item, paired bootstrap.

    python benchmarks/seesaw/cpift_seesaw.py --scale ci    # a smoke run of every phase (CI)
    python benchmarks/seesaw/cpift_seesaw.py --scale cpu   # ~2 h on 2 cores: results committed
    python benchmarks/seesaw/cpift_seesaw.py --scale gpu   # 5 seeds, every method, one H100/H200 (≤ 8 min)
    python benchmarks/seesaw/cpift_seesaw.py --scale cpu --report-only   # aggregate what finished

Phases. (0) A timed probe (SFT steps and a teacher-forced eval) sizes the steps per task to the
scale's gate budget. (A) lr grid on seed 0, validation split only: the probes and Full SFT at each
lr; the lr with the best mean validation EM of probes and Full SFT together is kept. (B) The gate:
probes and Full SFT for every seed on the test split (equal exposure: a probe runs S steps on its
task, Full SFT N × S steps on the balanced mix). (C) The comparison, seed by seed, in priority order:
CPI-FT as specified, multistage-random, the replay and random-core controls, CPI-FT with omega chosen
on validation, multistage-heuristic, task arithmetic, TIES, CPI-FT's phases, LoTA; then Table 2 (A then
B: cpift_forget.py) for every seed. Results are
rewritten after every finished job, so a run cut short still reports what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cpift_forget  # noqa: E402
import cpift_jobs as cj  # noqa: E402
import cpift_report  # noqa: E402
import cpift_tasks  # noqa: E402
import jobs  # noqa: E402
import lm  # noqa: E402
import smollm2  # noqa: E402

SCALES = {
    "ci": {"tasks": ["fmt-terse", "attr-home"], "seeds": [0], "lrs": [1e-4], "n_train": 48, "n_val": 4,
           "n_test": 4, "n_people": 8, "batch": 2, "steps": [1, 1], "cal_frac": 0.25, "cal_examples": 2,
           "gate_min": None, "jobs": 2, "omegas": [0.0],
           "forget": ["fmt-terse", "attr-home"]},
    # cpu: the format-conflict pair and the control. The attribute family needs several epochs over its
    # people (6 steps left its probes at 0.14, near the 1/12 chance rate) and stays at the gpu scale; at
    # 0.08 s per teacher-forced item (2 quiet cores) 500 test items x 3 tasks is 2 min per model scored
    "cpu": {"tasks": ["fmt-terse", "fmt-explain", "ctrl-pyexpr"], "seeds": [0, 1, 2], "lrs": [3e-4, 1e-3],
            "n_train": 600, "n_val": 200, "n_test": 500, "n_people": 120, "batch": 8, "steps": [10, 40],
            "cal_frac": 0.25, "cal_examples": 32, "gate_min": 40, "jobs": 2, "omegas": [0.0, 0.1, 0.25],
            "forget": ["fmt-terse", "fmt-explain"]},
    "gpu": {"tasks": cpift_tasks.TASKS, "seeds": [0, 1, 2, 3, 4], "lrs": [1e-4, 3e-4], "n_train": 2000,
            "n_val": 200, "n_test": 500, "n_people": 150, "batch": 16, "steps": [20, 120], "cal_frac": 0.25,
            "cal_examples": 64, "gate_min": 3, "jobs": 4, "omegas": [0.0, 0.1, 0.25],
            "forget": ["fmt-terse", "fmt-explain"]},
}
HEURISTIC = [list(v) for v in cpift_tasks.FAMILIES.values()]  # stages by family (task similarity)


def recipe(base_dir: Path, files: dict, cfg: dict, lr: float, *, omega: float | None = None,
           forget: bool = False) -> dict:
    """The pipeline recipe of one lr (``forget``: the two tasks of Table 2, stages [A], [B] in that order)."""
    c = {**cfg, "lr": lr, "probe_steps": cfg["S"], "steps_per_task": cfg["S"], "cal_steps": cfg["C"]}
    order = {"tau": 1.0, "order": "given", "groups": [[t] for t in files]} if forget else {
        "groups": jobs.heuristic_groups(list(files), HEURISTIC)}
    r = lm.recipe(base_dir, {t: (f["train"], f["val"]) for t, f in files.items()}, c, omega=omega, **order)
    r["eval"].update({"exact_match": "teacher-forced", "per_item": True})
    r["intermediate_dtype"] = "float32"  # probes, stages, fused: exact updates (cores from unrounded deltas)
    return r


def write_recipe(path: Path, body: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(body, indent=2) + "\n"  # JSON is YAML: load_recipe reads it
    if not path.exists() or path.read_text() != text:
        jobs.write_json(path, body)
    return path


def timed_probe(base_dir: Path, files: dict, cfg: dict, work: Path) -> dict:
    import torch

    from cpift.training.data import load_dataset
    from cpift.training.evaluate import evaluate_model, load_model, load_tokenizer
    from cpift.training.sft import sft

    task = cfg["tasks"][0]
    (work / "timing").mkdir(exist_ok=True)
    out = work / "timing" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    r = sft(base_dir, files[task]["train"], out, steps=2, lr=1e-5, batch_size=cfg["batch"],
            max_length=lm.MAX_LENGTH, progress=False, device=jobs.device(), save_dtype="float32")
    tok = load_tokenizer(base_dir)
    net, _ = load_model(base_dir, torch.device(jobs.device()))
    data = load_dataset(files[task]["val"], tok, max_length=lm.MAX_LENGTH, for_eval=True)
    start = time.perf_counter()
    n = evaluate_model(net, tok, data, batch_size=50, progress=False, exact_match="teacher-forced")["n"]
    import shutil

    shutil.rmtree(out)  # 0.5 GB
    return {"seconds_per_step": r.seconds / 2, "seconds_per_item": (time.perf_counter() - start) / n,
            "batch": cfg["batch"]}


def size(cfg: dict, timing: dict, say) -> dict:
    """Steps per task S (and calibration C) that fit the gate (phases A and B) into gate_min minutes."""
    n, lo, hi = len(cfg["tasks"]), *cfg["steps"]
    runs = (len(cfg["lrs"]) + len(cfg["seeds"]) - 1) * 2 * n  # S-step units: probes + Full SFT's N × S
    cross = sum(t in cpift_tasks.OTHER for t in cfg["tasks"]) * 2  # probe and Full SFT on the cross files
    items = (len(cfg["lrs"]) * 2 * n * cfg["n_val"] + len(cfg["seeds"]) * (2 * n + cross) * cfg["n_test"]
             + n * (cfg["n_val"] + cfg["n_test"]))  # grid (val), gate (test, cross-talk), base
    workers = cfg["jobs"]
    fixed = items * timing["seconds_per_item"] / workers / 60
    per_s = runs * timing["seconds_per_step"] / workers / 60
    s = hi if not cfg["gate_min"] else int(max(lo, min(hi, (cfg["gate_min"] - fixed) / per_s)))
    cfg["S"], cfg["C"] = s, max(1, round(s * cfg["cal_frac"]))
    say(f"timed probe: {timing['seconds_per_step']:.2f} s per SFT step (batch {cfg['batch']}), "
        f"{1000 * timing['seconds_per_item']:.0f} ms per eval item; gate: {fixed:.0f} min of eval + "
        f"{per_s:.2f} min per step of S on {workers} workers -> S = {s} steps per task, calibration {cfg['C']} "
        f"(~{fixed + per_s * s:.0f} min for the gate)")
    return cfg


def prune(root: Path) -> None:
    """Free disk (a model is 0.5 GB in float32): the intermediate stages of finished runs that nothing links
    or resumes from (every calibration stage but the last; the stages of the staged baselines; replay's)."""
    import shutil

    for wd in root.glob("lr*/s*/*/"):
        if (wd / "report.json").exists():
            n = len(json.loads((wd / "report.json").read_text())["stages"] or [])
            subs = ["calibrated"] + ([] if wd.name == "cpi-ft" or wd.name.startswith("omega") else ["stages"])
        elif wd.name == "replay" and any(wd.glob("*/model.safetensors")):
            n = max(int(p.name) for p in wd.iterdir() if p.name.isdigit())
            subs = ["."] if (wd / str(n) / "model.safetensors").exists() else []
        else:
            continue
        for sub in subs:
            for i in range(1, n):
                d = wd / sub / str(i)
                if d.is_dir() and not d.is_symlink() and (d / "model.safetensors").exists():
                    shutil.rmtree(d)


def guarded(stop_at: float | None, fn, *a) -> str:
    """Run ``fn(*a)`` unless the wall clock is past ``stop_at`` (epoch seconds) when a worker picks it up."""
    if stop_at is not None and time.time() > stop_at:
        return f"not started (past --stop-at): {fn.__name__}{tuple(a[1:])}"
    return fn(*a)


def pool_run(todo: list, cfg: dict, say, done=None) -> list[str]:
    failed = []
    with ProcessPoolExecutor(cfg["jobs"], mp_context=get_context("spawn"), initializer=jobs.init_worker) as pool:
        futures = {pool.submit(guarded, cfg.get("stop_at"), fn, *a): f"{fn.__name__}{tuple(a[1:])}"
                   for fn, *a in todo}
        for f in as_completed(futures):
            try:
                say(f.result())
            except Exception as e:  # the others go on; a rerun resumes from what finished
                failed.append(f"{futures[f]}: {type(e).__name__}: {e}")
                say(f"FAILED {failed[-1]}")
            if done:
                done()
    return failed


def comparison(sd: str, main: str, variants: dict[str, str], s: int) -> list:
    T = ["test"]
    return [(cj.run_method, sd, main, s, "cpi-ft", T), (cj.run_method, sd, main, s, "multistage-random", T),
            (cj.run_replay, sd, main, s, T), (cj.run_random_core, sd, main, s, T),
            (cj.run_omega_choice, sd, main, s, variants), (cj.run_method, sd, main, s, "multistage-heuristic", T),
            (cj.run_method, sd, main, s, "task-arithmetic", T), (cj.run_method, sd, main, s, "ties", T),
            (cj.run_phases, sd, main, s), (cj.run_lota, sd, main, s, T)]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="ci")
    ap.add_argument("--model", type=Path, help="a Hugging Face model directory instead of SmolLM2-135M-Instruct")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda for --scale gpu, else cpu")
    ap.add_argument("--work", type=Path, default=HERE / "work", help="cache and run directory (gitignored)")
    ap.add_argument("--out", type=Path, help="results directory (default: benchmarks/results for cpu and gpu, "
                    "WORK/cpift-SCALE/results for ci)")
    ap.add_argument("--jobs", type=int, help="worker processes (one torch thread each on the CPU)")
    ap.add_argument("--budget-note", default="", help="the budget actually used and why, for the report")
    ap.add_argument("--stop-at", help="UTC time HH:MM after which no job starts (running ones finish)")
    ap.add_argument("--report-only", action="store_true", help="aggregate what finished; train nothing")
    ap.add_argument("--resume", action="store_true",
                    help="go on from what finished, with the steps the first run sized (no new timed probe)")
    ap.add_argument("--dry-run", action="store_true", help="write tasks and recipes, print the plan, stop")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    say = lambda line: print(f"[{time.perf_counter() - t0:6.0f} s] {line}", flush=True)  # noqa: E731
    cfg = dict(SCALES[args.scale])
    os.environ["CPIFT_SEESAW_DEVICE"] = args.device or ("cuda" if args.scale == "gpu" else "cpu")
    cfg["jobs"] = args.jobs or cfg["jobs"]
    if args.stop_at:
        hh, mm = (int(x) for x in args.stop_at.split(":"))
        now = time.gmtime()
        cfg["stop_at"] = time.time() + ((hh - now.tm_hour) * 60 + mm - now.tm_min) * 60 - now.tm_sec
    work = (args.work / f"cpift-{args.scale}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    name = "cpift-seesaw" if args.scale == "cpu" else f"cpift-seesaw-{args.scale}"
    out = args.out or (HERE.parent / "results" if args.scale in ("cpu", "gpu") else work / "results")
    jobs.init_worker()
    if args.dry_run:  # the plan without a model: where SmolLM2 would be, the scale's largest step counts
        base_dir = (args.model or args.work / "smollm2-135m-instruct-bf16").resolve()
    else:
        base_dir = args.model.resolve() if args.model else smollm2.prepare(args.work.resolve(), log=say)
    files = cpift_tasks.make(work / "data", cfg["tasks"], n_train=cfg["n_train"], n_val=cfg["n_val"],
                             n_test=cfg["n_test"], n_people=cfg["n_people"])
    cj.set_splits(work, files)
    state = work / "state.json"
    if args.dry_run:
        cfg["S"], cfg["C"] = cfg["steps"][1], max(1, round(cfg["steps"][1] * cfg["cal_frac"]))
        recipes = [write_recipe(work / f"lr{lr:g}" / "main.json", recipe(base_dir, files, cfg, lr))
                   for lr in cfg["lrs"]]
        jobs_per_seed = len(cfg["tasks"]) + 1 + len(comparison("", "", {}, 0))
        say(f"dry run: {len(cfg['tasks'])} tasks x ({cfg['n_val']} val, {cfg['n_test']} test) items, seeds "
            f"{cfg['seeds']}, lr grid {cfg['lrs']}, S = {cfg['S']}, calibration {cfg['C']}; {jobs_per_seed} jobs per "
            f"seed on {cfg['jobs']} workers ({jobs.device()}); recipes {[str(p) for p in recipes]}")
        return 0
    if args.report_only or args.resume:  # the steps the first run sized: its recipes and finished jobs stay valid
        cfg.update({k: v for k, v in json.loads(state.read_text()).items() if k != "budget_note"})
    else:
        timing = timed_probe(base_dir, files, cfg, work)
        cfg = size(cfg, timing, say)
        cfg["timing"] = timing
        started = time.time() - (time.perf_counter() - t0)  # the run's start, the timed probe included
        jobs.write_json(state, {"S": cfg["S"], "C": cfg["C"], "timing": timing, "started": started,
                                "budget_note": args.budget_note})
    cfg["wall_start"] = json.loads(state.read_text())["started"]
    cfg["budget_note"] = args.budget_note or json.loads(state.read_text()).get("budget_note", "")
    recipes = {lr: write_recipe(work / f"lr{lr:g}" / "main.json", recipe(base_dir, files, cfg, lr))
               for lr in cfg["lrs"]}

    def report() -> None:
        prune(work)
        res = cpift_report.aggregate(work, cfg=cfg, scale=args.scale, base=str(base_dir))
        cpift_report.write(res, out, name=name)

    if args.report_only:
        report()
        say(f"results: {out / (name + '.json')}")
        return 0
    names, W = cfg["tasks"], str(work)
    grid = [(cj.run_base, W, str(recipes[cfg["lrs"][0]]), ["val", "test"])]
    for lr, rp in recipes.items():
        sd = str(work / f"lr{lr:g}" / "s0")
        grid += [(cj.run_probe, sd, str(rp), 0, t, ["val"]) for t in names]
        grid += [(cj.run_method, sd, str(rp), 0, "full-sft", [])]
    failed = pool_run(grid, cfg, say)
    lr = cpift_report.choose_lr(work, cfg)
    jobs.write_json(work / "lr.json", {"lr": lr})
    for other in cfg["lrs"]:  # the grid's other models: their scores are kept, the weights are not needed
        if other != lr:
            import shutil

            for d in (work / f"lr{other:g}" / "s0").glob("probes/*/"):
                shutil.rmtree(d)
    say(f"lr chosen on validation: {lr:g}")
    main_recipe = str(recipes[lr])
    variants = {f"omega{o:g}": str(write_recipe(work / f"lr{lr:g}" / f"omega{o:g}.json",
                                                recipe(base_dir, files, cfg, lr, omega=o))) for o in cfg["omegas"]}
    a, b = cfg["forget"]
    forget_recipe = str(write_recipe(work / f"lr{lr:g}" / "forget.json",
                                     recipe(base_dir, {a: files[a], b: files[b]}, cfg, lr, forget=True)))
    gate, comp, forget = [], [], []
    for s in cfg["seeds"]:
        sd = str(work / f"lr{lr:g}" / f"s{s}")
        gate += [(cj.run_probe, sd, main_recipe, s, t, ["test", "cross"]) for t in names]
        gate += [(cj.run_method, sd, main_recipe, s, "full-sft", ["test", "cross"])]
        comp += comparison(sd, main_recipe, variants, s)
        forget.append((cpift_forget.run_forgetting, sd, forget_recipe, s))
    failed += pool_run(gate, cfg, say, report)
    failed += pool_run(comp + forget, cfg, say, report)  # Table 2 after every seed's comparison
    report()
    say(f"results: {out / (name + '.json')}, {out / (name + '.md')}")
    if failed:
        raise SystemExit(f"{len(failed)} job(s) failed (rerun to resume):\n" + "\n".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
