"""The SmolLM2 protocol's own units of work (beside jobs.py's methods and forgetting runs).

- ``time_steps``: a few timed SFT steps, run first, from which every phase is sized.
- ``run_base_eval``: the base scored on every task (the floor of the normalized score).
- ``run_gate``: the localization gate for one core size p: each probe's top-p% core transplanted into
  the base alone, the probe with its core reset to the base, the share of ‖δ‖² the core holds, where
  it lies by kind, and the pairwise Jaccard of the cores against the random-set expectation.
- ``run_variant``: a CPI-FT variant (another omega, calibration on the group only) that reuses every
  step of the seed's main CPI-FT run before the one it changes, linked, so only what differs runs.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import jobs


def time_steps(base: str, train: str, out: str, steps: int, batch: int, max_length: int) -> dict:
    """Seconds per optimizer step of ``steps`` SFT steps on ``train`` (one worker's settings)."""
    from cpift.training.sft import sft

    start = time.perf_counter()
    r = sft(base, train, out, steps=steps, lr=1e-5, batch_size=batch, max_length=max_length, progress=False,
            device=jobs.device())
    return {"steps": steps, "seconds_per_step": r.seconds / steps, "tokens_per_step": r.tokens / steps,
            "with_load_and_save": time.perf_counter() - start}


def run_base_eval(work: str, recipe: str) -> str:
    work, recipe = Path(work), Path(recipe)
    out = work / "base_eval.json"
    with jobs.lock(work / ".base_eval.lock"):
        if out.exists():
            return "base eval: done before"
        start = time.perf_counter()
        import yaml

        r = yaml.safe_load(recipe.read_text())
        base = (recipe.parent / r["base"]).resolve()
        scores = jobs.score(base, recipe)
        jobs.write_json(work / "base_eval_seconds.json", {"seconds": time.perf_counter() - start, "tasks": len(scores)})
        jobs.write_json(out, scores)
    return f"base eval: {time.perf_counter() - start:.0f} s"


def gaussian_share(p: float) -> float:
    """Share of Σδ² in the top p% of |δ| when δ is Gaussian: the no-localization reference."""
    z = statistics.NormalDist().inv_cdf(1 - p / 200)
    return 2 * (z * math.exp(-z * z / 2) / math.sqrt(2 * math.pi) + p / 200)


def run_gate(work: str, main_recipe: str, seed: int, p: float) -> str:
    import torch
    from safetensors.torch import load_file

    from cpift.merge.cpi.cluster import jaccard_matrix
    from cpift.merge.cpi.cores import KINDS, compute_cores, tensor_kind
    from cpift.merge.cpi.masks import load_core_mask
    from cpift.training.data import load_dataset
    from cpift.training.evaluate import evaluate_model, load_model, load_tokenizer

    work, recipe = Path(work), Path(main_recipe)
    sd = work / f"s{seed}"
    out = sd / "gate" / f"p{p:g}.json"
    if out.exists():
        return f"s{seed}/gate p={p:g}: done before"
    start = time.perf_counter()
    probes = jobs.ensure_probes(work, recipe, seed)
    tasks = jobs.tasks_of(recipe)
    names = [t["name"] for t in tasks]
    import yaml

    base_dir = (recipe.parent / yaml.safe_load(recipe.read_text())["base"]).resolve()
    cores = sd / "gate" / f"cores-p{p:g}"
    if not cores.exists():
        cores.parent.mkdir(parents=True, exist_ok=True)
        compute_cores(base_dir, [(n, probes / n) for n in names], cores, p=p, progress=False)
    masks = {n: load_core_mask(cores / f"{n}.safetensors") for n in names}
    theta0 = {k: v.float() for k, v in load_file(str(base_dir / "model.safetensors")).items()}
    sizes: dict[str, int] = {}
    for k, v in theta0.items():
        sizes[tensor_kind(k)] = sizes.get(tensor_kind(k), 0) + v.numel()
    total = sum(sizes.values())
    tok = load_tokenizer(base_dir)
    net, _ = load_model(base_dir, torch.device(jobs.device()))
    result: dict = {"p": p, "entries": total, "entries_by_kind": sizes, "gaussian_share": gaussian_share(p),
                    "tasks": {}}
    for t in tasks:
        name, mask = t["name"], masks[t["name"]]
        probe = {k: v.float() for k, v in load_file(str(probes / name / "model.safetensors")).items()}
        sq = inside = norm0 = 0.0
        moved = 0
        for k in theta0:
            d = probe[k] - theta0[k]
            sq += float(d.double().square().sum())
            norm0 += float(theta0[k].double().square().sum())
            moved += int((d.abs() > 1e-3).sum())
            if k in mask.shapes:
                inside += float(d[mask.element_mask(k)].double().square().sum())
        data = load_dataset(recipe.parent / t["eval"], tok, max_length=jobs.eval_options(recipe)["max_length"],
                            for_eval=True)
        scores = {}
        for variant, (core_from, rest_from) in {"core_only": (probe, theta0), "without_core": (theta0, probe)}.items():
            state = {k: torch.where(mask.element_mask(k), core_from[k], rest_from[k]) if k in mask.shapes
                     else rest_from[k] for k in theta0}
            net.load_state_dict(state, strict=False)
            scores[variant] = evaluate_model(net, tok, data, batch_size=jobs.eval_options(recipe)["batch_size"],
                                             progress=False)
        kinds = {k: 0 for k in KINDS}
        for k, c in mask.counts.items():
            kinds[tensor_kind(k)] += c
        k_total = max(1, sum(kinds.values()))
        result["tasks"][name] = {**scores, "share_of_delta_sq": inside / sq if sq else None,
                                 "delta_rel_norm": math.sqrt(sq / norm0), "moved_1e-3": moved / total,
                                 "where": {k: c / k_total for k, c in kinds.items() if sizes.get(k)},
                                 "core_entries": k_total}
    jac = jaccard_matrix([masks[n] for n in names])
    result["jaccard"] = {"tasks": names, "matrix": jac, "random": p / (200 - p)}
    jobs.write_json(out, result)
    return f"s{seed}/gate p={p:g}: {time.perf_counter() - start:.0f} s"


def run_variant(work: str, main_recipe: str, recipe: str, seed: int, name: str, reuse: list[str]) -> str:
    """CPI-FT with ``recipe`` (one setting changed), linking the main run's ``reuse`` outputs (cores,
    cluster.json, fused, stages) and the seed's probes; the steps that differ run here."""
    work, recipe = Path(work), Path(recipe)
    start = time.perf_counter()
    jobs.run_method(str(work), main_recipe, seed, "cpi-ft")  # done before, or waits for it / runs it
    main = work / f"s{seed}" / "cpi-ft"
    wd = work / f"s{seed}" / f"var-{name}"
    if not (wd / "report.json").exists():
        n = len(json.loads((main / "report.json").read_text())["stages"])
        jobs.claim(recipe, wd, "cpi-ft", seed)
        rels = [f"stages/{i}" for i in range(1, n + 1)] if "stages" in reuse else []
        rels += [r for r in reuse if r != "stages"] + [f"probes/{t['name']}" for t in jobs.tasks_of(recipe)]
        for rel in rels:
            jobs.link(main / rel, wd / rel)
        jobs.pipeline(recipe, wd, "cpi-ft", seed, work)
    return f"s{seed}/var-{name}: {time.perf_counter() - start:.0f} s"
