"""CPI-FT on a real pre-trained LM (issue 14): SmolLM2-135M-Instruct, the premise tested before the methods.

    python benchmarks/seesaw/seesaw.py --scale cpu     # 3 tasks, 1 seed, ≤ 2 h on 2 cores; commits results
    python benchmarks/seesaw/seesaw.py --scale gpu     # 5 tasks, 3 seeds, sized for ≤ 8 min on one H200
    python benchmarks/seesaw/seesaw.py --scale ci --base smollm2   # a few steps: the smoke test

Order of work: a timed 3-step SFT probe and the base's eval on the first task (printed; they size the
phases to the scale's time budget) → per seed, the probes → the localization gate (p ∈ {0.1, 1, 5})
→ every method on equal terms (full SFT, multi-stage random and heuristic, CPI-FT, task arithmetic,
TIES) → the protocol ablations (omega ∈ {1/(k+1), 0.1, 0}; calibration on a mixed vs the group's
sample) → forgetting (A then B) → lm_report.py writes seesaw-smollm2.{json,md} and PNGs.

Budget, stated: every probe runs ``probe_steps`` optimizer steps; every staged method (full SFT, both
multi-stage baselines, CPI-FT's staged backbone) ``steps_per_task`` × N; CPI-FT adds calibration
(``cal_steps`` per task and stage); task arithmetic and TIES spend only the probes' steps.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import jobs
import lm_jobs
import lm_report
import lm_tasks
import smollm2

SCALES = {
    "ci": {"tasks": ["facts", "arith"], "seeds": [0], "n_train": 16, "n_eval": 4, "batch": 4, "lr": 5e-5,
           "probe_steps": 2, "steps_per_task": 2, "cal_steps": 1, "cal_examples": 4, "gate_p": [1.0],
           "omegas": [0.0], "budget_min": None, "jobs": 2},
    "cpu": {"tasks": ["facts", "arith", "pyexpr"], "seeds": [0], "n_train": 400, "n_eval": 50, "batch": 8,
            "lr": 5e-5, "probe_steps": 40, "steps_per_task": 40, "cal_steps": 8, "cal_examples": 32,
            "gate_p": [0.1, 1.0, 5.0], "omegas": [0.1, 0.0], "budget_min": 100, "jobs": 2},
    "gpu": {"tasks": ["facts", "arith", "pyexpr", "json", "lexicon"], "seeds": [0, 1, 2], "n_train": 2000,
            "n_eval": 200, "batch": 16,
            "lr": 5e-5, "probe_steps": 120, "steps_per_task": 120, "cal_steps": 12, "cal_examples": 64,
            "gate_p": [0.1, 1.0, 5.0], "omegas": [0.1, 0.0], "budget_min": 8, "jobs": 6},
}
P, TAU = 1.0, 0.1  # the paper's defaults
HEURISTIC = [["facts", "lexicon"], ["arith", "pyexpr", "json"], ["logic"]]  # knowledge, computation, reasoning
MAX_LENGTH = 128


def recipe(base_dir: Path, files: dict, cfg: dict, *, omega: float | None = None, calibration: str = "mixed",
           groups: list[list[str]] | None = None, tau: float = TAU, order: str = "random") -> dict:
    sft = {"lr": cfg["lr"], "batch_size": cfg["batch"], "max_length": MAX_LENGTH, "warmup": 0.05, "weight_decay": 0.0}
    names = list(files)
    if groups is None:
        groups = jobs.heuristic_groups(names, HEURISTIC)
    return {"base": str(base_dir), "seed": 0,
            "tasks": [{"name": n, "train": str(tr), "eval": str(ev)} for n, (tr, ev) in files.items()],
            "probe": {"steps": cfg["probe_steps"], **sft}, "p": P, "granularity": "element", "tau": tau,
            "order": order, "train": {"steps_per_task": cfg["steps_per_task"], **sft},
            "calibration": {"examples": cfg["cal_examples"], "steps_per_task": cfg["cal_steps"], "data": calibration,
                            **{**sft, "lr": cfg["lr"] * 0.5}},
            "fuse": {"overlap": "last", "omega": omega},
            "baselines": {"stages": min(3, len(names)), "groups": groups,
                          "task_arithmetic": {"lam": 1.0}, "ties": {"density": 0.2, "lam": 1.0}},
            "eval": {"batch_size": 50, "max_length": MAX_LENGTH}}


def planned_steps(cfg: dict, n: int) -> int:
    """Optimizer steps of one seed's work, for sizing (forgetting: two tasks)."""
    s, c = cfg["steps_per_task"], cfg["cal_steps"]
    main = n * cfg["probe_steps"] + 4 * n * s + n * c  # probes; full, random, heuristic, CPI-FT; calibration
    return main + (len(cfg["omegas"]) + 1) * n * c + 3 * s + 2 * c  # variants; forgetting


def size(cfg: dict, n: int, timing: dict, say) -> dict:
    """Fit the step counts to the scale's time budget from the timed probe (never above the scale's)."""
    evals = len(cfg["seeds"]) * n * (8 + 2 * len(cfg["gate_p"]) + len(cfg["omegas"]) + 1) + 4
    per_eval = timing["eval_seconds"]
    workers = min(cfg["jobs"], 2) if jobs.device() == "cpu" else cfg["jobs"]
    est = lambda c: (len(c["seeds"]) * planned_steps(c, n) * timing["seconds_per_step"]  # noqa: E731
                     + evals * per_eval) / workers / 60
    minutes = est(cfg)
    say(f"timed probe: {timing['seconds_per_step']:.2f} s per SFT step (batch {cfg['batch']}, "
        f"{timing['tokens_per_step']:.0f} tokens), {per_eval:.1f} s per eval of {cfg['n_eval']} examples; "
        f"plan: {planned_steps(cfg, n)} optimizer steps per seed, ~{evals} evals, "
        f"~{minutes:.0f} min on {workers} workers")
    if cfg["budget_min"] and minutes > cfg["budget_min"]:
        f = cfg["budget_min"] / minutes
        for key in ("probe_steps", "steps_per_task", "cal_steps"):
            cfg[key] = max(1, int(cfg[key] * f))
        say(f"over the {cfg['budget_min']} min budget: steps scaled by {f:.2f} to probe {cfg['probe_steps']}, "
            f"{cfg['steps_per_task']} per task, calibration {cfg['cal_steps']} (~{est(cfg):.0f} min)")
    return cfg


