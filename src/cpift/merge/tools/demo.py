"""``cpift-merge demo``: build a base and two fine-tunes, merge them with five methods (``METHODS``),
then run the CPI chain cores → cluster → fuse on them, and report.

The demo writes only into directories it created: its workdir is new, empty, or one an
earlier demo made, which the file ``.cpift-demo`` in it records; anything else is refused before the
first byte is written, naming the path. Inside, every checkpoint and output is published through
merge/io/publish.py, so a model the user put there later is refused too, never replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from cpift.errors import UnsafeOutputError
from cpift.merge import methods
from cpift.merge.io.publish import check_not_protected, check_output, publish_dir, write_atomic
from cpift.merge.tools.synthetic import PRESETS, LlamaShape, describe, make_checkpoint

METHODS = ("slerp", "linear", "task-arithmetic", "ties", "dare-ties")  # the merges run_demo runs, in order
DEMO_MARKER = ".cpift-demo"
OWNED = ("models", "merged", "cores")  # what the demo creates in its workdir


def run_demo(workdir: str | None, *, size: str = "tiny", echo: Callable[[str], None] = print) -> list:
    """Build checkpoints in ``workdir`` (a temporary directory if None, removed after) and run each
    merge once. With a workdir, each step is printed as the command that reruns it."""
    root = claim_workdir(Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="cpift-demo-")))
    if not workdir:  # no command and no path naming a folder about to be deleted: paths relative to it
        echo, say = (lambda line, show=echo: show(line.replace(f"{root}{os.sep}", ""))), (lambda line: None)
    else:
        say = echo
    shape = PRESETS[size]
    for path in _targets(root):  # all refused before the first byte, not one by one as they come
        check_output(path, overwrite=True)
    try:
        base, task_a, task_b = _build_models(root / "models", shape, echo, shown=bool(workdir))
        out = root / "merged"
        runs = _method_runs(base, task_a, task_b, out)
        results = []
        for cmd, run in runs:
            say(f"$ {cmd}")
            r = run()
            echo("  " + r.summary())
            results.append(r)
        results += _cpi_chain(root, base, {"task_a": task_a, "task_b": task_b}, echo, say)
        if workdir:
            echo(f"outputs are Hugging Face checkpoints: AutoModelForCausalLM.from_pretrained('{out / 'slerp'}')")
        else:
            echo("the demo ran in a temporary directory, removed as it ends; rerun with --workdir DIR "
                 "to keep them and see each step as a command to run yourself")
        return results
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _build_models(models: Path, shape, echo: Callable[[str], None], *, shown: bool) -> tuple[Path, Path, Path]:
    """The base and two task models, bfloat16 checkpoints of the preset ``shape``."""
    echo(f"building 3 checkpoints{f' in {models}' if shown else ''}: {describe(shape, torch.bfloat16)}")
    t0 = time.perf_counter()
    base = _checkpoint(models / "base", shape, seed=0)
    task_a = _checkpoint(models / "task_a", shape, base_seed=0, seed=1)
    task_b = _checkpoint(models / "task_b", shape, base_seed=0, seed=2)
    echo(f"built in {time.perf_counter() - t0:.1f} s")
    return base, task_a, task_b


def _method_runs(base: Path, task_a: Path, task_b: Path, out: Path) -> list[tuple[str, Callable[[], Any]]]:
    """Each method's merge, as the command that reruns it (runs as typed) and the call that does it."""
    common: dict[str, Any] = dict(progress=False, overwrite=True)
    a, b, bs = f"{task_a}", f"{task_b}", f"--base {base}"
    o = f"--overwrite -q --threads 1 -o {out}"
    return [
        (f"cpift-merge slerp {a} {b} --t 0.3 {o}/slerp",
         lambda: methods.slerp(task_a, task_b, out / "slerp", t=0.3, **common)),
        (f"cpift-merge linear {a} {b} --weights 1,3 {o}/linear",
         lambda: methods.linear([task_a, task_b], out / "linear", weights=[1.0, 3.0], **common)),
        (f"cpift-merge task-arithmetic {bs} {a} {b} --lambda 0.8 {o}/task_arithmetic",
         lambda: methods.task_arithmetic(base, [task_a, task_b], out / "task_arithmetic", lam=0.8, **common)),
        (f"cpift-merge ties {bs} {a} {b} --density 0.3 {o}/ties",
         lambda: methods.ties(base, [task_a, task_b], out / "ties", density=0.3, **common)),
        (f"cpift-merge dare-ties {bs} {a} {b} --density 0.5 --seed 0 {o}/dare_ties",
         lambda: methods.dare_ties(base, [task_a, task_b], out / "dare_ties", density=0.5, **common)),
    ]


