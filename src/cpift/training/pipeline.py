"""The CPI-FT pipeline (docs/cpi-ft.md) and the paper's baselines, one resumable run per WORKDIR.

``cpi-ft``: probe SFT per task (from the base, that task alone) → cores → cluster → staged SFT of
the backbone (stage s trains on its group's mixed data from stage s−1's model, the cores of the
groups before s frozen) → fuse (backbone = last stage, tasks in stage order with their probe models
and masks) → calibration SFT (stage by stage, earlier groups' cores frozen, each stage on a balanced
mixed sample of every task, as the paper has it; ``calibration.data: group``: of its group only)
→ eval of every task.

Baselines on the same base, data and evaluation: ``full-sft`` (one stage of all tasks),
``multistage-random`` (tasks shuffled with the seed and cut into K stages), ``multistage-heuristic``
(the recipe's groups), and ``task-arithmetic`` / ``ties`` over the probe models. A stage of g tasks
runs g × train.steps_per_task steps, so every staged method spends the same optimizer steps on its
main training; report.json counts all of them per step.

WORKDIR layout: probes/NAME, cores/NAME.safetensors, cluster.json, data/*.jsonl, stages/S, fused,
calibrated/S, merged, eval.json, then report.json and report.md. A step is done when its output
exists: sft, the merges and cores publish a directory by renaming it when complete, and the JSON and
data files are renamed into place, so a killed run leaves no finished-looking partial output and a
rerun skips what is done. pipeline.json records the recipe and method the WORKDIR was made with; a
rerun with different ones is refused rather than mixing outputs of two runs.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

from cpift.errors import ConfigError, ParameterError
from cpift.merge.io.publish import check_inputs, check_not_protected, write_atomic

from .ranks import Ranks
from .recipe import Recipe, load_recipe

METHODS = ("cpi-ft", "full-sft", "multistage-random", "multistage-heuristic", "task-arithmetic", "ties")


def _write_atomic(path: Path, text: str) -> None:
    write_atomic(path, text)


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def split_stages(names: list[str], k: int, seed: int) -> list[list[str]]:
    """multistage-random: the tasks shuffled with ``seed``, cut into ``k`` stages of near-equal size."""
    shuffled = list(names)
    random.Random(seed).shuffle(shuffled)
    q, r = divmod(len(shuffled), k)
    bounds = [i * q + min(i, r) for i in range(k + 1)]
    return [shuffled[bounds[i]:bounds[i + 1]] for i in range(k)]


class _Run:
    """Runs steps that are not done yet, and remembers each step's time and optimizer steps."""

    def __init__(self, recipe: Recipe, workdir: Path, *, device, progress: bool, log: Callable[[str], None],
                 ranks: Ranks, fsdp: bool = False):
        self.r, self.wd, self.device, self.progress, self.log = recipe, workdir, device, progress, log
        self.ranks, self.fsdp = ranks, fsdp
        self.ledger_path = workdir / "steps.json"
        self.ledger: dict = json.loads(self.ledger_path.read_text()) if self.ledger_path.exists() else {}
        self.done: list[dict] = []  # this run's steps in order, for the report

    def step(self, key: str, out: Path, fn: Callable[[], None], *, optimizer_steps: int = 0,
             collective: bool = False) -> Path:
        """Run ``fn`` unless ``out`` exists: on every rank if ``collective`` (SFT), else on rank 0 alone."""
        if self.ranks.agree(out.exists()):  # complete: every output is published by a rename
            self.log(f"{key}: done before, skipped ({out})")
            # no ledger entry: killed between the publish and the ledger write; the time is lost
            entry = self.ledger.get(key, {"output": str(out.relative_to(self.wd)), "seconds": 0.0,
                                          "optimizer_steps": optimizer_steps})
            self.done.append({"step": key, **entry, "resumed": True})
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        fn() if collective else self.ranks.leader_runs(key, fn)
        entry = {"output": str(out.relative_to(self.wd)), "seconds": round(time.perf_counter() - start, 3),
                 "optimizer_steps": optimizer_steps}
        self.ledger[key] = entry
        if self.ranks.leader:
            _write_atomic(self.ledger_path, json.dumps(self.ledger, indent=2) + "\n")
        self.done.append({"step": key, **entry, "resumed": False})
        self.log(f"{key}: {entry['seconds']:.1f} s, {optimizer_steps} optimizer steps -> {out}")
        return out

    def sft(self, key: str, model: Path, data: Path, out: Path, cfg: dict, steps: int, freeze: list[Path],
            window: tuple[int, int] | None = None, *, final: bool = False) -> Path:
        """One SFT step; an intermediate model is saved in the recipe's intermediate_dtype, the final one in
        the base checkpoint's dtype."""
        from .sft import sft

        opts = {k: v for k, v in cfg.items() if k not in ("steps", "steps_per_task", "examples", "data", "schedule")}
        dtype = stored_dtype(self.r.base) if final else self.r.intermediate_dtype
        return self.step(key, out, lambda: sft(model, data, out, steps=steps, seed=self.r.seed, freeze=freeze,
                                               device=self.device, progress=self.progress, schedule_window=window,
                                               save_dtype=dtype, fsdp=self.fsdp, **opts),
                         optimizer_steps=steps, collective=True)

    def data(self, name: str, lines: list[str]) -> Path:
        path = self.wd / "data" / f"{name}.jsonl"
        if self.ranks.leader and not path.exists():  # from the recipe and the seed alone: same bytes on a rerun
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, "".join(line + "\n" for line in lines))
        return path

    def probes(self) -> dict[str, Path]:
        steps = self.r.probe["steps"]
        return {t.name: self.sft(f"probe:{t.name}", self.r.base, t.train, self.wd / "probes" / t.name, self.r.probe,
                                 steps, []) for t in self.r.tasks}

    def staged(self, start: Path, stages: list[list[str]], folder: str, cfg: dict, *, masks: dict | None,
               sample: int | None = None, mixed: bool = False, final: bool = False) -> Path:
        """Sequential SFT, one stage per group; with ``masks`` the cores of earlier groups are frozen.

        ``sample``: a balanced sample of that many lines per task instead of whole files, of the
        stage's group, or with ``mixed`` of every task. ``final``: the last stage is the pipeline's result.
        ``cfg["schedule"] == "continue"``: one
        learning-rate schedule over all stages (each stage continues where the last one stopped).
        """
        model = start
        train = {t.name: t.train for t in self.r.tasks}
        total = sum(len(g) for g in stages) * cfg["steps_per_task"]
        first = 0
        for s, group in enumerate(stages, 1):
            if sample is None:
                lines = [line for n in group for line in _lines(train[n])]
            else:  # balanced: the same count from every task of the group (or all tasks), drawn with the seed
                rng = random.Random(f"{self.r.seed}:{folder}:{s}")
                lines = [line for n in (self.r.names if mixed else group)
                         for line in rng.sample(_lines(train[n]), sample)]
            data = self.data(f"{folder}-{s}", lines)
            freeze = [masks[n] for g in stages[:s - 1] for n in g] if masks else []
            steps = len(group) * cfg["steps_per_task"]
            window = (first, total) if cfg.get("schedule") == "continue" else None
            model = self.sft(f"{folder}:{s}", model, data, self.wd / folder / str(s), cfg, steps, freeze, window,
                             final=final and s == len(stages))
            first += steps
        return model


