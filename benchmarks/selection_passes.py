"""Bytes the exact per-tensor selection reads, measured: radix select (two histogram passes and a tie
pass) against the one-pass bracket select of the cpu backend (kernels/_select_cpu.py).

    python benchmarks/selection_passes.py [--preset small] [--method ties] [--tasks 2]

Builds base + TASKS synthetic fine-tunes (merge/tools/synthetic.py), runs the merge in this process on
the cpu backend twice, radix only (``BRACKET_BUDGET = 0``) and as shipped, with every selection kernel
wrapped to add the input bytes it reads (x and base of each call), and checks that both outputs are
byte-identical. The combine's own traffic (each input read once, the output written once) is the same
in both and is added from the algorithm. Results: benchmarks/results/selection_passes.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import cpift
import cpift.kernels._scores_cpu as scores_cpu
import cpift.kernels._select_cpu as select_cpu
import cpift.kernels.select as select
from cpift.merge.tools.synthetic import PRESETS, make_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"


def counted(module, name: str, passes: dict, key: str, nbytes) -> None:
    """Wrap module.name so each call adds nbytes(args) to passes[key] and counts the call."""
    inner = getattr(module, name)

    def wrapper(*args, **kw):
        passes[key]["bytes"] += nbytes(*args)
        passes[key]["calls"] += 1
        return inner(*args, **kw)

    setattr(module, name, wrapper)


def pair_bytes(x: torch.Tensor, base: torch.Tensor | None, *_) -> int:
    return x.numel() * x.element_size() + (0 if base is None else base.numel() * base.element_size())


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def run(models: list[Path], out: Path, method: str, budget: int) -> dict:
    passes = {k: {"bytes": 0, "calls": 0} for k in ("histogram", "tie", "bracket")}
    originals = (scores_cpu.score_cpu, select_cpu.tie_index_cpu, select_cpu.bracket_select_cpu, select.BRACKET_BUDGET)
    counted(scores_cpu, "score_cpu", passes, "histogram", pair_bytes)
    counted(select_cpu, "tie_index_cpu", passes, "tie", pair_bytes)
    counted(select_cpu, "bracket_select_cpu", passes, "bracket", pair_bytes)
    select.BRACKET_BUDGET = budget
    try:
        t = time.perf_counter()
        result = getattr(cpift, method)(models[0], models[1:], out, density=0.3, progress=False, backend="cpu")
        seconds = time.perf_counter() - t
    finally:
        scores_cpu.score_cpu, select_cpu.tie_index_cpu, select_cpu.bracket_select_cpu, select.BRACKET_BUDGET = originals
    return {"passes": passes, "seconds": seconds, "bytes_written": result.bytes_written, "digest": digest(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--method", default="ties", choices=["ties", "breadcrumbs_ties", "breadcrumbs"])
    ap.add_argument("--tasks", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = [make_checkpoint(root / f"m{i}", PRESETS[args.preset], seed=i, base_seed=None if i == 0 else 0)
                  for i in range(args.tasks + 1)]
        run(models, root / "warm", args.method, 0)  # numba compiled and the files cached before timing
        rows = {name: run(models, root / name, args.method, budget)
                for name, budget in (("radix", 0), ("bracket", select.BRACKET_BUDGET))}
    assert rows["radix"]["digest"] == rows["bracket"]["digest"], "outputs differ"
    out_bytes = rows["radix"]["bytes_written"]
    combine = (args.tasks + 1) * out_bytes + out_bytes  # each input read once, the output written once
    for r in rows.values():
        r["selection_bytes_per_output_byte"] = sum(p["bytes"] for p in r["passes"].values()) / out_bytes
        r["total_bytes_per_output_byte"] = r["selection_bytes_per_output_byte"] + combine / out_bytes
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "preset": args.preset,
            "method": args.method, "tasks": args.tasks, "cpus": os.cpu_count(), "loadavg": os.getloadavg()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "selection_passes.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Selection passes: {args.method}, base + {args.tasks}, preset {args.preset} ({meta['date']})", "",
             "Bytes read by the selection kernels (x and base of each call), per byte of output; the combine adds "
             f"{combine / out_bytes:.0f} (each input read once, the output written once). Outputs byte-identical. "
             f"Load average {', '.join(f'{x:.1f}' for x in meta['loadavg'])} on {meta['cpus']} CPUs.", "",
             "| selection | histogram passes | tie passes | one-pass brackets | selection B/B | total B/B | merge s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        p = r["passes"]
        lines.append(f"| {name} | {p['histogram']['calls']} | {p['tie']['calls']} | {p['bracket']['calls']} | "
                     f"{r['selection_bytes_per_output_byte']:.2f} | {r['total_bytes_per_output_byte']:.2f} | "
                     f"{r['seconds']:.2f} |")
    (RESULTS / "selection_passes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
