"""The seesaw benchmark's units of work, each run in a worker process through `run_pipeline`.

Layout under WORK (= benchmarks/seesaw/work/SCALE): ``s{seed}/{method}`` is one pipeline WORKDIR per
method and seed; ``s{seed}/task-arithmetic`` trains the probes and every other probe-using run of that
seed links them (the pipeline skips a step whose output exists), so all methods of a seed share the
same probe models. ``s{seed}/probe_eval.json`` scores each probe on its own task, the normaliser.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path


def device() -> str:
    """Where every SFT and eval of the benchmark runs: CPIFT_SEESAW_DEVICE (set by seesaw.py), default cpu."""
    return os.environ.get("CPIFT_SEESAW_DEVICE", "cpu")


def eval_options(recipe: Path) -> dict:
    """The recipe's eval settings (batch size, max length), for the evaluations made outside the pipeline."""
    import yaml

    ev = yaml.safe_load(recipe.read_text()).get("eval") or {}
    return {"batch_size": ev.get("batch_size", 50), "max_length": ev.get("max_length", 96)}


def score(model: Path, recipe: Path, tasks: list[dict] | None = None) -> dict:
    """Loss and exact match of ``model`` on every task of ``recipe`` (or the given ones)."""
    from cpift.training.evaluate import evaluate


    return {t["name"]: evaluate(model, recipe.parent / t["eval"], device=device(), progress=False,
                                **eval_options(recipe)) for t in (tasks or tasks_of(recipe))}


def heuristic_groups(names: list[str], heuristic: list[list[str]]) -> list[list[str]]:
    """The multi-stage heuristic's stages: the heuristic's groups restricted to ``names``, in order, then
    one stage of the tasks it does not name."""
    known = [[n for n in g if n in names] for g in heuristic]
    extra = [n for n in names if not any(n in g for g in heuristic)]
    return [g for g in known if g] + ([extra] if extra else [])


def init_worker() -> None:
    # torch's thread barriers stall when another process holds a core: one thread per worker
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


@contextmanager
def lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _log(work: Path, line: str) -> None:
    with open(work / "log.txt", "a") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {line}\n")


def pipeline(recipe: Path, wd: Path, method: str, seed: int, work: Path) -> dict:
    from cpift.training.pipeline import run_pipeline

    tag = f"s{seed}/{wd.name}"
    return run_pipeline(recipe, wd, method=method, seed=seed, device=device(),
                        log=lambda line: _log(work, f"{tag}: {line}"))


def claim(recipe: Path, wd: Path, method: str, seed: int) -> None:
    from cpift.training.pipeline import claim_workdir
    from cpift.training.recipe import load_recipe

    r = load_recipe(recipe)
    r.seed = seed
    claim_workdir(r, wd, method=method)


def _run_once(recipe: Path, wd: Path, method: str, seed: int, work: Path) -> None:
    """Run one pipeline WORKDIR unless finished; a job that needs it while another job runs it waits."""
    with lock(wd.parent / f".{wd.name}.lock"):
        if not (wd / "report.json").exists():
            pipeline(recipe, wd, method, seed, work)


def tasks_of(recipe: Path) -> list[dict]:
    import yaml

    return yaml.safe_load(recipe.read_text())["tasks"]


def ensure_probes(work: Path, recipe: Path, seed: int) -> Path:
    """Train the seed's probes (the task-arithmetic run) once, under a lock; evaluate each on its task."""

    sd = work / f"s{seed}"
    wd = sd / "task-arithmetic"
    with lock(sd / ".probes.lock"):
        if not (wd / "report.json").exists():
            pipeline(recipe, wd, "task-arithmetic", seed, work)
        out = sd / "probe_eval.json"
        if not out.exists():
            write_json(out, {t["name"]: score(wd / "probes" / t["name"], recipe, [t])[t["name"]]
                             for t in tasks_of(recipe)})
    return wd / "probes"


