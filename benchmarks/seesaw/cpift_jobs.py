"""Units of work of the CPI-FT seesaw benchmark (issue 25), each one resumable, run in a worker process.

Layout under WORK/lr{LR}/s{SEED}: ``probes/TASK`` (one SFT per task, float32), ``{method}`` (one
pipeline WORKDIR per method; probes linked in), ``replay``, ``lota`` (direct SFT runs), and
``scores/NAME.SPLIT.json``: {task: {exact_match, loss, n, hits}} scored by teacher-forced exact match
with per-item hits (``val``, ``test``, and ``cross`` for the attribute tasks: the other attribute's
answer as the reference, so a hit is cross-talk). Each recipe's own eval file is the validation
split (per item, teacher-forced), so every pipeline run reports its validation scores itself.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jobs

SPLITS_ENV = "CPIFT_SEESAW_SPLITS"  # a JSON file {task: {split: path}}, written by the driver


def set_splits(work: Path, files: dict[str, dict[str, Path]]) -> None:
    path = work / "splits.json"
    jobs.write_json(path, {t: {s: str(p) for s, p in fs.items()} for t, fs in files.items()})
    os.environ[SPLITS_ENV] = str(path)  # inherited by the spawned workers


def split_files() -> dict[str, dict[str, str]]:
    return json.loads(Path(os.environ[SPLITS_ENV]).read_text())


def recipe_for(recipe: str, seed: int):
    from cpift.training.recipe import load_recipe

    r = load_recipe(recipe)
    r.seed = seed
    return r


def score_file(sd: Path, name: str, split: str) -> Path:
    return sd / "scores" / f"{name}.{split}.json"


def _compact(result: dict) -> dict:
    return {"exact_match": result["exact_match"], "loss": result["loss"], "n": result["n"],
            "hits": [int(i["hit"]) for i in result["items"]]}


def ensure_score(sd: Path, name: str, model: Path, tasks: list[str], split: str, r) -> dict:
    """Teacher-forced EM of ``model`` per item on ``split`` of each task (cached in sd/scores)."""
    import torch

    from cpift.training.data import load_dataset
    from cpift.training.evaluate import evaluate_model, load_model, load_tokenizer

    out = score_file(sd, name, split)
    if out.exists():
        return json.loads(out.read_text())
    only = Path(os.environ[SPLITS_ENV]).with_name("cross_seeds.json")  # optional: ["s0"], a compute budget
    if split == "cross" and only.exists() and sd.name not in json.loads(only.read_text()):
        return {}  # cross-talk scored on the listed seeds only
    files = split_files()
    tasks = [t for t in tasks if split in files[t]]
    if not tasks:  # e.g. no cross-talk file for this task
        return {}
    tok = load_tokenizer(model)
    net, _ = load_model(model, torch.device(jobs.device()))  # once for every task
    res = {t: _compact(evaluate_model(net, tok, load_dataset(files[t][split], tok, max_length=r.eval["max_length"],
                                                             for_eval=True),
                                      batch_size=r.eval["batch_size"], progress=False, exact_match="teacher-forced",
                                      per_item=True)) for t in tasks}
    out.parent.mkdir(parents=True, exist_ok=True)
    jobs.write_json(out, res)
    return res


def _sft_options(section: dict) -> dict:
    return {k: v for k, v in section.items() if k not in ("steps", "steps_per_task", "examples", "data", "schedule")}


def ensure_probe(sd: Path, r, task: str) -> Path:
    """The seed's probe of ``task``: the pipeline's probe step (same call), trained once under a lock."""
    from cpift.training.sft import sft

    out = sd / "probes" / task
    out.parent.mkdir(parents=True, exist_ok=True)
    with jobs.lock(sd / f".probe-{task}.lock"):
        if not out.exists():
            t = next(x for x in r.tasks if x.name == task)
            sft(r.base, t.train, out, steps=r.probe["steps"], seed=r.seed, device=jobs.device(), progress=False,
                save_dtype=r.intermediate_dtype, **_sft_options(r.probe))
    return out


def run_probe(sd: str, recipe: str, seed: int, task: str, splits: list[str]) -> str:
    sd, r, start = Path(sd), recipe_for(recipe, seed), time.perf_counter()
    if all(score_file(sd, f"probe-{task}", s).exists() for s in splits):
        return f"{sd.name}/probe {task} {splits}: done before"
    probe = ensure_probe(sd, r, task)
    for split in splits:
        ensure_score(sd, f"probe-{task}", probe, [task], split, r)
    return f"{sd.name}/probe {task} {splits}: {time.perf_counter() - start:.0f} s"


def _val_from_pipeline(sd: Path, name: str, wd: Path) -> None:
    out = score_file(sd, name, "val")
    if not out.exists():
        ev = json.loads((wd / "eval.json").read_text())
        out.parent.mkdir(parents=True, exist_ok=True)
        jobs.write_json(out, {t: _compact(v) for t, v in ev.items()})


def _pipeline(sd: Path, recipe: str, r, wd: Path, method: str, probes: bool, seed: int) -> Path:
    with jobs.lock(sd / f".{wd.name}.lock"):
        if not (wd / "report.json").exists():
            if probes:
                jobs.claim(Path(recipe), wd, method, seed)
                for t in r.names:
                    jobs.link(ensure_probe(sd, r, t), wd / "probes" / t)
            jobs.pipeline(Path(recipe), wd, method, seed, sd.parent)
    return wd / json.loads((wd / "report.json").read_text())["final_model"]


def run_method(sd: str, recipe: str, seed: int, method: str, splits: list[str], name: str | None = None) -> str:
    """A pipeline method (full-sft, multistage-*, cpi-ft, task-arithmetic, ties) into sd/NAME, scored."""
    sd, r, start = Path(sd), recipe_for(recipe, seed), time.perf_counter()
    name = name or method
    final = _pipeline(sd, recipe, r, sd / name, method, method in ("cpi-ft", "task-arithmetic", "ties"), seed)
    _val_from_pipeline(sd, name, sd / name)
    for split in splits:
        ensure_score(sd, name, final, r.names, split, r)
    return f"{sd.name}/{name}: {time.perf_counter() - start:.0f} s"


def run_variant(sd: str, recipe: str, main_recipe: str, seed: int, name: str) -> str:
    """CPI-FT with one fuse setting changed (omega): probes, cores, cluster and stages linked from the
    seed's main CPI-FT run; the fusion and calibration run here. Validation only (selection)."""
    sd, r, start = Path(sd), recipe_for(recipe, seed), time.perf_counter()
    run_method(str(sd), main_recipe, seed, "cpi-ft", [])
    main, wd = sd / "cpi-ft", sd / name
    with jobs.lock(sd / f".{name}.lock"):
        if not (wd / "report.json").exists():
            n = len(json.loads((main / "report.json").read_text())["stages"])
            jobs.claim(Path(recipe), wd, "cpi-ft", seed)
            for rel in ["cores", "cluster.json", *(f"stages/{i}" for i in range(1, n + 1)),
                        *(f"probes/{t}" for t in r.names)]:
                jobs.link(main / rel, wd / rel)
            jobs.pipeline(Path(recipe), wd, "cpi-ft", seed, sd.parent)
    _val_from_pipeline(sd, name, wd)
    return f"{sd.name}/{name}: {time.perf_counter() - start:.0f} s"


