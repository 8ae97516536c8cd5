"""Merge throughput against the physical floor and against mergekit (``cpift-merge bench``).

Every case is one command run as a child process, so each is measured as a user would run it
(interpreter start-up included) and its peak RSS is its own (``wait4``'s rusage):

- floor-N: read every tensor of the N inputs with the safetensors library and write one model's
  tensors with it, no math: what any merge of those inputs must at least do;
- cpift METHOD: ``python -m cpift.cli.merge_cli METHOD ... -q``; its summary line gives the time of
  the work itself;
- mergekit METHOD: ``mergekit-yaml`` on the equivalent config (``--compare-mergekit``).

Cases alternate within each repeat (floor, cpift, mergekit, floor, ...), so a slow phase of the
machine spreads over all of them instead of landing on one. Each output is removed and ``sync``-ed
before the next run, so no run pays for the previous one's write-back. Rows report wall seconds
(median, p20, p80, every run), work seconds, GB/s of input, peak RSS, the ratio to the floor of the
same inputs and, with mergekit, cpift's speed-up over it. Each run also records how much of the
machine other processes used meanwhile (``others_cpu_share``, from /proc/stat minus the child's own
CPU time): on a shared machine that is the noise behind a slow run.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch

from cpift.errors import BenchError, ParameterError
from cpift.merge.io.checkpoint import DTYPE_NAMES, Checkpoint
from cpift.merge.tools.bench_cases import DEFAULT_METHODS, Case, bench_methods, check_fuse, plan_cases
from cpift.merge.tools.synthetic import PRESETS, LlamaShape, describe, make_checkpoint

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}

def parse_synthetic(spec: str) -> tuple[str, LlamaShape, torch.dtype]:
    """``PRESET[-layers:N][:DTYPE]`` (``1b``, ``7b-layers:4``, ``1b:bf16``) → (label, shape, dtype).

    Raises:
        ParameterError: unknown preset or dtype, or a bad layer count.
    """
    parts = spec.strip().split(":")
    name, layers = parts[0], None
    if name.endswith("-layers"):
        name = name.removesuffix("-layers")
        if len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) < 1:
            raise ParameterError(f"--synthetic: '{spec}': expected a layer count after '-layers:' (e.g. 7b-layers:4)")
        layers, parts = int(parts[1]), parts[1:]
    if name not in PRESETS or len(parts) > 2:
        raise ParameterError(f"--synthetic: '{spec}' is not PRESET[-layers:N][:DTYPE] with a preset among "
                             f"{', '.join(PRESETS)} (e.g. 1b, 1b:bf16, 7b-layers:4)")
    dtype_name = parts[1].lower() if len(parts) == 2 else "bf16"
    if dtype_name not in _DTYPES:
        raise ParameterError(f"--synthetic: '{spec}': unknown dtype '{parts[1]}' (use bf16, fp16 or fp32)")
    dtype = _DTYPES[dtype_name]
    shape = PRESETS[name] if layers is None else replace(PRESETS[name], layers=layers)
    label = name + (f"-layers{layers}" if layers is not None else "") + \
        ("" if dtype == torch.bfloat16 else "-" + str(dtype).removeprefix("torch."))
    return label, shape, dtype


# Files that mark what the bench built, so that it only ever removes its own models and outputs.
SYNTHETIC_MARKER = ".cpift-bench-model"
OUT_MARKER = ".cpift-bench-out"


def synthetic_models(workdir: Path, spec: str, *, echo: Callable[[str], None] = print) -> list[Path]:
    """base, task_a, task_b of a synthetic preset under ``workdir/models-LABEL``; built once, reused
    when their config.json matches. A stale model is rebuilt only if the bench built it (it carries
    the SYNTHETIC_MARKER file); anything else at that path is refused, never removed."""
    label, shape, dtype = parse_synthetic(spec)
    root = workdir / f"models-{label}"
    out = []
    for i, name in enumerate(["base", "task_a", "task_b"]):
        path = root / name
        cfg = path / "config.json"
        if not (cfg.is_file() and json.loads(cfg.read_text()) == shape.config(dtype)):
            if path.exists() or path.is_symlink():
                if not (path.is_dir() and (path / SYNTHETIC_MARKER).is_file()):
                    raise BenchError(f"{path}: exists and was not built by cpift-merge bench; move it away "
                                     f"or pick another --workdir")
                shutil.rmtree(path)
            echo(f"building {path}: {describe(shape, dtype)}")
            make_checkpoint(path, shape, dtype=dtype, seed=i, base_seed=None if i == 0 else 0, max_shard_size="500MB")
            (path / SYNTHETIC_MARKER).write_text("built by cpift-merge bench\n")
        out.append(path)
    return out


def find_mergekit() -> str | None:
    """``$CPIFT_MERGEKIT_YAML``, else ``mergekit-yaml`` on PATH."""
    return os.environ.get("CPIFT_MERGEKIT_YAML") or shutil.which("mergekit-yaml")


def _busy_cpu() -> float:
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


# Children are started by this small launcher (python -S: a few MB) rather than by the measuring
# process: Linux keeps the peak RSS of the memory a process had before exec in its ru_maxrss, and a
# child forked from a process holding torch (or pytest's fixtures) would report at least that.
_LAUNCHER = """
import os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{time.perf_counter() - t0} {os.waitstatus_to_exitcode(status)} {usage.ru_maxrss} "
            f"{usage.ru_utime + usage.ru_stime}")
