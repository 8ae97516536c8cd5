"""What a user waits for before ``--help`` or a refusal of bad input: median wall time of fresh processes.

    python benchmarks/startup_bench.py [--repeat 7]

Each case runs ``python -m cpift.cli.merge_cli ARGS`` as a new process (the interpreter's own start-up
included, as a user pays it), ``--repeat`` times, one after another; it reports the median, the
fastest and whether torch was imported (``-X importtime``, one extra run). Python's own start-up
(``python -c pass``) is measured beside them, so the share that is cpift's shows. The inputs are tiny
safetensors files written without torch. ``--baseline-src`` runs an earlier cpift's ``src/`` (from
``git archive``) interleaved with this one. Results: benchmarks/results/startup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CLI = [sys.executable, "-m", "cpift.cli.merge_cli"]


def write_model(path: Path, shapes: dict[str, list[int]]) -> None:
    """A float32 safetensors file holding ones, written without torch."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + b"\0" * offset)


def cases(d: Path) -> dict[str, list[str]]:
    write_model(d / "a", {"w": [8, 4], "v": [5]})
    write_model(d / "b", {"w": [8, 4], "v": [5]})
    write_model(d / "wide", {"w": [8, 5], "v": [5]})
    (d / "bad" / "model.safetensors").parent.mkdir()
    (d / "bad" / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{not json}......")
    (d / "bad.yml").write_text("merge_method: slerp\nmodels: [\n")
    out = str(d / "out")
    return {
        "python -c pass": [],
        "--help": ["--help"],
        "slerp --help": ["slerp", "--help"],
        "missing model": ["slerp", str(d / "a"), str(d / "missing"), "-o", out],
        "bad safetensors header": ["slerp", str(d / "a"), str(d / "bad"), "-o", out],
        "shape mismatch": ["slerp", str(d / "a"), str(d / "wide"), "-o", out],
        "t out of range": ["slerp", str(d / "a"), str(d / "b"), "--t", "7", "-o", out],
        "bad YAML": ["config", str(d / "bad.yml"), "-o", out],
    }


def env_for(src: str | None) -> dict[str, str] | None:
    return None if src is None else {**os.environ, "PYTHONPATH": src}


def timed(argv: list[str], src: str | None = None) -> float:
    cmd = [sys.executable, "-c", "pass"] if not argv else CLI + argv
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=False, env=env_for(src))
    return time.perf_counter() - t


def imports_torch(argv: list[str], src: str | None = None) -> bool:
    if not argv:
        return False
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "cpift.cli.merge_cli", *argv],
                         capture_output=True, text=True, check=False, env=env_for(src))
    return any(line.rstrip().endswith("| torch") or line.rstrip().endswith(" torch")
               for line in run.stderr.splitlines() if line.startswith("import time:"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--note", default="", help="Conditions to record (e.g. another benchmark was running).")
    ap.add_argument("--baseline-src", default=None,
                    help="A src/ directory of an earlier cpift (git archive), run interleaved with this one.")
    args = ap.parse_args()
    rows = []
    sources = {"this": None, **({"baseline": args.baseline_src} if args.baseline_src else {})}
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in cases(Path(tmp)).items():
            times: dict[str, list[float]] = {k: [] for k in sources}
            for _ in range(args.repeat):  # interleaved: a change in the machine's load hits both alike
                for k, src in sources.items():
                    times[k].append(timed(argv, src))
            for k, src in sources.items():
                rows.append({"case": name, "code": k, "median_s": statistics.median(times[k]), "min_s": min(times[k]),
                             "torch_imported": imports_torch(argv, src), "repeat": args.repeat})
                print(f"{name:24s} {k:8s} median {rows[-1]['median_s']:.3f} s  min {rows[-1]['min_s']:.3f} s  "
                      f"torch imported: {rows[-1]['torch_imported']}", flush=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "note": args.note}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Start-up: --help and refusals of bad input ({meta['date']})", "",
             f"Fresh process per run, median of {args.repeat}; {meta['cpus']} CPUs, load average "
             f"{', '.join(f'{x:.1f}' for x in meta['loadavg'])} at the end. {args.note}".rstrip(), "",
             "| case | code | median s | min s | torch imported |", "|---|---|---:|---:|---|"]
    lines += [f"| {r['case']} | {r['code']} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
              f"{'yes' if r['torch_imported'] else 'no'} |" for r in rows]
    (RESULTS / "startup.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