def stored_dtype(model: Path) -> str:
    """The dtype name of a checkpoint's first floating-point tensor, read from its header."""
    from cpift.merge.io.models import open_models

    (ckpt,) = open_models([model])
    try:
        name = next(str(i.dtype).removeprefix("torch.") for n in ckpt.names()
                    if (i := ckpt.info(n)).dtype.is_floating_point)
        return name if name in ("float32", "bfloat16", "float16") else "auto"
    finally:
        ckpt.close()


def _check_data(r: Recipe) -> int:
    """Load every task file with the base's tokenizer before anything is written (errors name file:line);
    returns the calibration sample per task: the recipe's, capped by the smallest training set so it
    stays balanced."""
    from .data import load_dataset
    from .evaluate import load_tokenizer

    tok = load_tokenizer(r.base)
    sizes = []
    for t in r.tasks:
        sizes.append(len(load_dataset(t.train, tok, max_length=r.train["max_length"])))
        load_dataset(t.eval, tok, max_length=r.eval["max_length"], for_eval=True)
    return min(r.calibration["examples"], *sizes)


def _stage_plan(r: Recipe, method: str) -> list[list[str]] | None:
    if method == "full-sft":
        return [r.names]
    if method == "multistage-random":
        return split_stages(r.names, r.stages, r.seed)
    if method == "multistage-heuristic":
        if r.groups is None:
            raise ConfigError(f"{r.path}: baselines.groups: multistage-heuristic needs the groups, "
                              f"e.g. groups: [[{r.names[0]}], [{', '.join(r.names[1:])}]]")
        return r.groups
    return None


