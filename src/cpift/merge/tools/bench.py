"""Merge throughput against the physical floor and against mergekit (``cpift-merge bench``).

Every case is one command run as a child process, so each is measured as a user would run it
(interpreter start-up included) and its peak RSS is its own (``wait4``'s rusage):

- floor-physical-N: every input byte read with large sequential reads and one model's bytes written
  to a file, as ``cat``/``dd`` would (no fsync); floor-python-N: every tensor read with the
  safetensors library and one model's tensors written with it; floor-read-N: the read pass alone
  (the floor of ``cores``). No math: what any merge of those inputs must at least do;
- cpift-BACKEND METHOD: ``python -m cpift.cli.merge_cli METHOD ... -q`` with ``$CPIFT_BACKEND`` set
  to ``torch`` (the reference kernels) or ``cpu`` (the fused kernels); its summary line gives the
  time of the work itself;
- mergekit METHOD: ``mergekit-yaml`` on the equivalent config (``--compare-mergekit``).

Cases alternate within each repeat (floors, cpift on each backend, mergekit, ...), so a slow phase of
the machine spreads over all of them instead of landing on one. With ``busy=N`` each repeat is run a
second time while N CPU-bound competitors (plain Python loops, not pinned, started here and killed
after) share the machine. Before the repeats, each fused-backend case runs once with an empty numba
cache (``NUMBA_CACHE_DIR`` a fresh directory): its compile cost, reported apart from the warm runs.
Each output is removed and ``sync``-ed before the next run, so no run pays for the previous one's
write-back. Each run also records how much of the machine other processes used meanwhile
(``others_cpu_share``, from /proc/stat minus the child's and the competitors' own CPU time): on a
shared machine that is the noise behind a slow run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence

from cpift.errors import BenchError, ParameterError
from cpift.merge.io.checkpoint import DTYPE_NAMES, Checkpoint
from cpift.merge.tools.bench_cases import (
    BENCH_BACKENDS,
    DEFAULT_METHODS,
    Case,
    check_arguments,
    check_task_count,
    plan_cases,
)
from cpift.merge.tools.page_cache import evict, model_files, resident_fraction
from cpift.merge.tools.synthetic import describe, parse_synthetic, synthetic_models

# Marks the directory of the bench's outputs, so that it only ever removes its own runs (synthetic.py marks its models).
OUT_MARKER = ".cpift-bench-out"


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
import os, signal, sys, time
t0 = time.perf_counter()
pid = os.posix_spawnp(sys.argv[3], sys.argv[3:], os.environ)
if float(sys.argv[2]) > 0:  # a time limit: the child is killed when it runs past it
    signal.signal(signal.SIGALRM, lambda *_: os.kill(pid, signal.SIGKILL))
    signal.setitimer(signal.ITIMER_REAL, float(sys.argv[2]))
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{time.perf_counter() - t0} {os.waitstatus_to_exitcode(status)} {usage.ru_maxrss} "
            f"{usage.ru_utime + usage.ru_stime}")
"""


def measure(cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float | None = None) -> dict:
    """Run ``cmd`` (in ``env``, default this process's; killed after ``timeout`` seconds): its wall
    seconds, exit code, whether it was killed for its time, peak RSS (bytes), CPU seconds and output
    (stdout and stderr together)."""
    with tempfile.TemporaryFile() as log, tempfile.NamedTemporaryFile("r") as res:
        subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, res.name, str(timeout or 0), *cmd], stdout=log,
                       stderr=subprocess.STDOUT, check=True, env=env)
        wall, code, rss, cpu = res.read().split()
        log.seek(0)
        text = log.read().decode(errors="replace")
    timed_out = timeout is not None and int(code) == -9 and float(wall) >= timeout
    return {"wall": float(wall), "code": int(code), "timed_out": timed_out, "rss": int(rss) * 1024, "cpu": float(cpu),
            "output": text}