def run_omega_choice(sd: str, main_recipe: str, seed: int, variants: dict[str, str]) -> str:
    """CPI-FT with omega chosen on validation among the main run (1/(k+1)) and ``variants``; test of the pick."""
    sd, r, start = Path(sd), recipe_for(main_recipe, seed), time.perf_counter()
    for name, recipe in variants.items():
        run_variant(str(sd), recipe, main_recipe, seed, name)
    run_method(str(sd), main_recipe, seed, "cpi-ft", ["test"])
    val = {n: json.loads(score_file(sd, n, "val").read_text()) for n in ["cpi-ft", *variants]}
    mean = {n: sum(v["exact_match"] for v in s.values()) / len(s) for n, s in val.items()}
    best = max(mean, key=lambda n: (mean[n], n == "cpi-ft"))
    out = score_file(sd, "cpi-ft-omega-val", "test")
    if not out.exists():
        wd = sd / best
        final = wd / json.loads((wd / "report.json").read_text())["final_model"]
        res = ensure_score(sd, best, final, r.names, "test", r)
        jobs.write_json(out, {**res, "_chosen": best, "_val_mean": mean})
    return f"{sd.name}/omega chosen on validation: {best} ({time.perf_counter() - start:.0f} s)"


def derived_masks(cores: Path, out: Path, names: list[str], fn) -> None:
    """Write, for each task's core mask, the mask ``fn(name, element_mask, seed_index)`` (same metadata)."""
    import torch

    from cpift.kernels.masks import pack_bits
    from cpift.merge.cpi.masks import load_core_mask, save_core_mask

    out.mkdir(parents=True, exist_ok=True)
    for i, task in enumerate(names):
        m = load_core_mask(cores / f"{task}.safetensors")
        packed, counts = {}, {}
        for k in m.names:
            e = fn(k, m.element_mask(k), i)
            packed[k], counts[k] = pack_bits(e.flatten().to(torch.bool)), int(e.sum())
        save_core_mask(out / f".{task}.safetensors.part", packed, m.shapes, granularity=m.granularity, p=m.p,
                       k=sum(counts.values()), threshold=m.threshold, counts=counts, base=m.base,
                       task={**m.task, "derived": True})
        os.replace(out / f".{task}.safetensors.part", out / f"{task}.safetensors")


