"""Parity of cpift with mergekit, measured: every config of cpift.merge.tools.parity.CASES through
``mergekit-yaml`` and ``cpift-merge config`` on a tiny Llama-shaped family, every tensor compared.

    CPIFT_MERGEKIT_YAML=/path/to/mergekit-yaml python benchmarks/mergekit_parity.py \
        --json benchmarks/results/mergekit_parity.json --markdown benchmarks/results/mergekit_parity.md

Exit code 1 if a case misses its bound (the same check as tests/merge/test_mergekit_parity.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cpift.errors import OutputError
from cpift.merge.io.publish import check_side_file, write_atomic
from cpift.merge.tools.parity import CASES, compare, make_family, run_both, tool_command


def _mergekit_version(exe: str) -> str:
    py = Path(exe).with_name("python")
    out = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| case | dtype | bound | holds | bit-identical | within 1 ulp | max abs Δ | max Δ (ulps) | "
             "moved off base: cpift / mergekit | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "entries" not in r:
            lines.append(f"| {r['case']} | | | **no** | | | | | | {r['why']} |")
            continue
        lines.append(f"| {r['case']} | {r['dtype']} | {r['bound']} | {'yes' if r['ok'] else '**no**'} | "
                     f"{100 * r['bit_identical']:.3f}% | {100 * r['within_1_ulp']:.3f}% | {r['max_abs']:.3g} | "
                     f"{r['max_ulps']:.3g} | {100 * r['moved_cpift']:.2f}% / {100 * r['moved_mergekit']:.2f}% | "
                     f"{r['note']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    args = ap.parse_args()
    mergekit = os.environ.get("CPIFT_MERGEKIT_YAML") or shutil.which("mergekit-yaml")
    if not mergekit:
        print("mergekit_parity: set CPIFT_MERGEKIT_YAML to a mergekit-yaml", file=sys.stderr)
        return 2
    for target in (args.json, args.markdown):  # fail before the runs, not after them
        if target is not None:
            try:
                check_side_file(target)
            except OutputError as e:
                print(f"mergekit_parity: {e}", file=sys.stderr)
                return 2
    wanted = set(args.cases.split(",")) if args.cases else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="cpift-parity-") as tmp:
        families = {}
        for i, case in enumerate(c for c in CASES if wanted is None or c.name in wanted):
            fam = families.get(case.dtype) or families.setdefault(case.dtype, make_family(Path(tmp) / case.dtype,
                                                                                          case.dtype))
            exe = mergekit if case.tool == "mergekit" else tool_command(case.tool)
            if exe is None:  # mergekitty's methods: compared where CPIFT_MERGEKITTY_YAML names its -yaml
                print(f"{case.name:<32} skipped: {case.tool}-yaml not found")
                continue
            ours, theirs = run_both(case, fam, Path(tmp) / f"case{i}", exe)
            row = compare(case, ours, theirs, fam["base"])
            rows.append(row)
            print(f"{row['case']:<32} {'ok ' if row['ok'] else 'NO '} bit-identical "
                  f"{100 * row.get('bit_identical', 0):7.3f}%  max {row.get('max_ulps', float('nan')):.3g} ulps")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = {"date": when, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "mergekit": _mergekit_version(mergekit), "python": platform.python_version(),
            "command": "python benchmarks/mergekit_parity.py"}
    if args.json:
        write_atomic(args.json, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    header = (f"cpift vs mergekit {meta['mergekit']} ({when}, {meta['machine']}): each config through mergekit-yaml "
              f"and `cpift-merge config` on a tiny Llama-shaped family (base + 2 fine-tunes, 0.1M parameters), every "
              f"tensor compared; ulp = of the output dtype at the tensor's largest magnitude.")
    text = _markdown(rows, header)
    if args.markdown:
        write_atomic(args.markdown, text)
    print(text)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
