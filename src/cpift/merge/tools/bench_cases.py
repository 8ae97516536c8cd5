"""The cases ``cpift-merge bench`` measures (merge/tools/bench.py): the floors of each input set, each method
through the cpift CLI on each backend and, where it has one, through mergekit with the equivalent YAML
config; ``cores`` against one read pass of its inputs."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cpift.errors import ParameterError
from cpift.merge.io.checkpoint import Checkpoint
from cpift.merge.methods.registry import METHODS as REGISTRY
from cpift.merge.methods.registry import by_cli


def bench_methods() -> tuple[str, ...]:
    """The commands the bench can time: every registered method's, fuse and cores (the CPI steps)."""
    return (*(s.cli for s in REGISTRY.values()), "fuse", "cores")


METHODS = bench_methods()  # as registered at import
DEFAULT_METHODS = ("slerp", "ties", "task-arithmetic")
# torch: the reference kernels; cpu: the fused CPU kernels (numba). Chosen per child through
# $CPIFT_BACKEND, which every command (merges, fuse, cores) reads when no --backend is given.
BENCH_BACKENDS = ("torch", "cpu")
# The python floor of a merge of some inputs: read every tensor of each with the safetensors
# library, write the first one's tensors back, no math.
FLOOR = """
import sys, time
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
# The physical floor, as `cat` and `dd` would do it: every input file read with large sequential
# reads into one reused 8 MiB buffer, and the first input's bytes written to new files in the output
# directory (write(2) into the page cache, no fsync: the merges do not fsync either); with "-" as the
# output, the read pass alone (the floor of `cores`, whose masks are small).
PHYSICAL = """
import os, sys, time
from pathlib import Path
t0 = time.perf_counter()
out = None if sys.argv[1] == "-" else Path(sys.argv[1])
if out is not None:
    out.mkdir()
