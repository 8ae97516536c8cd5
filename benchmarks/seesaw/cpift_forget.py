"""Table 2 of the CPI-FT seesaw benchmark (issue 25): forgetting when task A is trained, then task B.

Every row starts from the same model trained on A (stage 1 of the CPI-FT run below) and sees B for the
same S steps; each is scored per item on A's and B's test split:

- ``sequential``: B with every parameter free (Full SFT, A then B);
- ``frozen-core``: B with A's core frozen (CPI-FT's stage 2);
- ``cpi-ft``: the whole CPI-FT pipeline on [A], [B] (τ = 1, the given order): stages, fusion, calibration;
- ``replay``: ``sequential`` then the very calibration steps of ``cpi-ft`` (same mixed data), nothing frozen;
- ``random-core``: ``cpi-ft`` with each core replaced by a random set of the same size in every tensor;
- ``lota``: B trained only inside B's core (LoTA-style), everything else frozen;
- ``task-arithmetic`` and ``ties``: the merges of the two probes (no order).

The drop on A is after-A's EM on A minus the row's, paired per item; intervals as in cpift_report.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cpift_jobs as cj
import jobs
import numpy as np

ROWS = ["sequential", "frozen-core", "cpi-ft", "replay", "random-core", "lota", "task-arithmetic", "ties"]
LABELS = {"sequential": "Sequential Full SFT (A then B)", "frozen-core": "A's core frozen during B",
          "cpi-ft": "CPI-FT", "replay": "Replay control (sequential + calibration)",
          "random-core": "Random-core control", "lota": "LoTA-style (B inside B's core)",
          "task-arithmetic": "Task arithmetic of the probes", "ties": "TIES of the probes"}


def _final(wd: Path) -> Path:
    return wd / json.loads((wd / "report.json").read_text())["final_model"]


def _cpi(sd: Path, recipe: str, r, seed: int) -> Path:
    wd = sd / "forget-cpi-ft"
    cj.run_method(str(sd), recipe, seed, "cpi-ft", [], name=wd.name)
    plan = json.loads((wd / "report.json").read_text())["stages"]
    if plan != [[n] for n in r.names]:
        raise RuntimeError(f"forgetting: expected the stages {[[n] for n in r.names]} from τ = 1, got {plan}")
    return wd


def _sequential(sd: Path, recipe: str, cpi: Path, seed: int) -> Path:
    wd = sd / "forget-sequential"
    with jobs.lock(sd / f".{wd.name}.lock"):
        if not (wd / "report.json").exists():
            jobs.claim(Path(recipe), wd, "multistage-heuristic", seed)
            jobs.link(cpi / "stages" / "1", wd / "stages" / "1")  # stage 1 is the same run: nothing frozen
            jobs.pipeline(Path(recipe), wd, "multistage-heuristic", seed, sd.parent)
    return _final(wd)


def _random_core(sd: Path, recipe: str, r, cpi: Path, seed: int) -> Path:
    wd = sd / "forget-random-core"
    cj.random_cores(cpi / "cores", wd, recipe, r, seed)
    jobs.link(cpi / "stages" / "1", wd / "stages" / "1")  # nothing is frozen in stage 1
    cj.run_method(str(sd), recipe, seed, "cpi-ft", [], name=wd.name)
    return _final(wd)


def _lota(sd: Path, r, cpi: Path, seed: int) -> Path:
    from cpift.training.pipeline import stored_dtype

    a, b = r.names
    wd = sd / "forget-lota"
    with jobs.lock(sd / f".{wd.name}.lock"):
        if not (wd / "outside" / f"{b}.safetensors").exists():
            cj.derived_masks(cpi / "cores", wd / ".outside", [b], lambda _k, e, _i: ~e)
            os.replace(wd / ".outside", wd / "outside")
        train = next(t.train for t in r.tasks if t.name == b)
        return cj.chain(cpi / "stages" / "1", [(train, r.train["steps_per_task"])], wd / "sft", r.train, seed,
                        [wd / "outside" / f"{b}.safetensors"], stored_dtype(r.base))


def run_forgetting(sd: str, recipe: str, seed: int) -> str:
    """Every row of Table 2 for one seed (resumable), scored on A's and B's test split."""
    from cpift.training.pipeline import stored_dtype

    sd, r, start = Path(sd), cj.recipe_for(recipe, seed), time.perf_counter()
    cpi = _cpi(sd, recipe, r, seed)
    seq = _sequential(sd, recipe, cpi, seed)
    plan = json.loads((cpi / "report.json").read_text())["stages"]
    cal = [(cpi / "data" / f"calibrated-{s}.jsonl", len(g) * r.calibration["steps_per_task"])
           for s, g in enumerate(plan, 1)]
    with jobs.lock(sd / ".forget-replay.lock"):
        replay = cj.chain(seq, cal, sd / "forget-replay", r.calibration, seed, [], stored_dtype(r.base))
    models = {"after-a": cpi / "stages" / "1", "sequential": seq, "frozen-core": cpi / "stages" / "2",
              "cpi-ft": _final(cpi), "replay": replay, "random-core": _random_core(sd, recipe, r, cpi, seed),
              "lota": _lota(sd, r, cpi, seed)}
    for m in ("task-arithmetic", "ties"):
        cj.run_method(str(sd), recipe, seed, m, [], name=f"forget-{m}")
        models[m] = _final(sd / f"forget-{m}")
    for name, model in models.items():
        cj.ensure_score(sd, f"forget-{name}", model, r.names, "test", r)
    return f"{sd.name}/forgetting: {time.perf_counter() - start:.0f} s"


def table(root: Path, seeds: list[int], tasks: list[str], paired) -> dict:
    """Per row: EM on A and B, the drop on A (paired against after-A), its difference from sequential's."""
    a, b = tasks

    def hits(name: str) -> dict[int, dict[str, np.ndarray]]:
        out = {}
        for s in seeds:
            f = root / f"s{s}" / "scores" / f"forget-{name}.test.json"
            if f.exists():
                d = json.loads(f.read_text())
                out[s] = {t: np.array(d[t]["hits"], dtype=float) for t in tasks}
        return out

    after, seq = hits("after-a"), hits("sequential")
    if not after:
        return {}
    res = {"A": a, "B": b, "after_a": {t: float(np.mean([h[t].mean() for h in after.values()])) for t in tasks},
           "rows": {}}
    for m in ROWS:
        h = hits(m)
        if not h:
            continue
        drop = paired(after, h, [a])
        res["rows"][m] = {"seeds": sorted(h), "em": {t: float(np.mean([x[t].mean() for x in h.values()]))
                                                     for t in tasks},
                          "drop_a": drop["tasks"][a],
                          "vs_sequential": paired(h, seq, [a])["tasks"][a] if m != "sequential" and seq else None}
    return res


def _ci(x: dict) -> str:
    return f"{x['diff']:+.3f} [{x['ci'][0]:+.3f}, {x['ci'][1]:+.3f}]"


def markdown(fg: dict) -> list[str]:
    if not fg:
        return ["## Table 2: forgetting (A then B)", "", "Not run at this scale in this round.", ""]
    md = [f"## Table 2: forgetting ({fg['A']} then {fg['B']}; test EM; intervals paired per item, over seeds)", "",
          f"After A: {fg['A']} {fg['after_a'][fg['A']]:.3f}, {fg['B']} {fg['after_a'][fg['B']]:.3f}.", "",
          f"| method | seeds | {fg['A']} EM | {fg['B']} EM | drop on A [95% CI] | less drop than sequential [95% CI] |",
          "|---|---|---:|---:|---|---|"]
    for m, x in fg["rows"].items():
        vs = x["vs_sequential"]
        md.append(f"| {LABELS[m]} | {x['seeds']} | {x['em'][fg['A']]:.3f} | {x['em'][fg['B']]:.3f} | "
                  f"{_ci(x['drop_a'])} | {_ci(vs) if vs else ''} |")
    return md + [""]
