"""Merge throughput: the I/O floor, cpift and mergekit side by side in one run.

    python benchmarks/merge_throughput.py [--preset 1b] [--repeat 3] [--mergekit PATH/TO/mergekit-yaml]

Builds Llama-shaped bf16 checkpoints (base + two fine-tunes, ≈1 GB each for the default preset) once
under --workdir, then runs every case as a separate command, alternating cases within each repeat:

- floor-2 / floor-3: read every tensor of 2 / 3 inputs with the safetensors library and write one
  model's tensors with it, no math (what any merge must at least do);
- cpift slerp (2 inputs), ties and task-arithmetic (3 inputs) through the `cpift-merge` CLI;
- mergekit slerp and ties through `mergekit-yaml` (skipped when it is not found).

Each row reports the command's wall time (interpreter start-up included, median/p20/p80), the time of
the work itself where the tool prints it, GB/s of input, the child's peak RSS (ru_maxrss), and the
ratios to the floor and to mergekit. With --cold (root, drop_caches writable) one more pass runs with
the page cache dropped before each command. SLERP outputs of cpift and mergekit are compared tensor by
tensor (parity). Results: benchmarks/results/merge_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from cpift.merge.synthetic import PRESETS, describe, make_checkpoint

HERE = Path(__file__).resolve().parent
FLOOR = """
import json, sys, time
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
t0 = time.perf_counter()
out = Path(sys.argv[1]); out.mkdir()
for i, d in enumerate(sys.argv[2:]):
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        if i == 0:
            save_file(tensors, str(out / f.name), metadata={"format": "pt"})
        del tensors
print(f"work_seconds={time.perf_counter() - t0:.4f}")
"""


def run_measured(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    m = re.search(r"work_seconds=([\d.]+)", out) or re.search(r" in ([\d.]+) s \(", out)
    return {"wall": wall, "work": float(m.group(1)) if m else None}


def peak_rss(cmd: list[str]) -> int:
    """Peak RSS of one run of cmd, from wait4's rusage (bytes)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def mergekit_yaml(path: Path, method: str, models: dict[str, Path]) -> Path:
    if method == "slerp":
        text = (f"merge_method: slerp\nbase_model: {models['task_a']}\nmodels:\n"
                f"  - model: {models['task_a']}\n  - model: {models['task_b']}\n"
                f"parameters:\n  t: 0.3\ndtype: bfloat16\n")
    else:
        text = (f"merge_method: ties\nbase_model: {models['base']}\nmodels:\n"
                f"  - model: {models['task_a']}\n    parameters: {{weight: 1.0, density: 0.3}}\n"
                f"  - model: {models['task_b']}\n    parameters: {{weight: 0.5, density: 0.3}}\n"
                f"parameters:\n  normalize: true\ndtype: bfloat16\n")
    path.write_text(text)
    return path


