"""Benchmark of `cores` (global top-p% of |θ_task − θ_base|) against the read floor and the in-memory way.

Three ways, each in a fresh process (peak RSS = that process's ru_maxrss), alternating, on a warm
page cache:
  floor      one plain read pass over every byte of base + task (os.readv into a reused buffer)
  cpift      cpift.merge.cpi.cores.compute_cores (three streaming passes, radix select, packed masks)
  in-memory  Localize-and-Stitch's way: load both models, concatenate |Δ| in float32, torch.topk
Targets: cpift ≤ 2.5× the floor; cpift peak RSS ≤ 2 × largest tensor + 1 GB.

  python benchmarks/cores_bench.py --base bench-work/models-1b/base --task bench-work/models-1b/task_a
Writes benchmarks/results/cores.json and cores.md (--name: another file name; --backend: the kernels'
backend of the cpift way, default auto = the fused CPU kernels; --ways: a subset, e.g. floor,cpift).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def run_floor(base: Path, task: Path, p: float) -> dict:
    buf = bytearray(64 << 20)
    total = 0
    for f in _files(base) + _files(task):
        fd = os.open(f, os.O_RDONLY)
        try:
            while (got := os.readv(fd, [buf])) > 0:
                total += got
        finally:
            os.close(fd)
    return {"bytes": total}


def run_cpift(base: Path, task: Path, p: float) -> dict:
    from cpift.merge.cpi.cores import compute_cores

    with tempfile.TemporaryDirectory() as tmp:
        r = compute_cores(base, [("task", task)], Path(tmp) / "cores", p=p, progress=False, backend=_BACKEND)
    return {"k": r.tasks[0].k, "threshold": r.tasks[0].threshold, "entries": r.entries}


def run_in_memory(base: Path, task: Path, p: float) -> dict:
    import torch
    from safetensors.torch import load_file

    b, t = {}, {}
    for f in _files(base):
        b.update(load_file(str(f)))
    for f in _files(task):
        t.update(load_file(str(f)))
    names = sorted(n for n in b if b[n].is_floating_point())
    scores = torch.cat([(t[n].float() - b[n].float()).abs().reshape(-1) for n in names])
    k = int(p * scores.numel() // 100)
    values = torch.topk(scores, k, sorted=False).values
    return {"k": k, "threshold": float(values.min()), "entries": scores.numel()}


_BACKEND: str | None = None  # the child's --backend, for run_cpift
WAYS = {"floor": run_floor, "cpift": run_cpift, "in-memory": run_in_memory}


def _child(way: str, base: str, task: str, p: float, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    info = WAYS[way](Path(base), Path(task), p)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"way": way, "seconds": seconds, "peak_rss": rss, **info}))


def _measure(way: str, base: Path, task: Path, p: float, threads: int, backend: str | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", way, "--base", str(base), "--task", str(task),
                           "--p", str(p), "--threads", str(threads), *(["--backend", backend] if backend else [])],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"cores_bench: {way} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--task", type=Path, required=True)
    ap.add_argument("--p", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per way (default 1: on a shared machine torch's thread barriers stall "
                         "whenever another process holds a core, which would measure the neighbours, not the code)")
    ap.add_argument("--child", choices=list(WAYS), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="cores", help="results file name (NAME.json, NAME.md)")
    ap.add_argument("--backend", choices=["auto", "torch", "cpu"], default=None,
                    help="kernels' backend of the cpift way (default: auto, the fused CPU kernels with numba)")
    ap.add_argument("--ways", default=",".join(WAYS), help="comma-separated subset of " + ",".join(WAYS))
    args = ap.parse_args()
    ways = [w for w in WAYS if w in args.ways.split(",")]
    if args.child:
        global _BACKEND
        _BACKEND = args.backend
        _child(args.child, str(args.base), str(args.task), args.p, args.threads)
        return
    from cpift.merge.io.checkpoint import Checkpoint

    ck = Checkpoint(args.base)
    largest = max(ck.info(n).nbytes for n in ck.names())
    model_bytes = ck.nbytes
    ck.close()
    load_start = os.getloadavg()[0]
    _measure("floor", args.base, args.task, args.p, args.threads)  # warm the page cache
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    for _ in range(args.repeat):
        for way in ways:  # alternate, so drift hits every way alike
            runs[way].append(_measure(way, args.base, args.task, args.p, args.threads, args.backend))
            print(f"{way}: {runs[way][-1]['seconds']:.2f} s, peak RSS {runs[way][-1]['peak_rss'] / 1e9:.2f} GB",
                  file=sys.stderr)
    rows = {}
    for way, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        rows[way] = {"median_s": statistics.median(secs), "min_s": min(secs), "max_s": max(secs),
                     "peak_rss_bytes": max(r["peak_rss"] for r in rs),
                     **{k: rs[0][k] for k in ("k", "threshold", "entries") if k in rs[0]}}
    floor = rows["floor"]["median_s"]
    for r in rows.values():
        r["ratio_to_floor"] = r["median_s"] / floor
    if "in-memory" in rows:
        assert rows["cpift"]["k"] == rows["in-memory"]["k"] and \
            rows["cpift"]["threshold"] == rows["in-memory"]["threshold"], \
            "cpift and the in-memory top-k disagree on k or the threshold"
    budget = 2 * largest + 2**30
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
              "base": str(args.base), "task": str(args.task), "p": args.p, "model_bytes": model_bytes,
              "largest_tensor_bytes": largest, "rss_budget_bytes": budget, "repeat": args.repeat,
              "threads": args.threads, "backend": args.backend or "auto", "load_average_at_start": load_start,
              "load_average_at_end": os.getloadavg()[0], "ways": rows,
              "targets": {"cpift_ratio_to_floor<=2.5": rows["cpift"]["ratio_to_floor"] <= 2.5,
                          "cpift_rss<=2*largest+1GB": rows["cpift"]["peak_rss_bytes"] <= budget}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# cores benchmark ({report['date']}, {report['machine']})", "",
             f"Global top-{args.p}% of |task − base| over {rows['cpift']['entries']:,} entries "
             f"({model_bytes / 1e9:.2f} GB bf16 per model, largest tensor {largest / 1e9:.2f} GB); "
             f"median of {args.repeat} alternating runs, {args.threads} torch thread(s) each, kernels' backend "
             f"{report['backend']}, warm page cache; "
             f"load average {load_start:.1f} at the start, {report['load_average_at_end']:.1f} at the end "
             f"(other work shared the 2 cores).", "",
             "| way | median s | min–max s | × floor | peak RSS GB |", "|---|---|---|---|---|"]
    for way, r in rows.items():
        lines.append(f"| {way} | {r['median_s']:.2f} | {r['min_s']:.2f}–{r['max_s']:.2f} | {r['ratio_to_floor']:.2f} | "
                     f"{r['peak_rss_bytes'] / 1e9:.2f} |")
    lines += ["", f"Targets: cpift ≤ 2.5× floor: **{report['targets']['cpift_ratio_to_floor<=2.5']}**; "
                  f"cpift peak RSS ≤ 2 × largest tensor + 1 GiB = {budget / 1e9:.2f} GB: "
                  f"**{report['targets']['cpift_rss<=2*largest+1GB']}**."
              + (" k and threshold agree with torch.topk." if "in-memory" in rows else ""), ""]
    (args.out / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