def check_workdir(workdir: Path, inputs: list) -> None:
    """Refuse a WORKDIR that is protected (/, cwd, home), is, holds or lies inside an input, is not a
    directory, or is a non-empty directory that no pipeline run made (it has no pipeline.json).

    Raises:
        UnsafeOutputError, ConfigError: before anything is written.
    """
    from cpift.errors import UnsafeOutputError

    check_not_protected(workdir, what="WORKDIR")
    check_inputs(workdir, inputs, what="WORKDIR")
    if os.path.lexists(workdir) and (workdir.is_symlink() or not workdir.is_dir()):
        raise UnsafeOutputError(f"{workdir}: the WORKDIR exists and is not a directory; choose a new -o WORKDIR")
    if workdir.is_dir() and not (workdir / "pipeline.json").is_file() and any(workdir.iterdir()):
        raise UnsafeOutputError(f"{workdir}: not a pipeline WORKDIR (no pipeline.json) and not empty; "
                                f"choose a new -o WORKDIR")
    if not workdir.parent.exists():
        raise ConfigError(f"{workdir.parent}: parent directory of the WORKDIR does not exist")


def _claim(workdir: Path, stamp: dict) -> None:
    """Record what this WORKDIR is for, or refuse a rerun whose recipe or method differ."""
    path = workdir / "pipeline.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != stamp:
            diff = sorted(k for k in {**old, **stamp} if old.get(k) != stamp.get(k))
            inner = [k for k in {**old["recipe"], **stamp["recipe"]}
                     if old["recipe"].get(k) != stamp["recipe"].get(k)] if "recipe" in diff else []
            raise ConfigError(f"{workdir}: made by another run (differs in {', '.join(inner or diff)}); resume "
                              f"with the same recipe and options, or choose a new -o WORKDIR")
        return
    workdir.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(stamp, indent=2) + "\n")


def claim_workdir(recipe: Recipe, workdir: str | os.PathLike, *, method: str) -> Path:
    """Check ``workdir`` (check_workdir) and record in its pipeline.json what it is for, as run_pipeline
    does first; a caller may then seed it with finished step outputs (the seesaw benchmark links shared
    probes into several WORKDIRs) before run_pipeline resumes it.

    Raises:
        UnsafeOutputError, ConfigError: the WORKDIR cannot be used; nothing written.
    """
    wd = Path(workdir)
    check_workdir(wd, [recipe.path, recipe.base, *(f for t in recipe.tasks for f in (t.train, t.eval))])
    _claim(wd, {"method": method, "recipe": recipe.to_json()})
    return wd