def random_cores(cores: Path, wd: Path, recipe: str, r, seed: int) -> None:
    """wd/cores: each task's core in ``cores`` replaced by a random set of the same size in every tensor
    (seeded), written once under a lock into a claimed CPI-FT WORKDIR."""
    import torch

    with jobs.lock(wd.parent / f".{wd.name}-cores.lock"):
        if (wd / "cores").exists():
            return
        jobs.claim(Path(recipe), wd, "cpi-ft", seed)
        gen = torch.Generator().manual_seed(1000 + seed)

        def shuffled(_k, e, _i):
            flat = torch.zeros(e.numel(), dtype=torch.bool)
            flat[torch.randperm(e.numel(), generator=gen)[:int(e.sum())]] = True
            return flat.reshape(e.shape)

        derived_masks(cores, wd / ".cores.part", r.names, shuffled)
        os.replace(wd / ".cores.part", wd / "cores")


def run_random_core(sd: str, recipe: str, seed: int, splits: list[str]) -> str:
    """CPI-FT with each task's core replaced by a random set of the same size in every tensor."""
    sd, r, start = Path(sd), recipe_for(recipe, seed), time.perf_counter()
    run_method(str(sd), recipe, seed, "cpi-ft", [])
    random_cores(sd / "cpi-ft" / "cores", sd / "random-core", recipe, r, seed)
    run_method(str(sd), recipe, seed, "cpi-ft", splits, name="random-core")
    return f"{sd.name}/random-core: {time.perf_counter() - start:.0f} s"


def chain(start: Path, stages: list[tuple[Path, int]], out: Path, section: dict, seed: int, freeze: list,
           final_dtype: str) -> Path:
    """Sequential SFT runs (data, steps) from ``start`` into out/1..n, the last saved in ``final_dtype``."""
    from cpift.training.sft import sft

    model = start
    out.mkdir(parents=True, exist_ok=True)
    for s, (data, steps) in enumerate(stages, 1):
        nxt = out / str(s)
        if not nxt.exists():
            sft(model, data, nxt, steps=steps, seed=seed, device=jobs.device(), progress=False, freeze=freeze,
                save_dtype=final_dtype if s == len(stages) else "float32", **_sft_options(section))
        model = nxt
    return model