def parity(a: Path, b: Path) -> dict:
    """How far cpift's output is from mergekit's: bit-identical entries, entries within one bf16 ulp,
    and the largest absolute difference in ulps of its tensor's largest |value| (ulps of the entry
    itself mislead where the result cancels to almost 0: 1e-9 there is many ulps of a 1e-8 value)."""
    from safetensors.torch import load_file

    def load(d):
        s = {}
        for f in sorted(d.glob("*.safetensors")):
            s.update(load_file(str(f)))
        return s

    x, y = load(a), load(b)
    total = same = near = 0
    worst = 0.0
    for name, t in x.items():
        u = y[name]
        total += t.numel()
        same += int((t == u).sum())
        ulp = (t.float().abs().clamp(min=1e-30).log2().floor() - 7).exp2()  # bf16: 8 significant bits
        near += int(((t.float() - u.float()).abs() <= ulp).sum())
        scale_ulp = 2.0 ** (math.floor(math.log2(float(t.float().abs().max()) or 1e-30)) - 7)
        worst = max(worst, float((t.float() - u.float()).abs().max()) / scale_ulp)
    return {"entries": total, "identical_fraction": same / total, "within_1_ulp_fraction": near / total,
            "max_diff_in_ulps_of_tensor_scale": worst, "tensors": len(x), "same_names": set(x) == set(y)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1b", choices=sorted(PRESETS), help="model shape (1b ≈ 0.97 GB bf16)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (median reported)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-work"), help="models and outputs go here")
    ap.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="path of mergekit-yaml")
    ap.add_argument("--cold", action="store_true", help="also run once per case with the page cache dropped")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--prefault-gib", type=float, default=0.0,
                    help="first touch this much anonymous memory once: on a VM whose guest memory is backed "
                         "lazily (seen here: 0.4 GB/s on first touch), page-cache growth during a run otherwise "
                         "pays the host's first-touch cost at random")
    args = ap.parse_args()
    if args.prefault_gib:
        # In a child: a forked child inherits its parent's peak RSS, which would spoil every
        # ru_maxrss measured below.
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import numpy; numpy.ones({int(args.prefault_gib * 2**30) // 8})"],
                       check=True)
        print(f"prefaulted {args.prefault_gib} GiB in {time.perf_counter() - t0:.1f} s", flush=True)

    shape = PRESETS[args.preset]
    root = args.workdir / f"models-{args.preset}"
    models = {}
    for i, name in enumerate(["base", "task_a", "task_b"]):
        models[name] = root / name
        if not (models[name] / "config.json").exists():
            print(f"building {name}: {describe(shape, torch.bfloat16)}", flush=True)
            make_checkpoint(models[name], shape, seed=i, base_seed=None if i == 0 else 0,
                            max_shard_size="500MB")
    size = {k: sum(f.stat().st_size for f in v.glob("*.safetensors")) for k, v in models.items()}
    outs = args.workdir / "out"
    outs.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "cpift.cli.merge_cli"]
    a, b, base = (str(models[k]) for k in ("task_a", "task_b", "base"))
    # (op, provider) -> (command, input dirs, output dir)
    cases = {
        ("floor", "floor-2"): ([sys.executable, "-c", FLOOR, str(outs / "floor2"), a, b], [a, b], outs / "floor2"),
        ("slerp", "cpift"): (cli + ["slerp", a, b, "--t", "0.3", "-o", str(outs / "cpift-slerp"), "-q"], [a, b],
                             outs / "cpift-slerp"),
        ("floor", "floor-3"): ([sys.executable, "-c", FLOOR, str(outs / "floor3"), base, a, b], [base, a, b],
                               outs / "floor3"),
        ("ties", "cpift"): (cli + ["ties", "--base", base, a, b, "--weights", "1,0.5", "--density", "0.3",
                                   "-o", str(outs / "cpift-ties"), "-q"], [base, a, b], outs / "cpift-ties"),
        ("task-arithmetic", "cpift"): (cli + ["task-arithmetic", "--base", base, a, b, "--weights", "1,0.5",
                                              "-o", str(outs / "cpift-ta"), "-q"], [base, a, b], outs / "cpift-ta"),
    }
    if args.mergekit:
        for method in ("slerp", "ties"):
            cfg = mergekit_yaml(args.workdir / f"mergekit-{method}.yml", method, models)
            out = outs / f"mergekit-{method}"
            cases[(method, "mergekit")] = ([args.mergekit, str(cfg), str(out), "--lazy-unpickle",
                                            "--no-copy-tokenizer", "--quiet", "--no-write-model-card"],
                                           [base, a, b] if method == "ties" else [a, b], out)
    out_dir = {k: out for k, (_, _, out) in cases.items()}

    def clean(key):
        shutil.rmtree(out_dir[key], ignore_errors=True)
        os.sync()  # no run pays for the previous run's dirty pages being written back

    samples: dict = {k: [] for k in cases}
    cold: dict = {}
    for r in range(args.repeat):
        for key, (cmd, _, _) in cases.items():
            clean(key)
            samples[key].append(run_measured(cmd))
            print(f"run {r + 1}/{args.repeat} {key[1]:8s} {key[0]:16s} wall {samples[key][-1]['wall']:.2f} s "
                  f"work {samples[key][-1]['work']}", flush=True)
    rss = {}
    for key, (cmd, _, _) in cases.items():
        clean(key)
        rss[key] = peak_rss(cmd)
        print(f"peak RSS {key[1]:8s} {key[0]:16s} {rss[key] / 1e9:.2f} GB", flush=True)
    if args.mergekit:
        par = parity(out_dir[("slerp", "cpift")], out_dir[("slerp", "mergekit")])
    else:
        par = None
    if args.cold:
        for key, (cmd, _, _) in cases.items():
            clean(key)
            if not drop_caches():
                cold = {"skipped": "cannot write /proc/sys/vm/drop_caches (not root or not permitted here)"}
                break
            cold[key] = run_measured(cmd)
            print(f"cold {key[1]:8s} {key[0]:16s} wall {cold[key]['wall']:.2f} s", flush=True)
    for key in cases:
        clean(key)

    rows = []
    med = {k: statistics.median(s["wall"] for s in v) for k, v in samples.items()}
    med_work = {k: (statistics.median(s["work"] for s in v) if v[0]["work"] is not None else None)
                for k, v in samples.items()}
    for key, (cmd, inputs, _) in cases.items():
        op, provider = key
        walls = sorted(s["wall"] for s in samples[key])
        in_bytes = sum(size[k] for k, p in models.items() if str(p) in inputs)
        floor_key = ("floor", "floor-2" if len(inputs) == 2 else "floor-3")
        row = {
            "op": op, "provider": provider, "inputs": len(inputs), "input_bytes": in_bytes,
            "wall_s": {"p50": med[key], "p20": _q(walls, 0.2), "p80": _q(walls, 0.8), "all": walls},
            "work_s_p50": med_work[key],
            "gbps_input_wall": in_bytes / med[key] / 1e9,
            "peak_rss_bytes": rss[key],
            "ratio_to_floor_wall": med[key] / med[floor_key],
            "ratio_to_floor_work": (med_work[key] / med_work[floor_key]) if med_work[key] else None,
        }
        if (op, "mergekit") in med and provider == "cpift":
            row["speedup_vs_mergekit_wall"] = med[(op, "mergekit")] / med[key]
        if cold and "skipped" not in cold:
            row["cold_wall_s"] = cold[key]["wall"]
        rows.append(row)
    result = {
        "benchmark": "merge_throughput", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "model": describe(shape, torch.bfloat16), "model_bytes": size, "repeat": args.repeat,
        "mergekit": args.mergekit and _version(args.mergekit), "slerp_parity_vs_mergekit": par,
        "prefault_gib": args.prefault_gib,
        "cold_cache": ("dropped before each cold run: see rows' cold_wall_s" if cold and "skipped" not in cold
                       else cold.get("skipped", "not run (pass --cold as root)")),
        "rows": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "merge_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "merge_throughput.md").write_text(markdown(result))
    print(markdown(result))


def _q(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _version(path: str) -> str:
    pip = Path(path).with_name("pip")
    try:
        out = subprocess.run([str(pip), "show", "mergekit"], capture_output=True, text=True).stdout
        return "mergekit " + re.search(r"Version: (\S+)", out).group(1)
    except Exception:  # noqa: BLE001 - only a label
        return "mergekit (version unknown)"


def markdown(r: dict) -> str:
    lines = [f"# Merge throughput ({r['date']})", "",
             f"Machine: {r['machine']['cpus']} CPUs, {r['machine']['platform']}, torch {r['machine']['torch']}. "
             f"Model: {r['model']}. Median of {r['repeat']} runs, warm page cache; wall = whole command "
             f"including interpreter start-up, work = the time the tool itself reports.", "",
             "| op | provider | inputs | wall s (p50) | p20–p80 | work s | GB/s input (wall) | peak RSS GB "
             "| × floor (wall) | × floor (work) | speed-up vs mergekit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        w = x["wall_s"]
        lines.append(
            f"| {x['op']} | {x['provider']} | {x['inputs']} | {w['p50']:.2f} | {w['p20']:.2f}–{w['p80']:.2f} | "
            f"{x['work_s_p50'] if x['work_s_p50'] is None else format(x['work_s_p50'], '.2f')} | "
            f"{x['gbps_input_wall']:.2f} | {x['peak_rss_bytes'] / 1e9:.2f} | {x['ratio_to_floor_wall']:.2f} | "
            f"{'' if x['ratio_to_floor_work'] is None else format(x['ratio_to_floor_work'], '.2f')} | "
            f"{format(x['speedup_vs_mergekit_wall'], '.1f') + '×' if 'speedup_vs_mergekit_wall' in x else ''} |")
    if r["slerp_parity_vs_mergekit"]:
        p = r["slerp_parity_vs_mergekit"]
        lines += ["", f"SLERP parity with {r['mergekit']}: {p['identical_fraction'] * 100:.3f}% of "
                  f"{p['entries']:,} entries bit-identical, {p['within_1_ulp_fraction'] * 100:.4f}% within one "
                  f"bf16 ulp of the entry; largest difference {p['max_diff_in_ulps_of_tensor_scale']:.2f} bf16 ulp of "
                  f"its tensor's largest |value|."]
    cold_rows = [x for x in r["rows"] if "cold_wall_s" in x]
    if cold_rows:
        lines += ["", "Cold page cache (dropped before each command, one run each):", "",
                  "| op | provider | wall s | GB/s input |", "|---|---|---|---|"]
        lines += [f"| {x['op']} | {x['provider']} | {x['cold_wall_s']:.2f} | "
                  f"{x['input_bytes'] / x['cold_wall_s'] / 1e9:.2f} |" for x in cold_rows]
    else:
        lines += ["", f"Cold cache: {r['cold_cache']}"]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