def run_pipeline(recipe: str | os.PathLike | Recipe, workdir: str | os.PathLike, *, method: str = "cpi-ft",
                 stages: int | None = None, seed: int | None = None, device: str | None = None,
                 progress: bool = False, log: Callable[[str], None] | None = None, fsdp: bool = False) -> dict:
    """Run CPI-FT or a baseline into ``workdir``, skipping the steps a previous run finished.

    Args:
        recipe: recipe file (training/recipe.py) or a loaded Recipe.
        workdir: directory of every step's output and the report; created if absent.
        method: one of METHODS.
        stages: K of multistage-random (default: the recipe's baselines.stages).
        seed: replaces the recipe's seed (SFT data order, stage order, calibration sample, random split).
        device: of every SFT and eval (default CUDA when available); merges run on the CPU.
        progress: tqdm bars of the inner steps.
        log: called with one line per step (done or skipped); on rank 0 only under torchrun.
        fsdp: every SFT step shards the model with FSDP2 (``sft(fsdp=True)``). Under torchrun each SFT
            step runs on every process (DDP or FSDP2) and the other steps on rank 0 alone.

    Returns:
        The report (also written to workdir/report.json and report.md).

    Raises:
        ConfigError, ParameterError, DataError, CheckpointError, OutputError; recipe and data errors
        before anything is written.

    Example:
        >>> run_pipeline("recipe.yml", "runs/cpi", method="cpi-ft")["tasks"]["math"]["exact_match"]
    """
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if method not in METHODS:
        raise ParameterError(f"method: expected one of {', '.join(METHODS)}, got '{method}'")
    if stages is not None:
        if not 1 <= stages <= len(r.tasks):
            raise ParameterError(f"stages: {stages} stages cannot split {len(r.tasks)} tasks (use 1..{len(r.tasks)})")
        r.stages = stages
    if seed is not None:
        r.seed = seed
    plan = _stage_plan(r, method)
    calibration_n = _check_data(r)
    from .evaluate import pick_device
    from .shard import dist_env, init_group

    world, rank, local_rank = dist_env()
    dev = pick_device(device)
    if world > 1 and dev.type == "cuda":
        import torch

        torch.cuda.set_device(local_rank)
    own_group = init_group(dev, world) if world > 1 else False
    try:
        ranks = Ranks(world, rank)
        log = (log or (lambda line: None)) if ranks.leader else (lambda line: None)
        ranks.leader_runs("WORKDIR", lambda: claim_workdir(r, workdir, method=method))
        run = _Run(r, Path(workdir), device=device, progress=progress and ranks.leader, log=log, ranks=ranks,
                   fsdp=fsdp)
        final, plan = _run_method(run, r, method, plan, calibration_n)
        return _report(run, r, method, plan, final, calibration_n)
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run_method(run: _Run, r: Recipe, method: str, plan, calibration_n: int) -> tuple[Path, list | None]:
    """The method's steps, then the evaluation of its final model: (final model, stage plan)."""
    wd, device, progress = run.wd, run.device, run.progress
    if method == "cpi-ft":
        final, plan = _cpi_ft(run, r, calibration_n)
    elif plan is not None:
        final = run.staged(r.base, plan, "stages", r.train, masks=None, final=True)
    else:
        probes = run.probes()
        models = [probes[n] for n in r.names]
        out = wd / "merged"
        from cpift.merge.methods import task_arithmetic, ties

        if method == "task-arithmetic":
            fn = lambda: task_arithmetic(r.base, models, out, lam=r.ta_lam, progress=progress)  # noqa: E731
        else:
            fn = lambda: ties(r.base, models, out, density=r.ties_density, lam=r.ties_lam, progress=progress)  # noqa: E731
        final = run.step("merge", out, fn)

    from .evaluate import evaluate

    def evaluate_all() -> None:
        scores = {t.name: evaluate(final, t.eval, device=device, progress=progress, **r.eval) for t in r.tasks}
        _write_atomic(wd / "eval.json", json.dumps(scores, indent=2) + "\n")

    run.step("eval", wd / "eval.json", evaluate_all)
    return final, plan