"""


def measure(cmd: Sequence[str]) -> dict:
    """Run ``cmd``: its wall seconds, exit code, peak RSS (bytes), CPU seconds and output (stdout and
    stderr together)."""
    with tempfile.TemporaryFile() as log, tempfile.NamedTemporaryFile("r") as res:
        subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, res.name, *cmd], stdout=log,
                       stderr=subprocess.STDOUT, check=True)
        wall, code, rss, cpu = res.read().split()
        log.seek(0)
        text = log.read().decode(errors="replace")
    return {"wall": float(wall), "code": int(code), "rss": int(rss) * 1024, "cpu": float(cpu), "output": text}


def run_case(case: Case) -> dict:
    """Run one case; wall and work seconds, peak RSS, and the share of the machine others used."""
    busy0 = _busy_cpu()
    m = measure(case.cmd)
    busy = _busy_cpu() - busy0
    if m["code"] != 0:
        last = (m["output"].strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"{case.provider} {case.op}: {case.cmd[0]} exited with {m['code']}: {last}")
    w = re.search(r"work_seconds=([\d.]+)", m["output"]) or re.search(r" in ([\d.]+) s \(", m["output"])
    return {"wall": m["wall"], "work": float(w.group(1)) if w else None, "rss": m["rss"],
            "others_cpu_share": max(0.0, busy - m["cpu"]) / (m["wall"] * (os.cpu_count() or 1))}


def _clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()  # no run pays for the previous run's dirty pages being written back


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _q(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def mergekit_version(path: str) -> str:
    pip = Path(path).with_name("pip")
    try:
        out = subprocess.run([str(pip), "show", "mergekit"], capture_output=True, text=True).stdout
        return "mergekit " + re.search(r"Version: (\S+)", out).group(1)
    except (OSError, AttributeError):  # only a label
        return "mergekit (version unknown)"


def run_bench(*, models: Sequence[str | os.PathLike] = (), synthetic: str | None = None,
              methods: Sequence[str] = DEFAULT_METHODS, compare_mergekit: bool = False,
              mergekit: str | None = None, repeat: int = 3, workdir: str | os.PathLike | None = None,
              cold: bool = False, max_shard_size: str = "5GB", threads: int | None = None,
              note: str | None = None, echo: Callable[[str], None] = print) -> dict:
    """Measure the floor and each method (with mergekit if asked) on ``models`` or a synthetic preset.

    Args:
        models: base model first, then task models (at least one); slerp merges the first two task
            models (or the base and the only task).
        synthetic: a preset ``PRESET[-layers:N][:DTYPE]`` (see ``parse_synthetic``) instead of models;
            built under ``workdir`` once and reused.
        methods: among ``bench_methods()`` (the registered methods and fuse).
        compare_mergekit: also run each method through ``mergekit`` (default: ``find_mergekit()``).
        repeat: runs per case, alternating cases.
        workdir: models and outputs (default: a temporary directory, removed at the end).
        cold: one more run per case with the page cache dropped first (needs root).
        threads: torch threads of cpift and mergekit (default: each tool's own choice).
        note: free text recorded in the results (e.g. what else ran on the machine).

    Returns:
        The results as a JSON-ready dict: machine, model, rows (one per case), SLERP parity with mergekit.

    Raises:
        ParameterError: bad arguments, mergekit not found; BenchError: a measured command failed.
    """
    if bool(models) == bool(synthetic):
        raise ParameterError("bench: give MODEL arguments (base first) or --synthetic PRESET, not both or neither")
    if repeat < 1:
        raise ParameterError(f"--repeat: must be at least 1, got {repeat}")
    if threads is not None and threads < 1:
        raise ParameterError(f"--threads: must be at least 1, got {threads}")
    known = bench_methods()
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise ParameterError(f"--methods: unknown method '{unknown[0] if unknown else ''}' (use some of {', '.join(known)})")
    if "fuse" in methods:
        check_fuse()
    if compare_mergekit:
        mergekit = mergekit or find_mergekit()
        if mergekit is None or shutil.which(mergekit) is None:
            raise ParameterError(f"--compare-mergekit: {'mergekit-yaml is not on PATH' if mergekit is None else mergekit + ' is not an executable'} "
                                 f"(install mergekit, or set CPIFT_MERGEKIT_YAML to its mergekit-yaml)")
    else:
        mergekit = None
    own_tmp = workdir is None
    root = Path(tempfile.mkdtemp(prefix="cpift-bench-") if own_tmp else workdir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if synthetic:
            paths = synthetic_models(root, synthetic, echo=echo)
            label, shape, dtype = parse_synthetic(synthetic)
            source = f"synthetic {synthetic}: {describe(shape, dtype)}"
        else:
            paths = [Path(m) for m in models]
            if len(paths) < 2:
                raise ParameterError("bench: give a base model and at least one task model")
            for p in paths:
                Checkpoint(p).close()  # validated before anything runs
            source = "models: " + ", ".join(map(str, paths))
        outs = root / "out"
        if outs.exists() and not (outs / OUT_MARKER).is_file() and (not outs.is_dir() or any(outs.iterdir())):
            raise BenchError(f"{outs}: exists and was not made by cpift-merge bench (its runs replace what "
                             f"is there); move it away or pick another --workdir")
        outs.mkdir(exist_ok=True)
        (outs / OUT_MARKER).write_text("cpift-merge bench writes and removes its runs' outputs here\n")
        cases = plan_cases(paths, methods, outs, mergekit=mergekit, max_shard_size=max_shard_size,
                           threads=threads)
        result = _measure(cases, paths, repeat=repeat, cold=cold, source=source, mergekit=mergekit, note=note,
                          echo=echo)
        result["threads"] = threads
        return result
    finally:
        if own_tmp:
            shutil.rmtree(root, ignore_errors=True)


def _measure(cases: list[Case], paths: list[Path], *, repeat: int, cold: bool, source: str,
             mergekit: str | None, note: str | None, echo: Callable[[str], None]) -> dict:
    from cpift.merge.tools.bench_report import parity

    size = {p: sum(f.stat().st_size for f in p.glob("*.safetensors")) for p in paths}
    load_start = os.getloadavg()
    samples: dict[Case, list[dict]] = {c: [] for c in cases}
    for r in range(repeat):
        for case in cases:
            _clean(case.out)
            s = run_case(case)
            samples[case].append(s)
            echo(f"run {r + 1}/{repeat} {case.provider:9s} {case.op:16s} wall {s['wall']:7.2f} s  work "
                 f"{'-' if s['work'] is None else format(s['work'], '.2f')} s  others used "
                 f"{s['others_cpu_share'] * 100:.0f}% of the CPUs")
    par = None
    by_key = {(c.op, c.provider): c for c in cases}
    if ("slerp", "cpift") in by_key and ("slerp", "mergekit") in by_key:
        par = parity(by_key[("slerp", "cpift")].out, by_key[("slerp", "mergekit")].out)
    cold_walls: dict[Case, float] = {}
    cold_state = "not run (cold=True needs root)"
    if cold:
        for case in cases:
            _clean(case.out)
            if not drop_caches():
                cold_state = "skipped: cannot write /proc/sys/vm/drop_caches (not root or not permitted here)"
                break
            cold_walls[case] = run_case(case)["wall"]
            echo(f"cold {case.provider:9s} {case.op:16s} wall {cold_walls[case]:.2f} s")
        else:
            cold_state = "dropped before each cold run: see rows' cold_wall_s"
    for case in cases:
        _clean(case.out)
    load_end = os.getloadavg()

    med = {c: statistics.median(s["wall"] for s in v) for c, v in samples.items()}
    work = {c: (statistics.median(s["work"] for s in v) if v[0]["work"] is not None else None)
            for c, v in samples.items()}
    floor_of = {c.inputs: c for c in cases if c.op == "floor"}
    rows = []
    for case in cases:
        walls = [s["wall"] for s in samples[case]]
        floor = floor_of[case.inputs]
        in_bytes = sum(size[p] for p in case.inputs)
        row = {"op": case.op, "provider": case.provider, "inputs": len(case.inputs), "input_bytes": in_bytes,
               "wall_s": {"p50": med[case], "p20": _q(walls, 0.2), "p80": _q(walls, 0.8), "all": walls},
               "work_s_p50": work[case], "gbps_input_wall": in_bytes / med[case] / 1e9,
               "gbps_input_work": in_bytes / work[case] / 1e9 if work[case] else None,
               "peak_rss_bytes": max(s["rss"] for s in samples[case]),
               "ratio_to_floor_wall": med[case] / med[floor],
               "ratio_to_floor_work": work[case] / work[floor] if work[case] and work[floor] else None,
               "others_cpu_share_p50": statistics.median(s["others_cpu_share"] for s in samples[case]),
               "others_cpu_share_all": [s["others_cpu_share"] for s in samples[case]]}
        mk = by_key.get((case.op, "mergekit"))
        if case.provider == "cpift" and mk is not None:
            row["speedup_vs_mergekit_wall"] = med[mk] / med[case]
        if case in cold_walls:
            row["cold_wall_s"] = cold_walls[case]
        rows.append(row)
    return {
        "benchmark": "merge_throughput", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "model": source, "dtype": DTYPE_NAMES[next(iter(Checkpoint(paths[0]).tensors.values())).dtype],
        "model_bytes": {str(p): n for p, n in size.items()}, "repeat": repeat,
        "mergekit": mergekit and mergekit_version(mergekit), "slerp_parity_vs_mergekit": par,
        "load": {"loadavg_start": load_start, "loadavg_end": load_end,
                 "others_cpu_share_p50": statistics.median(r["others_cpu_share_p50"] for r in rows),
                 "others_cpu_share_max": max(max(r["others_cpu_share_all"]) for r in rows)},
        "note": note, "cold_cache": cold_state, "rows": rows,
    }