def run_replay(sd: str, recipe: str, seed: int, splits: list[str]) -> str:
    """Replay control: Full SFT, then the very calibration steps of the seed's CPI-FT (same data files,
    steps and settings, stage by stage), nothing frozen."""
    from cpift.training.pipeline import stored_dtype

    sd, r, start = Path(sd), recipe_for(recipe, seed), time.perf_counter()
    full = sd / "full-sft" / json.loads((sd / "full-sft" / "report.json").read_text())["final_model"]
    run_method(str(sd), recipe, seed, "cpi-ft", [])
    plan = json.loads((sd / "cpi-ft" / "report.json").read_text())["stages"]
    stages = [(sd / "cpi-ft" / "data" / f"calibrated-{s}.jsonl", len(g) * r.calibration["steps_per_task"])
              for s, g in enumerate(plan, 1)]
    with jobs.lock(sd / ".replay.lock"):
        final = chain(full, stages, sd / "replay", r.calibration, seed, [], stored_dtype(r.base))
    for split in splits:
        ensure_score(sd, "replay", final, r.names, split, r)
    return f"{sd.name}/replay: {time.perf_counter() - start:.0f} s"


def run_lota(sd: str, recipe: str, seed: int, splits: list[str]) -> str:
    """LoTA-style: Full SFT's data and steps with every entry outside the union of the CPI-FT cores frozen."""
    from cpift.training.pipeline import stored_dtype

    sd, r, start = Path(sd), recipe_for(recipe, seed), time.perf_counter()
    run_method(str(sd), recipe, seed, "cpi-ft", [])
    full = sd / "full-sft"
    steps = json.loads((full / "report.json").read_text())["optimizer_steps"]
    wd = sd / "lota"
    with jobs.lock(sd / ".lota.lock"):
        free = wd / "outside"
        if not (free / "union.safetensors").exists():
            union: dict = {}

            def outside(k, e, i):
                union[k] = e | union[k] if i else e
                return ~union[k]

            derived_masks(sd / "cpi-ft" / "cores", wd / ".outside", r.names, outside)
            os.replace(wd / ".outside" / f"{r.names[-1]}.safetensors", wd / f".{r.names[-1]}.tmp")
            free.mkdir(parents=True, exist_ok=True)
            os.replace(wd / f".{r.names[-1]}.tmp", free / "union.safetensors")
        final = chain(r.base, [(full / "data" / "stages-1.jsonl", steps)], wd / "sft", r.train, seed,
                       [free / "union.safetensors"], stored_dtype(r.base))
    for split in splits:
        ensure_score(sd, "lota", final, r.names, split, r)
    return f"{sd.name}/lota: {time.perf_counter() - start:.0f} s"


def run_phases(sd: str, recipe: str, seed: int) -> str:
    """CPI-FT after each phase on the test split: the staged backbone and the fused model (the probes and
    the calibrated model are scored by their own jobs)."""
    sd, r, start = Path(sd), recipe_for(recipe, seed), time.perf_counter()
    run_method(str(sd), recipe, seed, "cpi-ft", [])
    wd = sd / "cpi-ft"
    last = len(json.loads((wd / "report.json").read_text())["stages"])
    ensure_score(sd, "phase-staged", wd / "stages" / str(last), r.names, "test", r)
    ensure_score(sd, "phase-fused", wd / "fused", r.names, "test", r)
    return f"{sd.name}/phases: {time.perf_counter() - start:.0f} s"


def run_base(work: str, recipe: str, splits: list[str]) -> str:
    work, r, start = Path(work), recipe_for(recipe, 0), time.perf_counter()
    for split in splits:
        ensure_score(work, "base", r.base, r.names, split, r)
    return f"base {splits}: {time.perf_counter() - start:.0f} s"
