"""The cases ``cpift-merge bench`` measures (merge/tools/bench.py): the floor of each input set, each method
through the cpift CLI and, where it has one, through mergekit with the equivalent YAML config."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cpift.errors import ParameterError
from cpift.merge.io.checkpoint import Checkpoint
from cpift.merge.methods.registry import METHODS as REGISTRY, by_cli



def bench_methods() -> tuple[str, ...]:
    """The commands the bench can time: every registered method's, and fuse (the CPI step)."""
    return (*(s.cli for s in REGISTRY.values()), "fuse")


METHODS = bench_methods()  # as registered at import
DEFAULT_METHODS = ("slerp", "ties", "task-arithmetic")
# The physical floor of a merge of some inputs: read every tensor of each with the safetensors
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


@dataclass(frozen=True)
class Case:
    op: str  # floor, or a method
    provider: str  # floor-N, cpift, mergekit
    cmd: tuple[str, ...]
    inputs: tuple[Path, ...]
    out: Path


def _weights(n: int) -> list[float]:
    return [1.0 if i % 2 == 0 else 0.5 for i in range(n)]


def cpift_args(method: str, base: Path, tasks: list[Path], pair: list[Path]) -> tuple[list[str], list[Path]]:
    """Arguments of ``cpift-merge METHOD`` for the bench (the inputs its roles take, weights, the
    registry's bench parameters) and the inputs it reads."""
    spec = by_cli(method)
    if spec.roles == ("model_a", "model_b"):
        args, inputs = [*map(str, pair)], list(pair)
    elif spec.has_base:
        args, inputs = ["--base", str(base), *map(str, tasks)], [base, *tasks]
    else:
        args, inputs = [*map(str, tasks)], list(tasks)
    if spec.param("weights") is not None:
        args += ["--weights", ",".join(str(w) for w in _weights(len(tasks)))]
    for option, value in spec.bench.items():
        args += [option, value]
    return args, inputs


def mergekit_config(method: str, base: Path, tasks: list[Path], pair: list[Path], dtype: str) -> str:
    """The mergekit YAML of the same merge as ``cpift-merge METHOD`` with cpift_args' parameters."""
    spec = by_cli(method)
    keys = {p.cli: p.mergekit for p in spec.params}
    if spec.roles == ("model_a", "model_b"):
        shared = "".join(f"  {keys[o]}: {v}\n" for o, v in spec.bench.items())
        return (f"merge_method: {spec.name}\nbase_model: {pair[0]}\nmodels:\n  - model: {pair[0]}\n"
                f"  - model: {pair[1]}\nparameters:\n{shared}dtype: {dtype}\n")
    density = spec.bench.get("--density")
    lines = [f"merge_method: {spec.name}"] + ([f"base_model: {base}"] if spec.has_base else []) + ["models:"]
    for t, w in zip(tasks, _weights(len(tasks))):
        lines.append(f"  - model: {t}\n    parameters: {{weight: {w}" + (f", density: {density}}}" if density else "}"))
    normalize = str(spec.mergekit.cpift_normalize).lower()
    lines += [f"parameters:\n  normalize: {normalize}", f"dtype: {dtype}", ""]
    return "\n".join(lines)


def check_fuse() -> None:
    try:
        from cpift.merge.cpi.cores import compute_cores  # noqa: F401
        from cpift.merge.cpi.fuse import fuse  # noqa: F401
    except ImportError:
        raise ParameterError("--methods: fuse is not available in this cpift (cpift.merge.cpi.fuse.fuse or "
                             "cpift.merge.cpi.cores.compute_cores is missing); leave it out of --methods") from None


def _fuse_args(base: Path, tasks: list[Path], outs: Path) -> list[str]:
    """fuse needs each task's core mask: computed once here (p = 1, the paper's), outside the timing."""
    from cpift.merge.cpi.cores import compute_cores

    masks = outs / "masks"
    named = [(f"t{i + 1}", t) for i, t in enumerate(tasks)]
    if not all((masks / f"{n}.safetensors").is_file() for n, _ in named):
        compute_cores(base, named, masks, p=1.0, overwrite=True, progress=False)
    return ["--backbone", str(base), *[a for n, t in named for a in ("--task", f"{n}={t}:{masks / n}.safetensors")]]


def plan_cases(models: Sequence[Path], methods: Sequence[str], outs: Path, *, mergekit: str | None,
               max_shard_size: str, threads: int | None = None) -> list[Case]:
    """The floor of every distinct input set, then each method with cpift (and mergekit); ``threads``
    sets both tools' torch threads (cpift --threads, mergekit -j)."""
    base, tasks = models[0], list(models[1:])
    pair = tasks[:2] if len(tasks) >= 2 else [base, tasks[0]]
    dtype = str(next(iter(Checkpoint(base).tensors.values())).dtype).removeprefix("torch.")
    cli = [sys.executable, "-m", "cpift.cli.merge_cli"]
    cases: list[Case] = []
    floors: dict[tuple[Path, ...], Case] = {}
    for method in methods:
        if method == "fuse":  # the CPI step; mergekit has no equivalent
            args, inputs = _fuse_args(base, tasks, outs), [base, *tasks]
        else:
            args, inputs = cpift_args(method, base, tasks, pair)
        key = tuple(inputs)
        if key not in floors:
            name = f"floor-{len(inputs)}"  # input sets of one size coincide (slerp's pair, linear's tasks)
            floors[key] = Case("floor", name, (sys.executable, "-c", FLOOR, str(outs / name), *map(str, inputs)),
                               key, outs / name)
            cases.append(floors[key])
        out = outs / f"cpift-{method}"
        cases.append(Case(method, "cpift", (*cli, method, *args, "-o", str(out), "-q", "--max-shard-size",
                                            max_shard_size, *(["--threads", str(threads)] if threads else [])),
                          key, out))
        if mergekit is not None and method != "fuse" and by_cli(method).mergekit is not None:
            cfg = outs / f"mergekit-{method}.yml"
            cfg.write_text(mergekit_config(method, base, tasks, pair, dtype))
            out = outs / f"mergekit-{method}"
            cases.append(Case(method, "mergekit", (mergekit, str(cfg), str(out), "--lazy-unpickle",
                                                   "--no-copy-tokenizer", "--quiet", "--no-write-model-card",
                                                   *(["-j", str(threads)] if threads else [])),
                              key, out))
    return cases