def _cpi_ft(run: _Run, r: Recipe, calibration_n: int) -> tuple[Path, list[list[str]]]:
    from cpift.merge.cpi.cluster import cluster_masks, write_json
    from cpift.merge.cpi.cores import compute_cores
    from cpift.merge.cpi.fuse import fuse

    wd = run.wd
    probes = run.probes()
    cores = wd / "cores"
    def find_cores() -> None:
        found = compute_cores(r.base, [(n, probes[n]) for n in r.names], cores, p=r.p, granularity=r.granularity,
                              progress=run.progress)
        for warning in found.warnings():  # probes saved in a rounding dtype (intermediate_dtype)
            run.log(warning)

    run.step("cores", cores, find_cores)
    masks = {n: cores / f"{n}.safetensors" for n in r.names}
    cluster = wd / "cluster.json"
    run.step("cluster", cluster, lambda: write_json(
        cluster_masks([masks[n] for n in r.names], tau=r.tau, order=r.order, seed=r.seed, names=r.names), cluster))
    found = json.loads(cluster.read_text())
    plan = [found["groups"][g] for g in found["order"]]
    backbone = run.staged(r.base, plan, "stages", r.train, masks=masks)
    fused = wd / "fused"
    run.step("fuse", fused, lambda: fuse(backbone, [(n, probes[n], masks[n]) for g in plan for n in g], fused,
                                         overlap=r.overlap, base=r.base if r.overlap == "largest" else None,
                                         omega=r.omega, progress=run.progress))
    final = run.staged(fused, plan, "calibrated", r.calibration, masks=masks, sample=calibration_n,
                       mixed=r.calibration["data"] == "mixed", final=True)
    return final, plan


def _report(run: _Run, r: Recipe, method: str, plan, final: Path, calibration_n: int) -> dict:
    scores = json.loads((run.wd / "eval.json").read_text())
    n = len(scores)
    report = {"method": method, "recipe": str(r.path), "final_model": str(final.relative_to(run.wd)),
              "stages": plan, "tasks": scores,
              "mean": {"loss": sum(s["loss"] for s in scores.values()) / n,
                       "exact_match": sum(s["exact_match"] for s in scores.values()) / n},
              "optimizer_steps": sum(s["optimizer_steps"] for s in run.done),
              "wall_seconds": round(sum(s["seconds"] for s in run.done), 3),
              "steps": run.done, "settings": {**r.to_json(), "calibration_examples_per_task": calibration_n}}
    if not run.ranks.leader:
        return report
    _write_atomic(run.wd / "report.json", json.dumps(report, indent=2) + "\n")
    md = [f"# {method} on {', '.join(r.names)}", "",
          f"Base `{r.base}`, recipe `{r.path}`, seed {r.seed}; final model `{report['final_model']}`.", ""]
    if plan:
        md += ["Stages: " + " → ".join("{" + ", ".join(g) + "}" for g in plan), ""]
    md += ["| task | eval loss | exact match | n |", "|---|---:|---:|---:|"]
    md += [f"| {k} | {v['loss']:.4f} | {v['exact_match']:.3f} | {v['n']} |" for k, v in scores.items()]
    md += [f"| **mean** | {report['mean']['loss']:.4f} | {report['mean']['exact_match']:.3f} | |", "",
           "| step | seconds | optimizer steps | resumed |", "|---|---:|---:|---|"]
    md += [f"| {s['step']} | {s['seconds']:.1f} | {s['optimizer_steps']} | {'yes' if s['resumed'] else ''} |"
           for s in run.done]
    md += [f"| **total** | {report['wall_seconds']:.1f} | {report['optimizer_steps']} | |"]
    _write_atomic(run.wd / "report.md", "\n".join(md) + "\n")
    return report
