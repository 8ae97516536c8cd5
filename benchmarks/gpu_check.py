"""One-shot GPU check of the Triton path: results against torch on the CPU, then bandwidth, then a staged merge.

  python benchmarks/gpu_check.py --json benchmarks/results/gpu_check.json    (sized for < 5 min on one H100)
  python benchmarks/gpu_check.py --dry-run --json /tmp/gpu_check.json        (CPU, Triton interpreter; CI)

Every case runs in its own process (a CUDA error poisons a context: the next case starts clean), with a
time limit, and the JSON is rewritten after each case, so a crash still leaves every result before it.
Inputs are realistic bf16 deltas: a third of the entries unchanged (zero scores) and the rest a few
quantized steps, so the k-th largest |δ| is a tie that the cut splits. Correctness cases compare the
device result with backend="torch" on CPU copies, bit for bit where cpift claims it (dyadic weights:
the torch reference's fused or unfused multiply-adds then agree); "nan" checks a NaN input stays NaN.
Timing cases report GB/s of the bytes each kernel must move (read + write) and a device copy's GB/s;
"staged_merge" runs `cpift-merge ties --device cuda` end to end: input GB/s, host-device copy GB/s,
the synchronizing calls torch counted (set_sync_debug_mode), and the registers and spills of every
kernel compiled. --dry-run runs the same cases on the CPU under TRITON_INTERPRET=1 with tiny sizes
(CI runs it: the comparisons hold there too; the timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from gpu_inputs import compare, cpu, realistic, ulp_steps

ROOT = Path(__file__).resolve().parent.parent
CASE_LIMIT_S = 240  # per case; the whole run is sized for < 5 minutes on one H100


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes (for CI).")
    ap.add_argument("--json", type=Path, default=None, help="Write the results here (rewritten after each case).")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # run one case in this process
    return ap.parse_args()


class Env:
    """Device, backend and sizes of one run."""

    def __init__(self, dry: bool):
        import torch

        self.dry = dry
        self.device = "cpu" if dry else "cuda"
        self.backend = "triton"
        self.n_check = 3 * 4096 + 77 if dry else (1 << 22) + 3  # compared with torch on the CPU
        self.n_time = (1 << 15) + 3 if dry else 1 << 28  # 512 MiB of bf16 per input
        self.torch = torch

    def sync(self) -> None:
        if not self.dry:
            self.torch.cuda.synchronize()

    def seconds(self, fn) -> float:
        """Median wall time of fn (CUDA events through triton's do_bench on a GPU)."""
        if not self.dry:
            from triton.testing import do_bench

            return do_bench(fn, warmup=10, rep=100, return_mode="median") / 1e3
        fn()
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t)
        return sorted(runs)[1]


# --------------------------------------------------------------------------------------------------
# Correctness: device vs backend="torch" on CPU copies


def case_magnitude_cut(env: Env) -> dict:
    from cpift.kernels.select import magnitude_cut

    base, xs = realistic(env, env.n_check, 1)
    k = env.n_check // 3
    got = magnitude_cut(xs[0], base, k, backend=env.backend)
    want = magnitude_cut(xs[0].cpu(), base.cpu(), k, backend="torch")
    return {"exact": got == want, "cut": [got.value, got.last_tie], "torch_cut": [want.value, want.last_tie],
            "tie_split": 0 <= want.last_tie < env.n_check - 1}


