"""Byte-identical outputs across a change: the same merges run with two source trees, their tensor files hashed.

    python benchmarks/same_outputs.py --before /tmp/old/src --synthetic small --out benchmarks/results/same-outputs.json

`--before` is the `src` directory of the earlier tree (e.g. `git archive REV src | tar -x -C /tmp/old`);
the current tree is this checkout's `src`. Each merge runs as `cpift-merge ...` in a fresh process on the
given backend; the SHA-256 of every output .safetensors file is compared (the model card and recipe are
left out: they carry the date).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def merges(m: dict[str, str]) -> dict[str, list[str]]:
    """Method name → its cpift-merge arguments (the output directory appended by the caller)."""
    base, a, b = m["base"], m["task_a"], m["task_b"]
    tasks = ["--base", base, a, b]
    return {
        "slerp": ["slerp", a, b, "--t", "0.3"],
        "linear": ["linear", a, b, "--weights", "1,3"],
        "task-arithmetic": ["task-arithmetic", *tasks, "--lambda", "0.8"],
        "ties": ["ties", *tasks, "--density", "0.3"],
        "dare-ties": ["dare-ties", *tasks, "--density", "0.5", "--seed", "3"],
        "breadcrumbs-ties": ["breadcrumbs-ties", *tasks, "--density", "0.4", "--gamma", "0.05"],
        "breadcrumbs": ["breadcrumbs", *tasks, "--density", "0.5"],
        "breadcrumbs-weights": ["breadcrumbs", *tasks, "--density", "0.9", "--gamma", "0.02", "--weights", "1,0.5"],
        "cores": ["cores", "--base", base, "--model", f"a={a}", "--model", f"b={b}", "--p", "1"],
    }


def run(src: Path, args: list[str], out: Path, backend: str) -> tuple[dict[str, str], float]:
    env = {**os.environ, "PYTHONPATH": str(src), "CPIFT_BACKEND": backend}
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cpift.cli.merge_cli", *args, "-o", str(out), "-q", "--overwrite"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    digests = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.glob("*.safetensors"))}
    return digests, wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="the earlier tree's src directory")
    ap.add_argument("--synthetic", default="small", help="a cpift-merge bench preset (default: small)")
    ap.add_argument("--backend", default="cpu", choices=["cpu", "torch"])
    ap.add_argument("--workdir", type=Path, help="where the models are built and kept (default: temporary)")
    ap.add_argument("--label", default="", help="what the earlier tree is (e.g. its commit), stored with the results")
    ap.add_argument("--out", type=Path, help="write the comparison here as JSON")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(SRC))
    from cpift.merge.tools.synthetic import synthetic_models

    work = args.workdir or Path(tempfile.mkdtemp(prefix="same-outputs-"))
    models = dict(zip(["base", "task_a", "task_b"], map(str, synthetic_models(work, args.synthetic))))
    rows, same = [], True
    for name, cmd in merges(models).items():
        before, t_before = run(args.before, cmd, work / "before" / name, args.backend)
        after, t_after = run(SRC, cmd, work / "after" / name, args.backend)
        ok = before == after and bool(after)
        same &= ok
        rows.append({"method": name, "identical": ok, "files": len(after), "wall_s_before": round(t_before, 2),
                     "wall_s_after": round(t_after, 2)})
        print(f"{name:18s} {'identical' if ok else 'DIFFERENT'} ({len(after)} files; {t_before:.1f} s -> "
              f"{t_after:.1f} s, one run each)", flush=True)
    if args.out:
        date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        args.out.write_text(json.dumps({"synthetic": args.synthetic, "backend": args.backend, "date": date,
                                        "before": args.label or str(args.before), "all_identical": same,
                                        "rows": rows}, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