buf = memoryview(bytearray(8 << 20))
nread = nwritten = 0
for i, d in enumerate(sys.argv[2:]):
    for f in sorted(Path(d).glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        wfd = os.open(out / f.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644) if out and i == 0 else -1
        try:
            while n := os.readv(fd, [buf]):
                nread += n
                done = 0
                while wfd >= 0 and done < n:
                    done += os.write(wfd, buf[done:n])
                nwritten += done
        finally:
            os.close(fd)
            if wfd >= 0:
                os.close(wfd)
print(f"work_seconds={time.perf_counter() - t0:.4f} read_bytes={nread} written_bytes={nwritten}")
"""


# The disk floor: the physical floor with O_DIRECT (no page cache): every input byte read from the
# disk, one model's bytes written to it, each in 8 MiB page-aligned pieces (a file's tail is written as
# whole 4 KiB blocks, then the file is cut to its size). What a cold merge cannot beat on this disk.
DISK = """
import mmap, os, sys, time
from pathlib import Path
t0 = time.perf_counter()
out = Path(sys.argv[1])
out.mkdir()
buf = memoryview(mmap.mmap(-1, 8 << 20))
nread = nwritten = 0
for i, d in enumerate(sys.argv[2:]):
    for f in sorted(Path(d).glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
        wfd = os.open(out / f.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644) if i == 0 else -1
        size = 0
        try:
            while n := os.readv(fd, [buf]):
                nread += n
                size += n
                whole, done = -(-n // 4096) * 4096, 0
                while wfd >= 0 and done < whole:
                    done += os.write(wfd, buf[done:whole])
        finally:
            os.close(fd)
            if wfd >= 0:
                os.ftruncate(wfd, size)
                os.fsync(wfd)
                os.close(wfd)
                nwritten += size
print(f"work_seconds={time.perf_counter() - t0:.4f} read_bytes={nread} written_bytes={nwritten}")
"""


@dataclass(frozen=True)
class Case:
    op: str  # floor, or a method
    provider: str  # floor-physical-N, floor-python-N, floor-read-N, cpift-torch, cpift-cpu, mergekit
    cmd: tuple[str, ...]
    inputs: tuple[Path, ...]
    out: Path
    backend: str | None = None  # cpift cases: the kernels' backend ($CPIFT_BACKEND of the child)
    params: str = ""  # the method's parameters, as the results' config shows them


def _weights(n: int) -> list[float]:
    return [1.0 if i % 2 == 0 else 0.5 for i in range(n)]


def cpift_args(method: str, base: Path, tasks: list[Path], pair: list[Path]) -> tuple[list[str], list[Path]]:
    """Arguments of ``cpift-merge METHOD`` for the bench (the inputs its Inputs take, weights, the
    registry's bench parameters) and the inputs it reads."""
    spec = by_cli(method)
    args, inputs = spec.inputs.bench_inputs(base, tasks, pair)
    if spec.param("weights") is not None:
        args += ["--weights", ",".join(str(w) for w in _weights(len(spec.inputs.split_refs(inputs)[1])))]
    for option, value in spec.bench.items():
        args += [option, value]
    return args, inputs


def mergekit_config(method: str, base: Path, tasks: list[Path], pair: list[Path], dtype: str) -> str:
    """The mergekit YAML of the same merge as ``cpift-merge METHOD`` with cpift_args' parameters."""
    spec = by_cli(method)
    keys = {p.cli: p.mergekit for p in spec.params}
    _, inputs = spec.inputs.bench_inputs(base, tasks, pair)
    if spec.inputs.lists_base_model:
        shared = "".join(f"  {keys[o]}: {v}\n" for o, v in spec.bench.items())
        return (f"merge_method: {spec.name}\nbase_model: {inputs[0]}\nmodels:\n  - model: {inputs[0]}\n"
                f"  - model: {inputs[1]}\nparameters:\n{shared}dtype: {dtype}\n")
    base_model, tasks = spec.inputs.split_refs(inputs)
    density = spec.bench.get("--density")
    lines = [f"merge_method: {spec.name}"] + ([f"base_model: {base_model}"] if base_model else []) + ["models:"]
    if spec.param("weights") is None:  # model_stock, sce: the fine-tunes alone, the bench's shared settings
        lines += [f"  - model: {t}" for t in tasks]
        shared = [f"  {keys[o]}: {v}" for o, v in spec.bench.items()]
        return "\n".join([*lines, *(["parameters:", *shared] if shared else []), f"dtype: {dtype}", ""])
    for t, w in zip(tasks, _weights(len(tasks))):
        lines.append(f"  - model: {t}\n    parameters: {{weight: {w}" + (f", density: {density}}}" if density else "}"))
    if "normalize" not in spec.mergekit.shared:  # nuslerp, multislerp: weights and their defaults
        return "\n".join([*lines, f"dtype: {dtype}", ""])
    normalize = str(spec.mergekit.cpift_normalize).lower()
    lines += [f"parameters:\n  normalize: {normalize}", f"dtype: {dtype}", ""]
    return "\n".join(lines)


def check_task_count(methods: Sequence[str], tasks: int) -> None:
    """Refuse a method that needs more task models than the bench was given (model-stock needs 2)."""
    for m in methods:
        spec = by_cli(m)
        wrong = spec.inputs.bench_count_error(m, tasks) if spec is not None else None
        if wrong is not None:
            raise ParameterError(wrong)


def check_fuse() -> None:
    try:
        from cpift.merge.cpi.cores import compute_cores  # noqa: F401
        from cpift.merge.cpi.fuse import fuse  # noqa: F401
    except ImportError:
        raise ParameterError("--methods: fuse is not available in this cpift (cpift.merge.fuse.fuse or "
                             "cpift.merge.cores.compute_cores is missing); leave it out of --methods") from None


def check_arguments(methods: Sequence[str], backends: Sequence[str], repeat: int, threads: int | None, busy: int,
                    counts: dict[str, int | None]) -> None:
    """Refuse bad bench arguments before anything runs (``counts``: option name → a run count)."""
    if repeat < 1:
        raise ParameterError(f"--repeat: must be at least 1, got {repeat}")
    if threads is not None and threads < 1:
        raise ParameterError(f"--threads: must be at least 1, got {threads}")
    if busy < 0:
        raise ParameterError(f"--busy: must be 0 or more competing processes, got {busy}")
    for option, n in counts.items():
        if n is not None and not 1 <= n <= repeat:
            raise ParameterError(f"{option}: must be between 1 and --repeat ({repeat}), got {n}")
    known = bench_methods()
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise ParameterError(f"--methods: unknown method '{unknown[0] if unknown else ''}' "
                             f"(use some of {', '.join(known)})")
    bad = [b for b in backends if b not in BENCH_BACKENDS]
    if bad or not backends or len(set(backends)) != len(backends):
        raise ParameterError(f"--backends: '{','.join(backends)}' is not a list of distinct backends among "
                             f"{', '.join(BENCH_BACKENDS)} (e.g. torch,cpu)")
    if "cpu" in backends:
        if importlib.util.find_spec("numba") is None:
            raise ParameterError("--backends: cpu (the fused CPU kernels) needs numba (pip install numba), "
                                 "or use --backends torch")
    if "fuse" in methods:
        check_fuse()


def _fuse_args(base: Path, tasks: list[Path], outs: Path) -> list[str]:
    """fuse needs each task's core mask: computed once here (p = 1, the paper's), outside the timing."""
    from cpift.merge.cpi.cores import compute_cores

    masks = outs / "masks"
    named = [(f"t{i + 1}", t) for i, t in enumerate(tasks)]
    if not all((masks / f"{n}.safetensors").is_file() for n, _ in named):
        compute_cores(base, named, masks, p=1.0, overwrite=True, progress=False)
    return ["--backbone", str(base), *[a for n, t in named for a in ("--task", f"{n}={t}:{masks / n}.safetensors")]]


def _method_args(method: str, base: Path, tasks: list[Path], pair: list[Path],
                 outs: Path) -> tuple[list[str], list[Path], str]:
    """cpift's arguments of ``method`` (output and threads aside), its inputs and its parameters."""
    if method == "cores":  # one task per mask, p = 1 (the paper's); the masks are small: no shards
        named = [a for i, t in enumerate(tasks) for a in ("--model", f"t{i + 1}={t}")]
        return ["--base", str(base), *named, "--p", "1"], [base, *tasks], "p=1"
    if method == "fuse":  # the CPI step; mergekit has no equivalent
        args, inputs = _fuse_args(base, tasks, outs), [base, *tasks]
        params = "p=1 cores, overlap=last, t_k=1/(k+1)"
    else:
        args, inputs = cpift_args(method, base, tasks, pair)
        params = " ".join(a.removeprefix("--") + "=" + b for a, b in zip(args, args[1:]) if a.startswith("--")
                          and a != "--base")
    return args, inputs, params


def plan_cases(models: Sequence[Path], methods: Sequence[str], outs: Path, *, mergekit: str | None,
               max_shard_size: str, threads: int | None = None, backends: Sequence[str] = BENCH_BACKENDS,
               mergekit_methods: Sequence[str] | None = None, disk_floor: bool = False) -> list[Case]:
    """The floors of every distinct input set (physical and python, and the O_DIRECT disk floor with
    ``disk_floor``; one read pass for ``cores``), then each method with cpift on each of ``backends``
    and with mergekit (for ``mergekit_methods``, default all it has); ``threads`` sets both tools'
    threads (cpift --threads, mergekit -j)."""
    base, tasks = models[0], list(models[1:])
    pair = tasks[:2] if len(tasks) >= 2 else [base, tasks[0]]
    dtype = str(next(iter(Checkpoint(base).tensors.values())).dtype).removeprefix("torch.")
    # Not `-m cpift.cli.merge_cli`: run as __main__, the module is imported a second time by the
    # modules that register commands on its group (cli/cpi_cli.py), and their commands go missing.
    cli = [sys.executable, "-c", "from cpift.cli.merge_cli import main; main()"]
    thread_args = ["--threads", str(threads)] if threads else []
    cases: list[Case] = []
    floors: set[tuple[str, tuple[Path, ...]]] = set()

    def floor(kind: str, inputs: tuple[Path, ...]) -> None:
        name = f"floor-{kind}-{len(inputs)}"  # input sets of one size coincide (slerp's pair, linear's tasks)
        if (kind, inputs) not in floors:
            floors.add((kind, inputs))
            script, out = {"python": FLOOR, "disk": DISK}.get(kind, PHYSICAL), outs / name
            target = "-" if kind == "read" else str(out)
            cases.append(Case("floor", name, (sys.executable, "-c", script, target, *map(str, inputs)), inputs, out))

    for method in methods:
        args, inputs, params = _method_args(method, base, tasks, pair, outs)
        key = tuple(inputs)
        for kind in (("read",) if method == "cores" else ("physical", "python", *(("disk",) if disk_floor else ()))):
            floor(kind, key)
        if method != "cores":
            args = [*args, "--max-shard-size", max_shard_size]
        for backend in backends:
            out = outs / f"cpift-{backend}-{method}"
            cases.append(Case(method, f"cpift-{backend}", (*cli, method, *args, "-o", str(out), "-q", *thread_args),
                              key, out, backend=backend, params=params))
        if (mergekit is not None and method not in ("fuse", "cores") and by_cli(method).mergekit is not None
                and (mergekit_methods is None or method in mergekit_methods)):
            cfg = outs / f"mergekit-{method}.yml"
            cfg.write_text(mergekit_config(method, base, tasks, pair, dtype))
            out = outs / f"mergekit-{method}"
            cases.append(Case(method, "mergekit", (mergekit, str(cfg), str(out), "--lazy-unpickle",
                                                   "--no-copy-tokenizer", "--quiet", "--no-write-model-card",
                                                   *(["-j", str(threads)] if threads else [])),
                              key, out, params=params))
    return cases