def run(args, write_recipe, say) -> int:
    cfg = dict(SCALES[args.scale])
    if args.device:
        os.environ["CPIFT_SEESAW_DEVICE"] = args.device
    elif args.scale == "gpu":
        os.environ["CPIFT_SEESAW_DEVICE"] = "cuda"
    cfg["jobs"] = args.jobs or cfg["jobs"]
    name = f"seesaw-smollm2-{args.tag}" if args.tag else ("seesaw-smollm2" if args.scale != "ci" else "seesaw")
    work = (args.work / (f"smollm2-{args.scale}-{args.tag}" if args.tag else f"smollm2-{args.scale}")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or (Path(__file__).resolve().parent.parent / "results" if args.scale in ("cpu", "gpu")
                       else work / "results")
    start = time.perf_counter()
    jobs.init_worker()
    base_dir = args.model.resolve() if args.model else smollm2.prepare(args.work.resolve(), log=say)
    files = {} if args.no_builtin else lm_tasks.make_tasks(work / "data", cfg["tasks"], n_train=cfg["n_train"],
                                                           n_eval=cfg["n_eval"])
    files.update(args.extra_tasks)
    if len(files) < 2:
        raise SystemExit("--no-builtin: give at least two tasks with --task NAME=TRAIN.jsonl,EVAL.jsonl")
    names = list(files)
    first = names[0]

    ctx = get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=jobs.init_worker) as pool:  # one worker's speed
        tdir = work / "timing" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        tdir.parent.mkdir(exist_ok=True)
        timing = pool.submit(lm_jobs.time_steps, str(base_dir), str(files[first][0]), str(tdir), 3, cfg["batch"],
                             MAX_LENGTH).result()
        base_recipe = write_recipe(work / "recipes" / "base-eval.yml", recipe(base_dir, files, cfg))
        say(pool.submit(lm_jobs.run_base_eval, str(work), str(base_recipe)).result())
        took = json.loads((work / "base_eval_seconds.json").read_text())
        timing["eval_seconds"] = took["seconds"] / took["tasks"]
    cfg = size(cfg, len(names), timing, say)

    rdir = work / "recipes"
    main = write_recipe(rdir / "main.yml", recipe(base_dir, files, cfg))
    variants = {f"omega{o:g}": write_recipe(rdir / f"omega{o:g}.yml", recipe(base_dir, files, cfg, omega=o))
                for o in cfg["omegas"]}
    variants["cal-group"] = write_recipe(rdir / "cal-group.yml", recipe(base_dir, files, cfg, calibration="group"))
    reuse = {k: ["cores", "cluster.json", "stages"] for k in variants}
    reuse["cal-group"] = ["cores", "cluster.json", "stages", "fused"]
    a, b = names[0], names[1]
    forget = write_recipe(rdir / "forget.yml", recipe(base_dir, {a: files[a], b: files[b]}, cfg, tau=1.0,
                                                       groups=[[a], [b]], order="given"))
    W, M = str(work), str(main)
    todo = [(jobs.run_method, W, M, s, "task-arithmetic") for s in cfg["seeds"]]  # trains the probes
    todo += [(jobs.run_method, W, M, s, m) for s in cfg["seeds"] for m in ("full-sft", "multistage-random")]
    todo += [(lm_jobs.run_gate, W, M, s, p) for s in cfg["seeds"] for p in cfg["gate_p"]]
    todo += [(jobs.run_method, W, M, s, m) for s in cfg["seeds"] for m in ("cpi-ft", "ties", "multistage-heuristic")]
    todo += [(lm_jobs.run_variant, W, M, str(r), s, k, reuse[k]) for s in cfg["seeds"] for k, r in variants.items()]
    todo += [(jobs.run_forgetting, W, M, str(forget), s) for s in cfg["seeds"]]
    say(f"{len(todo)} jobs on {cfg['jobs']} workers ({jobs.device()}); log: {work / 'log.txt'}")
    with ProcessPoolExecutor(cfg["jobs"], mp_context=ctx, initializer=jobs.init_worker) as pool:
        futures = {pool.submit(fn, *a): (fn.__name__, a[2:]) for fn, *a in todo}
        failed = []
        for f in as_completed(futures):
            try:
                say(f.result())
            except Exception as e:  # the others go on; a rerun resumes from what finished
                failed.append(f"{futures[f][0]}{futures[f][1]}: {type(e).__name__}: {e}")
                say(f"FAILED {failed[-1]}")
    if failed:
        raise SystemExit(f"{len(failed)} job(s) failed (rerun to resume):\n" + "\n".join(failed))

    results = lm_report.aggregate(work, scale=args.scale, cfg=cfg, tasks=names, base=str(base_dir), timing=timing,
                                  variants=list(variants), wall=time.perf_counter() - start)
    lm_report.write(results, out, name=name)
    say(f"results: {out / (name + '.json')}, {out / (name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit("run through seesaw.py: python benchmarks/seesaw/seesaw.py --scale cpu")