def claim_workdir(root: Path) -> Path:
    """Create the workdir, or adopt an empty one or one an earlier demo made; refuse anything else.

    Raises:
        UnsafeOutputError: ``root`` is protected, not a directory, or holds something the demo did not
            create (the message names the first of the demo's own paths found there).
    """
    check_not_protected(root, what="workdir")
    if os.path.lexists(root) and (root.is_symlink() or not root.is_dir()):
        raise UnsafeOutputError(f"{root}: the demo workdir exists and is not a directory; choose a new --workdir")
    if root.is_dir() and any(root.iterdir()) and not (root / DEMO_MARKER).is_file():
        clash = next((p for p in [*_targets(root), *(root / name for name in OWNED)] if os.path.lexists(p)), root)
        raise UnsafeOutputError(f"{clash}: exists and was not created by cpift-merge demo (no {DEMO_MARKER} in "
                                f"{root}); the demo writes only into directories it creates: choose a new --workdir")
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(root / DEMO_MARKER, json.dumps({"written_by": "cpift-merge demo", "created": list(OWNED)}) + "\n")
    for name in ("models", "merged"):
        (root / name).mkdir(exist_ok=True)
    return root


def _targets(root: Path) -> list[Path]:
    """Every directory the demo writes (each replaced only if it is a cpift output, merge/io/publish.py)."""
    return [*(root / "models" / m for m in ("base", "task_a", "task_b")), root / "cores",
            *(root / "merged" / m.replace("-", "_") for m in (*METHODS, "fused"))]


def _checkpoint(path: Path, shape: LlamaShape, **seeds: int) -> Path:
    """A synthetic checkpoint, published as a cpift output (never over a directory cpift did not write)."""
    with publish_dir(check_output(path, overwrite=True), overwrite=True) as tmp:
        make_checkpoint(tmp, shape, max_shard_size="40MB", **seeds)
    return path


def _cpi_chain(root: Path, base: Path, tasks: dict[str, Path], echo: Callable[[str], None],
               say: Callable[[str], None]) -> list:
    """cores → cluster → fuse, as a user would run them (the backbone here: task_a)."""
    from cpift.merge.cpi.cluster import cluster_masks
    from cpift.merge.cpi.cores import compute_cores
    from cpift.merge.cpi.fuse import fuse

    cores_dir = root / "cores"
    say(f"$ cpift-merge cores --base {base} " + " ".join(f"--model {n}={p}" for n, p in tasks.items())
         + f" --p 1 --overwrite -q --threads 1 -o {cores_dir}")
    cores = compute_cores(base, list(tasks.items()), cores_dir, p=1, progress=False, overwrite=True)
    echo("\n".join("  " + line for line in cores.table().splitlines()))
    echo("  " + cores.summary())
    masks = [cores_dir / f"{n}.safetensors" for n in tasks]
    say("$ cpift-merge cluster " + " ".join(f"{cores_dir / n}.safetensors" for n in tasks) + " --tau 0.1 --seed 0")
    groups = cluster_masks(masks, tau=0.1, seed=0)
    echo("\n".join("  " + line for line in groups.table().splitlines()))
    order = [n for stage in groups.stages() for n in stage]
    say(f"$ cpift-merge fuse --backbone {tasks['task_a']} "
         + " ".join(f"--task {n}={tasks[n]}:{cores_dir / n}.safetensors" for n in order)
         + f" --overwrite -q --threads 1 -o {root / 'merged' / 'fused'}")
    fused = fuse(tasks["task_a"], [(n, tasks[n], cores_dir / f"{n}.safetensors") for n in order],
                 root / "merged" / "fused", progress=False, overwrite=True, max_shard_size="5GB")
    echo("  " + fused.summary())
    return [fused]
