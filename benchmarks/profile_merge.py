"""Where a cpift command's time goes: cProfile of one run, grouped into the physical phases.

    python benchmarks/profile_merge.py --backend cpu --name ties -- \
        ties --base M/base M/task_a M/task_b --weights 1.0,0.5 --density 0.3 -o /tmp/out -q

Runs ``cpift-merge ARGS...`` in this process (``$CPIFT_BACKEND`` set to --backend, one warm-up run
first when --warm, so numba's compile and the page cache are out of the way), under cProfile, and
reports: wall seconds; user and system CPU seconds (system time is the kernel's: page faults, mmap,
copies into the page cache); minor and major page faults; and the profile's own time (tottime) per
phase: read (checkpoint/safetensors/mmap), compute (cpift kernels: torch ops or the compiled numba
loops, which cProfile sees as one call each), write (the shard writer, hashing), wait (the main
thread blocked on the prefetch or writer threads, whose own work cProfile does not see: the CPU
times and page faults count every thread), other; plus the top functions. The output directory is removed before each run; results go to
benchmarks/results/profile-NAME.{json,md}.
"""  # noqa: E501 - argparse prints this docstring raw (RawDescriptionHelpFormatter)

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# Where a function's own time belongs, by the file it is defined in (first match wins).
PHASES = (("wait", ("_thread.lock", "_thread.RLock", "threading.py")),  # on the prefetch/writer threads
          ("compute", ("/kernels/", "numba", "torch._C", "built-in method torch.", "torch/functional")),
          ("read", ("checkpoint.py", "safetensors", "mmap", "device.py", "stream")),
          ("write", ("writer.py", "resume.py", "_hashlib", "posix.write", "flush")))


def phase(key: tuple[str, int, str]) -> str:
    where = f"{key[0]}:{key[2]}"
    for name, marks in PHASES:
        if any(m in where for m in marks):
            return name
    return "other"


def run(argv: list[str], out: Path | None) -> None:
    from cpift.cli.merge_cli import main

    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    try:
        main(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            raise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="cpu", help="$CPIFT_BACKEND of the run (torch or cpu)")
    ap.add_argument("--name", required=True, help="results go to benchmarks/results/profile-NAME.{json,md}")
    ap.add_argument("--warm", action="store_true", help="run once unprofiled first (compile, page cache)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("argv", nargs=argparse.REMAINDER, help="-- then cpift-merge's arguments")
    args = ap.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    os.environ["CPIFT_BACKEND"] = args.backend
    out = Path(argv[argv.index("-o") + 1]) if "-o" in argv else None
    if args.warm:
        run(argv, out)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    prof = cProfile.Profile()
    prof.enable()
    run(argv, out)
    prof.disable()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    stats = pstats.Stats(prof).stats
    phases: dict[str, float] = {}
    for key, (_, _, own, _, _) in stats.items():
        phases[phase(key)] = phases.get(phase(key), 0.0) + own
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[: args.top]
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
              "backend": args.backend, "argv": argv, "wall_s": wall,
              "user_s": r1.ru_utime - r0.ru_utime, "system_s": r1.ru_stime - r0.ru_stime,
              "minor_faults": r1.ru_minflt - r0.ru_minflt, "major_faults": r1.ru_majflt - r0.ru_majflt,
              "phases_own_s": phases,
              "top": [{"function": f"{Path(k[0]).name}:{k[1]}({k[2]})", "calls": v[1], "own_s": v[2], "cum_s": v[3]}
                      for k, v in top]}
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"profile-{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Profile of `cpift-merge {' '.join(argv[:1])}` ({args.backend} backend, {result['date']})", "",
             f"{os.cpu_count()} CPUs. Wall {wall:.2f} s (under cProfile); CPU user {result['user_s']:.2f} s, system "
             f"{result['system_s']:.2f} s; {result['minor_faults']:,} minor and {result['major_faults']:,} major page "
             f"faults ({result['minor_faults'] * 4096 / 1e9:.2f} GB if 4 KiB each).", "",
             "| phase | own s |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in sorted(phases.items(), key=lambda kv: -kv[1])]
    lines += ["", "| function | calls | own s | cumulative s |", "|---|---|---|---|"]
    lines += [f"| `{t['function']}` | {t['calls']} | {t['own_s']:.2f} | {t['cum_s']:.2f} |" for t in result["top"]]
    (RESULTS / f"profile-{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