def link(src: Path, dst: Path) -> None:
    """Make ``dst`` point at a finished step output of another WORKDIR of the same seed."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(src.resolve(), dst)


def run_method(work: str, recipe: str, seed: int, method: str) -> str:
    work, recipe = Path(work), Path(recipe)
    start = time.perf_counter()
    wd = work / f"s{seed}" / method
    if method in ("cpi-ft", "ties", "task-arithmetic"):
        probes = ensure_probes(work, recipe, seed)
        claim(recipe, wd, method, seed)  # a pipeline WORKDIR before the shared probes are linked in
        for t in tasks_of(recipe):
            link(probes / t["name"], wd / "probes" / t["name"])
    _run_once(recipe, wd, method, seed, work)
    return f"s{seed}/{method}: {time.perf_counter() - start:.0f} s"


def run_sensitivity(work: str, main_recipe: str, recipe: str, seed: int, name: str) -> str:
    """CPI-FT with another p or τ, on the seed's shared probes."""
    work, recipe = Path(work), Path(recipe)
    start = time.perf_counter()
    probes = ensure_probes(work, Path(main_recipe), seed)
    wd = work / f"s{seed}" / f"sens-{name}"
    claim(recipe, wd, "cpi-ft", seed)
    for t in tasks_of(recipe):
        link(probes / t["name"], wd / "probes" / t["name"])
    _run_once(recipe, wd, "cpi-ft", seed, work)
    return f"s{seed}/sens-{name}: {time.perf_counter() - start:.0f} s"


def run_forgetting(work: str, main_recipe: str, recipe: str, seed: int) -> str:
    """A then B: sequential full SFT, the same with A's core frozen during B, and the CPI-FT pipeline.

    The CPI-FT run (τ = 1, order given: stages [A], [B]) trains stage 1 on A from the base, then B with
    A's core frozen (``stages/2``, the frozen-core row), then fuses and calibrates (the CPI-FT row).
    The sequential full SFT run (multistage-heuristic, groups [[A], [B]]) has a bit-identical stage 1
    (same data file, seed and settings, nothing frozen), so it links it and trains B with all parameters.
    """

    work, recipe = Path(work), Path(recipe)
    start = time.perf_counter()
    probes = ensure_probes(work, Path(main_recipe), seed)
    tasks = tasks_of(recipe)
    a, b = (t["name"] for t in tasks)
    sd = work / f"s{seed}" / "forget"
    cpi, seq = sd / "cpi-ft", sd / "sequential"
    out = sd / "forgetting.json"
    if out.exists():
        return f"s{seed}/forget: done before"
    sd.mkdir(parents=True, exist_ok=True)
    claim(recipe, cpi, "cpi-ft", seed)
    for t in tasks:
        link(probes / t["name"], cpi / "probes" / t["name"])
    _run_once(recipe, cpi, "cpi-ft", seed, work)
    plan = json.loads((cpi / "report.json").read_text())["stages"]
    if plan != [[a], [b]]:
        raise RuntimeError(f"forgetting: expected the stages [[{a}], [{b}]] from τ = 1, got {plan}")
    claim(recipe, seq, "multistage-heuristic", seed)
    link(cpi / "stages" / "1", seq / "stages" / "1")
    _run_once(recipe, seq, "multistage-heuristic", seed, work)

    result = {"A": a, "B": b, "after_A": score(cpi / "stages" / "1", recipe),
              "methods": {"full-sft": json.loads((seq / "report.json").read_text())["tasks"],
                          "cpi-frozen-core": score(cpi / "stages" / "2", recipe),
                          "cpi-ft": json.loads((cpi / "report.json").read_text())["tasks"]}}
    write_json(out, result)
    return f"s{seed}/forget: {time.perf_counter() - start:.0f} s"


def run_phases(work: str, main_recipe: str, seed: int) -> str:
    """Score CPI-FT after each phase (the base, the staged backbone, the fused model, the calibrated one)
    on every task: where the method gains or loses, for the analysis."""

    work, recipe = Path(work), Path(main_recipe)
    out = work / f"s{seed}" / "cpi_phases.json"
    if out.exists():
        return f"s{seed}/phases: done before"
    start = time.perf_counter()
    run_method(str(work), main_recipe, seed, "cpi-ft")
    wd = work / f"s{seed}" / "cpi-ft"
    rep = json.loads((wd / "report.json").read_text())
    last = str(len(rep["stages"]))
    models = {"base": Path(rep["settings"]["base"]), "backbone": wd / "stages" / last, "fused": wd / "fused",
              "calibrated": wd / "calibrated" / last}
    write_json(out, {name: score(m, recipe) for name, m in models.items()})
    return f"s{seed}/phases: {time.perf_counter() - start:.0f} s"