# A competitor: one CPU-bound Python loop, not pinned to a core (the scheduler moves it as it likes).
# It also ends by itself once its parent is gone (a bench killed by a signal runs no finally block):
# a parent check every 10^6 iterations (some 30 ms) costs one getppid call, nothing measurable. The
# parent's pid comes as the argument, not from getppid() at start: a bench killed before the child's
# interpreter is up would otherwise leave it recording init as its parent and looping forever.
COMPETITOR = ("import os, sys\nparent = int(sys.argv[1])\nwhile os.getppid() == parent:\n"
              "    for _ in range(1000000): pass")


@contextmanager
def competing(n: int, *, pids: list[int] | None = None) -> Iterator[list[subprocess.Popen]]:
    """N CPU-bound competitor processes while the block runs; killed and reaped when it ends, however
    it ends. Their pids are appended to ``pids``."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-S", "-c", COMPETITOR, str(os.getpid())],
                                          stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if pids is not None:
                pids.append(procs[-1].pid)
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _cpu_of(procs: Sequence[subprocess.Popen]) -> float:
    import psutil

    total = 0.0
    for p in procs:
        try:
            t = psutil.Process(p.pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:  # exited: its time is no longer counted anywhere
            pass
    return total


def run_case(case: Case, *, env: dict[str, str] | None = None, competitors: Sequence[subprocess.Popen] = (),
             timeout: float | None = None) -> dict:
    """Run one case; wall and work seconds, peak RSS, and the shares of the machine that other
    processes and the bench's own competitors used. A run killed at ``timeout`` has no work seconds
    and ``timed_out`` set (its wall time is a lower bound)."""
    t0, busy0, comp0 = time.perf_counter(), _busy_cpu(), _cpu_of(competitors)
    m = measure(case.cmd, env=env, timeout=timeout)
    busy, comp = _busy_cpu() - busy0, _cpu_of(competitors) - comp0
    span = (time.perf_counter() - t0) * (os.cpu_count() or 1)  # the CPU time the machine had meanwhile
    if m["code"] != 0 and not m["timed_out"]:
        last = (m["output"].strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"{case.provider} {case.op}: {case.cmd[0]} exited with {m['code']}: {last}")
    w = re.search(r"work_seconds=([\d.]+)", m["output"]) or re.search(r" in ([\d.]+) s \(", m["output"])
    return {"wall": m["wall"], "work": float(w.group(1)) if w and not m["timed_out"] else None, "rss": m["rss"],
            "timed_out": m["timed_out"],
            "others_cpu_share": min(1.0, max(0.0, busy - m["cpu"] - comp) / span),
            "competitors_cpu_share": min(1.0, comp / span)}


def _clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()  # no run pays for the previous run's dirty pages being written back


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
              backends: Sequence[str] = BENCH_BACKENDS, busy: int = 0, busy_repeat: int | None = None,
              mergekit_methods: Sequence[str] | None = None, mergekit_repeat: int | None = None,
              case_timeout: float | None = None, note: str | None = None,
              echo: Callable[[str], None] = print) -> dict:
    """Measure the floors and each method on each backend (with mergekit if asked), quiet and busy.

    Args:
        models: base model first, then task models (at least one); slerp merges the first two task
            models (or the base and the only task).
        synthetic: a preset ``PRESET[-layers:N][:DTYPE]`` (see ``parse_synthetic``) instead of models;
            built under ``workdir`` once and reused.
        methods: among ``METHODS`` (``cores``: the CPI step, against one read pass of its inputs).
        compare_mergekit: also run each method mergekit has through ``mergekit`` (default:
            ``find_mergekit()``); ``mergekit_methods`` limits which, ``mergekit_repeat`` how many runs.
        repeat: runs per case, alternating cases.
        workdir: models and outputs (default: a temporary directory, removed at the end).
        cold: one more run per case with the page cache dropped first (needs root).
        threads: threads of cpift and mergekit (default: each tool's own choice).
        backends: cpift's kernel backends, each case run on each (``torch``, ``cpu``).
        busy: with N > 0, each of the first ``busy_repeat`` (default all) repeats is run again while N
            CPU-bound competing processes run (mergekit's cases excepted).
        case_timeout: a run still going after this many seconds is killed and recorded as timed out
            (no work seconds; its wall time a lower bound), so a stalled case cannot stall the bench.
        note: free text recorded in the results (e.g. what else ran on the machine).

    Returns:
        The results as a JSON-ready dict: machine, versions, model, rows (one per case and condition),
        compile (cold numba cache against warm), SLERP parity with mergekit.

    Raises:
        ParameterError: bad arguments, mergekit or numba not found; BenchError: a measured command failed.
    """
    mergekit = _check_request(models=models, synthetic=synthetic, case_timeout=case_timeout,
                              mergekit=mergekit if compare_mergekit else None, compare_mergekit=compare_mergekit,
                              checks=(methods, backends, repeat, threads, busy,
                                      {"--busy-repeat": busy_repeat, "--mergekit-repeat": mergekit_repeat}))
    with _workdir(workdir) as (root, caches):
        paths, source = _inputs(root, models, synthetic, methods, echo)
        cases = plan_cases(paths, methods, _out_dir(root), mergekit=mergekit, max_shard_size=max_shard_size,
                           threads=threads, backends=backends, mergekit_methods=mergekit_methods, disk_floor=cold)
        result = _measure(cases, paths, repeat=repeat, cold=cold, busy=busy, busy_repeat=busy_repeat or repeat,
                          mergekit_repeat=mergekit_repeat or repeat, caches=caches, echo=echo, timeout=case_timeout)
    result.update(model=source, mergekit=mergekit and mergekit_version(mergekit), note=note, threads=threads,
                  backends=list(backends))
    result["versions"]["mergekit"] = result["mergekit"]
    return result


def _check_request(*, models, synthetic, case_timeout, mergekit, compare_mergekit, checks) -> str | None:
    """Refuse bad arguments before the workdir is made; the mergekit-yaml to compare with (None: none)."""
    if bool(models) == bool(synthetic):
        raise ParameterError("bench: give MODEL arguments (base first) or --synthetic PRESET, not both or neither")
    if case_timeout is not None and case_timeout <= 0:
        raise ParameterError(f"--case-timeout: must be a positive number of seconds, got {case_timeout}")
    check_arguments(*checks)
    if synthetic:
        parse_synthetic(synthetic)
    if not compare_mergekit:
        return None
    mergekit = mergekit or find_mergekit()
    if mergekit is None or shutil.which(mergekit) is None:
        why = "mergekit-yaml is not on PATH" if mergekit is None else mergekit + " is not an executable"
        raise ParameterError(f"--compare-mergekit: {why} "
                             f"(install mergekit, or set CPIFT_MERGEKIT_YAML to its mergekit-yaml)")
    return mergekit


@contextmanager
def _workdir(workdir: str | os.PathLike | None) -> Iterator[tuple[Path, Path]]:
    """The bench's directory (default: a temporary one) and a numba cache directory in it; what the bench
    made is removed at the end (a given workdir keeps its models and outputs)."""
    own_tmp = workdir is None
    root = Path(tempfile.mkdtemp(prefix="cpift-bench-") if own_tmp else workdir)
    caches: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        caches = Path(tempfile.mkdtemp(prefix="numba-caches-", dir=root))
        yield root, caches
    finally:
        if own_tmp:
            shutil.rmtree(root, ignore_errors=True)
        elif caches is not None:
            shutil.rmtree(caches, ignore_errors=True)


def _inputs(root: Path, models: Sequence[str | os.PathLike], synthetic: str | None, methods: Sequence[str],
            echo: Callable[[str], None]) -> tuple[list[Path], str]:
    """The models (built under ``root`` for a synthetic preset, else validated) and how the results name them."""
    if synthetic:
        label, shape, dtype = parse_synthetic(synthetic)
        paths, source = synthetic_models(root, synthetic, echo=echo), f"synthetic {synthetic}: {describe(shape, dtype)}"
    else:
        paths = [Path(m) for m in models]
        if len(paths) < 2:
            raise ParameterError("bench: give a base model and at least one task model")
        for p in paths:
            Checkpoint(p).close()  # validated before anything runs
        source = "models: " + ", ".join(map(str, paths))
    check_task_count(methods, len(paths) - 1)
    return paths, source


def _out_dir(root: Path) -> Path:
    """``root/out``, marked as the bench's; refused if something else made it."""
    outs = root / "out"
    if outs.exists() and not (outs / OUT_MARKER).is_file() and (not outs.is_dir() or any(outs.iterdir())):
        raise BenchError(f"{outs}: exists and was not made by cpift-merge bench (its runs replace what "
                         f"is there); move it away or pick another --workdir")
    outs.mkdir(exist_ok=True)
    (outs / OUT_MARKER).write_text("cpift-merge bench writes and removes its runs' outputs here\n")
    return outs


def _env(case: Case, caches: Path) -> dict[str, str] | None:
    if case.backend is None:
        return None
    env = {**os.environ, "CPIFT_BACKEND": case.backend}
    if case.backend == "cpu":  # each case its own numba cache: empty for its cold run, then warm
        env["NUMBA_CACHE_DIR"] = str(caches / case.provider / case.op)
    return env


def _compile(cases: list[Case], caches: Path, echo: Callable[[str], None], timeout: float | None) -> dict[Case, dict]:
    """One run of each fused-backend case with its numba cache empty (a fresh directory)."""
    runs = {}
    for case in cases:
        if case.backend != "cpu":
            continue
        env = _env(case, caches)
        shutil.rmtree(env["NUMBA_CACHE_DIR"], ignore_errors=True)
        Path(env["NUMBA_CACHE_DIR"]).mkdir(parents=True)
        _clean(case.out)
        runs[case] = run_case(case, env=env, timeout=timeout)
        _clean(case.out)
        echo(f"cold-compile {case.provider:12s} {case.op:16s} wall {runs[case]['wall']:7.2f} s  work "
             f"{runs[case]['work'] or 0:.2f} s (empty numba cache)"
             + ("  TIMED OUT (killed)" if runs[case]["timed_out"] else ""))
    return runs


def _round(cases: list[Case], condition: str, r: int, repeat: int, caches: Path,
           samples: dict[tuple[Case, str], list[dict]], echo: Callable[[str], None],
           competitors: Sequence[subprocess.Popen] = (), timeout: float | None = None) -> None:
    for case in cases:
        _clean(case.out)
        s = run_case(case, env=_env(case, caches), competitors=competitors, timeout=timeout)
        if case.op != "slerp":  # one model per case would pile up on the disk; SLERP's parity reads its last
            _clean(case.out)
        samples.setdefault((case, condition), []).append(s)
        echo(f"run {r + 1}/{repeat} {condition:6s} {case.provider:17s} {case.op:16s} wall {s['wall']:7.2f} s  work "
             f"{'-' if s['work'] is None else format(s['work'], '.2f')} s  others used "
             f"{s['others_cpu_share'] * 100:.0f}% of the CPUs" + ("  TIMED OUT (killed)" if s["timed_out"] else ""))


def _measure(cases: list[Case], paths: list[Path], *, repeat: int, cold: bool, busy: int, busy_repeat: int,
             mergekit_repeat: int, caches: Path, echo: Callable[[str], None], timeout: float | None = None) -> dict:
    from cpift.merge.tools.bench_report import NOT_ASKED, machine, slerp_parity, summarize, versions

    size = {p: sum(f.stat().st_size for f in p.glob("*.safetensors")) for p in paths}
    load_start = os.getloadavg()
    compile_runs = _compile(cases, caches, echo, timeout)
    samples, pids = _repeats(cases, repeat=repeat, busy=busy, busy_repeat=busy_repeat, mergekit_repeat=mergekit_repeat,
                             caches=caches, echo=echo, timeout=timeout)
    par = slerp_parity(cases)
    cold_walls, cold_state = _cold_runs(cases, paths, caches, echo, timeout, busy) if cold else ({}, NOT_ASKED)
    for case in cases:
        _clean(case.out)
    models = [Checkpoint(p) for p in paths]
    result = {
        "benchmark": "merge_throughput", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "versions": versions(), "device": "cpu",
        "dtype": DTYPE_NAMES[next(iter(models[0].tensors.values())).dtype],
        "model_bytes": {str(p): n for p, n in size.items()},
        "largest_tensor_bytes": max(t.nbytes for m in models for t in m.tensors.values()),
        "largest_shard_bytes": max(f.stat().st_size for p in paths for f in p.glob("*.safetensors")),
        "repeat": repeat, "mergekit_repeat": mergekit_repeat, "slerp_parity_vs_mergekit": par,
        "busy": {"competitors": busy, "repeat": busy_repeat if busy else 0, "command": COMPETITOR,
                 "pids": pids, "pinned": False},
        "cold_cache": cold_state, "case_timeout_s": timeout,
    }
    for m in models:
        m.close()
    result.update(summarize(cases, samples, compile_runs, size, cold_walls, date=result["date"],
                            machine=result["machine"]))
    result["load"].update(loadavg_start=load_start, loadavg_end=os.getloadavg())
    return result


def _repeats(cases: list[Case], *, repeat: int, busy: int, busy_repeat: int, mergekit_repeat: int, caches: Path,
             echo: Callable[[str], None], timeout: float | None) -> tuple[dict, list[int]]:
    """Every round, quiet and (the first ``busy_repeat``) busy: the runs per (case, condition), competitors' pids."""
    samples: dict[tuple[Case, str], list[dict]] = {}
    pids: list[int] = []
    for r in range(repeat):
        _round([c for c in cases if c.provider != "mergekit" or r < mergekit_repeat], "quiet", r, repeat, caches,
               samples, echo, timeout=timeout)
        if busy and r < busy_repeat:
            with competing(busy, pids=pids) as procs:
                _round([c for c in cases if c.provider != "mergekit"], f"busy-{busy}", r, busy_repeat, caches,
                       samples, echo, competitors=procs, timeout=timeout)
    return samples, pids


def _cold_runs(cases: list[Case], paths: list[Path], caches: Path, echo: Callable[[str], None],
               timeout: float | None, busy: int = 0) -> tuple[dict[tuple[Case, str], float], str]:
    """One run per case with the inputs evicted from the page cache first, quiet, then (with ``busy``) one
    more per case but mergekit's beside the competitors: wall times by (case, condition), and how cold."""
    files, left, walls = model_files(paths), 0.0, {}
    rounds = [("quiet", cases)] + ([(f"busy-{busy}", [c for c in cases if c.provider != "mergekit"])] if busy else [])
    for condition, todo in rounds:
        with competing(busy if condition != "quiet" else 0) as procs:
            for case in todo:
                _clean(case.out)
                evict(files)
                left = max(left, resident_fraction(files))
                wall = run_case(case, env=_env(case, caches), competitors=procs, timeout=timeout)["wall"]
                _clean(case.out)
                walls[(case, condition)] = wall
                echo(f"cold {condition:6s} {case.provider:17s} {case.op:16s} wall {wall:.2f} s (inputs evicted)")
    return walls, (f"inputs evicted from the page cache before each cold run (posix_fadvise DONTNEED per file, "
                   f"after sync; at most {left * 100:.1f}% of their pages still cached): see rows' cold_wall_s")