def case_global_topk(env: Env) -> dict:
    from cpift.kernels.topk import GlobalTopK

    base, xs = realistic(env, env.n_check, 2)
    m = env.n_check // 2
    stream = [(base[:m], [x[:m] for x in xs]), (base[m:], [x[m:] for x in xs])]
    packs = []
    for tensors, device, backend in ((stream, env.device, env.backend),
                                     ([(b.cpu(), cpu(t)) for b, t in stream], "cpu", "torch")):
        top = GlobalTopK(2, device=device, backend=backend)
        for b, t in tensors:
            top.count(b, t)
        top.fix([env.n_check // 5, env.n_check // 3])
        for b, t in tensors:
            top.refine(b, t)
        packs.append([p for b, t in tensors for p, _ in top.pack(b, t)])
    results = [compare(p, p0) for p, p0 in zip(*packs)]
    return {"exact": all(r["exact"] for r in results), "masks": len(results),
            "mismatches": sum(r["mismatches"] for r in results)}


def _delta_case(env: Env, **opts) -> dict:
    from cpift.kernels.select import magnitude_cut
    from cpift.kernels.ties import delta_merge

    torch = env.torch
    base, xs = realistic(env, env.n_check)
    if opts.pop("trim", False):
        opts["cuts"] = [magnitude_cut(x, base, env.n_check // 4, backend=env.backend) for x in xs]
    ws = [1.0, 0.5, 0.25]  # dyadic: exact products, so fused and unfused torch sums agree
    n = env.n_check
    got = delta_merge(base, xs, ws, out=torch.empty(n, dtype=torch.bfloat16, device=env.device),
                      backend=env.backend, **opts)
    want = delta_merge(base.cpu(), cpu(xs), ws, out=torch.empty(n, dtype=torch.bfloat16), backend="torch", **opts)
    return compare(got, want)


def case_ties(env: Env) -> dict:
    return _delta_case(env, elect_sign=True, trim=True)


def case_dare(env: Env) -> dict:
    return _delta_case(env, elect_sign=True, drop_density=0.5, drop_seeds=[1, 2, 3], normalize=False)


def case_nan(env: Env) -> dict:
    from cpift.kernels.ties import delta_merge

    torch = env.torch
    base, xs = realistic(env, env.n_check)
    xs[1][5] = float("nan")
    xs[2][9] = float("inf")
    n, ws = env.n_check, [1.0, 1.0, 1.0]
    row = {}
    for mode, opts in {"ties": dict(elect_sign=True), "dare": dict(elect_sign=False, drop_density=0.5,
                                                                   drop_seeds=[4, 5, 6])}.items():
        got = delta_merge(base, xs, ws, out=torch.empty(n, dtype=torch.bfloat16, device=env.device),
                          backend=env.backend, **opts)
        want = delta_merge(base.cpu(), cpu(xs), ws, out=torch.empty(n, dtype=torch.bfloat16), backend="torch",
                           **opts)
        row[mode] = {**compare(got, want), "nan_at_input": bool(got[5].isnan())}
    row["exact"] = all(r["exact"] and r["nan_at_input"] for r in row.values())
    return row


def case_sce(env: Env) -> dict:
    from cpift.kernels.sce import sce_merge

    torch = env.torch
    base, xs = realistic(env, env.n_check)
    n = env.n_check
    got = sce_merge(base, xs, 0.5, out=torch.empty(n, dtype=torch.bfloat16, device=env.device), backend=env.backend)
    return compare(got, sce_merge(base.cpu(), cpu(xs), 0.5, out=torch.empty(n, dtype=torch.bfloat16),
                                   backend="torch"))


def case_nearswap(env: Env) -> dict:
    from cpift.kernels.nearswap import nearswap

    torch = env.torch
    _, xs = realistic(env, env.n_check, 2)
    n = env.n_check
    got = nearswap(xs[0], xs[1], 0.01, out=torch.empty(n, dtype=torch.bfloat16, device=env.device),
                   backend=env.backend)
    return compare(got, nearswap(*cpu(xs), 0.01, out=torch.empty(n, dtype=torch.bfloat16), backend="torch"))


def case_device_tests(env: Env) -> dict:
    """tests/kernels/test_devices.py's CUDA cases (every entry point on the device vs torch)."""
    if env.dry:
        return {"exact": True, "skipped": "dry run: the CPU cases run in CI itself"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
           str(ROOT / "tests" / "kernels" / "test_devices.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return {"exact": proc.returncode == 0, "tail": proc.stdout[-1500:]}


def case_crowded_histogram(env: Env) -> dict:
    """Both radix passes on crowded bins, bit for bit against torch on the CPU, and the global atomics
    the kernel issued ([pre-aggregated, lone]; the bandwidth case times such inputs)."""
    from cpift.kernels._scores_triton import score_triton
    from cpift.kernels.scores import BINS, histogram_ref, score_deltas
    from cpift.kernels.select import magnitude_cut

    torch = env.torch
    x, base = ulp_steps(env, env.n_check)
    s = score_deltas(x.cpu(), base.cpu(), backend="torch")
    busy = int(torch.bincount(s[s > 0].view(torch.int32) >> 16).argmax())
    row = {"entries": env.n_check, "zeros": int((s == 0).sum())}
    for name, hb in (("high", None), ("low_in_busiest", busy), ("low_in_zeros", 0)):
        hist = torch.zeros(BINS, dtype=torch.int64, device=env.device)
        stats = torch.zeros(2, dtype=torch.int64, device=env.device)
        score_triton(x, base, 1, out=None, hist=hist, high_bin=hb, stats=stats)
        row[name] = {**compare(hist, histogram_ref(s, hb)), "atomics": stats.tolist()}
    k = int((s > 0).sum()) // 3  # a cut inside the ties
    row["cut_exact"] = magnitude_cut(x, base, k, backend=env.backend) == magnitude_cut(*cpu([x, base]), k,
                                                                                       backend="torch")
    row["exact"] = row["cut_exact"] and all(row[k]["exact"] for k in ("high", "low_in_busiest", "low_in_zeros"))
    return row


# --------------------------------------------------------------------------------------------------
# Bandwidth: GB/s of the bytes a kernel must move, beside a device copy


def case_bandwidth(env: Env) -> dict:
    from cpift.kernels.masks import overlap, pack_cut
    from cpift.kernels.scores import BINS, score_deltas, score_histogram
    from cpift.kernels.select import Cut
    from cpift.kernels.slerp import slerp_blend
    from cpift.kernels.ties import delta_merge

    torch = env.torch
    n, e, be = env.n_time, 2, env.backend
    base, xs = realistic(env, n)
    out = torch.empty(n, dtype=torch.bfloat16, device=env.device)
    scores = torch.empty(n, dtype=torch.float32, device=env.device)
    hist = torch.zeros(BINS, dtype=torch.int64, device=env.device)
    packed = torch.empty((n + 7) // 8, dtype=torch.uint8, device=env.device)
    cut = Cut(2.0 ** -7, n)
    one, half = torch.full_like(base, 0.75), torch.full_like(base, 0.5)  # every score in one bin: the worst case
    steps = ulp_steps(env, n, 1)
    src = torch.empty(2 * n, dtype=torch.uint8, device=env.device)
    dst = torch.empty_like(src)
    kernels = {
        "device copy": (4 * n, lambda: dst.copy_(src)),
        "score+histogram (zero-heavy)": (n * (2 * e + 4), lambda: score_deltas(xs[0], base, hist=hist, out=scores,
                                                                                backend=be)),
        "histogram, one bin": (n * 2 * e, lambda: score_histogram(one, half, hist=hist, backend=be)),
        "histogram, ulp steps": (n * 2 * e, lambda: score_histogram(*steps, hist=hist, backend=be)),
        "compare+pack": (n * 2 * e + n // 8, lambda: pack_cut(xs[0], base, cut=cut, out=packed, backend=be)),
        "slerp blend": (n * 3 * e, lambda: slerp_blend(xs[0], xs[1], 0.6, 0.4, out=out, backend=be)),
        "ties N=3": (n * 5 * e, lambda: delta_merge(base, xs, [1.0, 1.0, 1.0], elect_sign=True, out=out, backend=be)),
        "popcount overlap": (2 * packed.numel(), lambda: overlap(packed, packed, backend=be)),
    }
    rows = {name: {"bytes": nbytes, "s": env.seconds(fn)} for name, (nbytes, fn) in kernels.items()}
    for r in rows.values():
        r["gbps"] = r["bytes"] / r["s"] / 1e9
    return {"exact": True, "entries": n, "rows": rows}


# --------------------------------------------------------------------------------------------------
# A staged end-to-end merge


def _kernel_resources() -> dict:
    """Registers and spills of every Triton kernel this process compiled (GPU only)."""
    from cpift.kernels import _masks_triton, _sce_triton, _scores_triton, _slerp_triton, _ties_triton

    found = {}
    for mod in (_masks_triton, _scores_triton, _sce_triton, _slerp_triton, _ties_triton):
        for name, fn in vars(mod).items():
            for cache in getattr(fn, "device_caches", {}).values():
                for i, k in enumerate(cache[0].values()):
                    try:
                        k._init_handles()
                        found[f"{name}#{i}"] = {"regs": k.n_regs, "spills": k.n_spills}
                    except Exception as exc:  # a kernel object of another Triton version
                        found[f"{name}#{i}"] = {"error": repr(exc)[:200]}
    return found


def case_staged_merge(env: Env) -> dict:
    import warnings

    from cpift.cli.merge_cli import main as merge_main
    from cpift.merge.tools.synthetic import PRESETS, make_checkpoint

    torch = env.torch
    with tempfile.TemporaryDirectory() as tmp:
        shape = PRESETS["tiny" if env.dry else "small"]
        base = make_checkpoint(Path(tmp, "base"), shape)
        tasks = [make_checkpoint(Path(tmp, f"t{i}"), shape, seed=i + 1, base_seed=0) for i in range(2)]
        read = sum(f.stat().st_size for d in (base, *tasks) for f in d.glob("*.safetensors"))
        argv = ["ties", "--base", str(base), *map(str, tasks), "--density", "0.2", "--device", env.device,
                "--backend", env.backend, "-o", str(Path(tmp, "out"))]
        row = {"input_bytes": read}
        if not env.dry:
            host = torch.empty(1 << 28, dtype=torch.uint8).pin_memory()
            row["h2d_gbps"] = host.numel() / env.seconds(lambda: host.to(env.device, non_blocking=True)) / 1e9
            torch.cuda.set_sync_debug_mode(1)
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                merge_main(argv + ["--quiet"])
            except SystemExit as exc:
                row["exit"] = exc.code
        row["seconds"] = time.perf_counter() - t
        if not env.dry:
            torch.cuda.set_sync_debug_mode(0)
            row["syncs"] = sum("synchroniz" in str(w.message) for w in caught)
            row["kernels"] = _kernel_resources()
        row["input_gbps"] = read / row["seconds"] / 1e9
        row["exact"] = row.get("exit", 0) in (0, None) and Path(tmp, "out", "model.safetensors").exists()
        return row


CASES = {f.__name__[5:]: f for f in (case_magnitude_cut, case_global_topk, case_ties, case_dare, case_nan, case_sce,
                                     case_nearswap, case_crowded_histogram, case_device_tests, case_bandwidth,
                                     case_staged_merge)}


# --------------------------------------------------------------------------------------------------


def _run_one(name: str, dry: bool) -> None:
    """Child process: run one case, print its row as the last line of stdout."""
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton defines any kernel
    env = Env(dry)
    t = time.perf_counter()
    row = CASES[name](env)
    env.sync()
    row["case_s"] = time.perf_counter() - t
    print(json.dumps(row, default=str))


def _child(name: str, dry: bool) -> dict:
    cmd = [sys.executable, __file__, "--case", name] + (["--dry-run"] if dry else [])
    penv = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CASE_LIMIT_S, env=penv)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "limit_s": CASE_LIMIT_S}
    if proc.returncode:
        return {"status": "crashed", "exit": proc.returncode, "stderr": proc.stderr[-3000:]}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["status"] = "ok" if row.get("exact") else "mismatch"
    return row


def _write(path: Path | None, report: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file


def main() -> None:
    args = _parse()
    if args.case:
        try:
            _run_one(args.case, args.dry_run)
        except Exception:
            traceback.print_exc()
            sys.exit(1)
        return
    import torch
    import triton

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --dry-run on a CPU)")
    device = torch.cuda.get_device_name() if not args.dry_run else f"CPU (interpreter), {platform.machine()}"
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
              "dry_run": args.dry_run, "torch": torch.__version__, "triton": triton.__version__, "cases": {}}
    for name in CASES:
        t = time.perf_counter()
        report["cases"][name] = row = _child(name, args.dry_run)
        print(f"{name:<16} {row['status']:<9} {time.perf_counter() - t:6.1f} s", flush=True)
        _write(args.json, report)
    failed = [n for n, r in report["cases"].items() if r["status"] != "ok"]
    if failed:
        sys.exit(f"gpu_check: {len(failed)} case(s) not ok: {', '.join(failed)}")


if __name__ == "__main__":
    main()