def run_calibration(work: str, main_recipe: str, recipe: str, seed: int, name: str) -> str:
    """CPI-FT with a longer calibration only: every earlier step (probes, cores, cluster, staged backbone,
    fusion) is linked from the seed's main CPI-FT run, which that recipe reproduces bit for bit."""
    work, recipe = Path(work), Path(recipe)
    start = time.perf_counter()
    run_method(str(work), main_recipe, seed, "cpi-ft")  # done before, or waits for / runs it
    main = work / f"s{seed}" / "cpi-ft"
    wd = work / f"s{seed}" / f"calib-{name}"
    if not (wd / "report.json").exists():
        n = len(json.loads((main / "report.json").read_text())["stages"])
        claim(recipe, wd, "cpi-ft", seed)
        for rel in ["cores", "cluster.json", "fused", *(f"stages/{i}" for i in range(1, n + 1)),
                    *(f"probes/{t['name']}" for t in tasks_of(recipe))]:
            link(main / rel, wd / rel)
        pipeline(recipe, wd, "cpi-ft", seed, work)
    return f"s{seed}/calib-{name}: {time.perf_counter() - start:.0f} s"


def run_transplant(work: str, main_recipe: str, seed: int, p_runs: dict[str, str]) -> str:
    """Where does a probe's skill live? For each task and core size p: the base with only the probe's core
    entries (``core_only``), and the probe with its core reset to the base (``without_core``), scored on
    that task. Cores come from the seed's CPI-FT run at p = 1 and the p sensitivity runs (run here if not done)."""
    import torch
    from safetensors.torch import load_file

    from cpift.merge.cpi.cores import tensor_kind
    from cpift.merge.cpi.masks import load_core_mask
    from cpift.training.data import load_dataset
    from cpift.training.evaluate import evaluate_model, load_model, load_tokenizer

    work, recipe = Path(work), Path(main_recipe)
    sd = work / f"s{seed}"
    out = sd / "core_transplant.json"
    if out.exists():
        return f"s{seed}/transplant: done before"
    start = time.perf_counter()
    run_method(str(work), main_recipe, seed, "cpi-ft")
    for name, p_recipe in p_runs.items():  # the p sensitivity runs: {"p0.1": recipe, ...}
        run_sensitivity(str(work), main_recipe, p_recipe, seed, name)
    base_dir = Path(json.loads((sd / "cpi-ft" / "report.json").read_text())["settings"]["base"])
    tok = load_tokenizer(base_dir)
    net, _ = load_model(base_dir, torch.device(device()))
    theta0 = {k: v.float() for k, v in load_file(str(base_dir / "model.safetensors")).items()}
    runs = {"1": sd / "cpi-ft" / "cores", **{n.removeprefix("p"): sd / f"sens-{n}" / "cores" for n in p_runs}}
    result: dict = {}
    for p, cores in runs.items():
        result[p] = {}
        for t in tasks_of(recipe):
            name = t["name"]
            probe = {k: v.float() for k, v in load_file(str(sd / "task-arithmetic" / "probes" / name /
                                                             "model.safetensors")).items()}
            mask = load_core_mask(cores / f"{name}.safetensors")
            data = load_dataset(recipe.parent / t["eval"], tok, max_length=eval_options(recipe)["max_length"],
                                for_eval=True)
            scores = {}
            for variant, (inside, outside) in {"core_only": (probe, theta0), "without_core": (theta0, probe)}.items():
                state = {}
                for k in theta0:
                    m = mask.element_mask(k) if k in mask.shapes else torch.zeros_like(theta0[k], dtype=torch.bool)
                    state[k] = torch.where(m, inside[k], outside[k])
                net.load_state_dict(state, strict=False)
                scores[variant] = evaluate_model(net, tok, data, batch_size=eval_options(recipe)["batch_size"],
                                                 progress=False)
            kinds: dict[str, int] = {}
            for k, c in mask.counts.items():
                kinds[tensor_kind(k)] = kinds.get(tensor_kind(k), 0) + c
            result[p][name] = {**scores, "where": {k: c / max(1, sum(kinds.values())) for k, c in kinds.items()}}
    write_json(out, result)
    return f"s{seed}/transplant: {time.perf_counter() - start:.0f} s"
