"""``cpift-merge demo``: build a base and two fine-tunes, merge them with every method, then run the
CPI chain cores → cluster → fuse on them, and report."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from cpift.merge import methods
from cpift.merge.tools.synthetic import PRESETS, describe, make_checkpoint


def run_demo(workdir: str | None, *, size: str = "small", echo: Callable[[str], None] = print) -> list:
    """Build checkpoints in ``workdir`` (a temporary directory if None) and run each merge once."""
    if workdir:
        from cpift.merge.io.publish import check_not_protected

        check_not_protected(workdir, what="workdir")
        _check_demo_workdir(Path(workdir))
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="cpift-demo-"))
    shape = PRESETS[size]
    try:
        models = root / "models"
        echo(f"building 3 checkpoints in {models}: {describe(shape, torch.bfloat16)}")
        t0 = time.perf_counter()
        base = make_checkpoint(models / "base", shape, seed=0, max_shard_size="40MB")
        task_a = make_checkpoint(models / "task_a", shape, base_seed=0, seed=1, max_shard_size="40MB")
        task_b = make_checkpoint(models / "task_b", shape, base_seed=0, seed=2, max_shard_size="40MB")
        echo(f"built in {time.perf_counter() - t0:.1f} s")
        out = root / "merged"
        common = dict(progress=False, overwrite=True)
        a, b, bs = f"{task_a}", f"{task_b}", f"--base {base}"
        o = f"--overwrite -q --threads 1 -o {out}"  # what each run below does, as a command that runs as typed
        runs = [
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
        out.mkdir(exist_ok=True)
        results = []
        for cmd, run in runs:
            echo(f"$ {cmd}")
            r = run()
            echo("  " + r.summary())
            results.append(r)
        results += _cpi_chain(root, base, {"task_a": task_a, "task_b": task_b}, echo)
        echo(f"outputs are Hugging Face checkpoints: AutoModelForCausalLM.from_pretrained('{out / 'slerp'}')")
        return results
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _check_demo_workdir(root: Path) -> None:
    """The demo writes models/, merged/ and cores/ in ``root``: refuse a non-directory, and any of those
    three that already holds something no earlier demo wrote."""
    from cpift.errors import UnsafeOutputError
    from cpift.merge.io.publish import is_cpift_output

    if os.path.lexists(root) and (root.is_symlink() or not root.is_dir()):
        raise UnsafeOutputError(f"{root}: the demo workdir exists and is not a directory; choose a new --workdir")
    models = root / "models"
    for sub in ("base", "task_a", "task_b"):
        path = models / sub
        if os.path.lexists(path) and not (path / "config.json").is_file():
            raise UnsafeOutputError(f"{path}: exists and is not a demo checkpoint; choose a new --workdir")
    for path in [root / "cores", *(root / "merged" / m for m in
                                   ("slerp", "linear", "task_arithmetic", "ties", "dare_ties", "fused"))]:
        if os.path.lexists(path) and not is_cpift_output(path):
            raise UnsafeOutputError(f"{path}: exists and was not written by cpift; choose a new --workdir")


def _cpi_chain(root: Path, base: Path, tasks: dict[str, Path], echo: Callable[[str], None]) -> list:
    """cores → cluster → fuse, as a user would run them (the backbone here: task_a)."""
    from cpift.merge.cpi.cluster import cluster_masks
    from cpift.merge.cpi.cores import compute_cores
    from cpift.merge.cpi.fuse import fuse

    cores_dir = root / "cores"
    echo(f"$ cpift-merge cores --base {base} " + " ".join(f"--model {n}={p}" for n, p in tasks.items())
         + f" --p 1 --overwrite -q --threads 1 -o {cores_dir}")
    cores = compute_cores(base, list(tasks.items()), cores_dir, p=1, progress=False, overwrite=True)
    echo("\n".join("  " + line for line in cores.table().splitlines()))
    echo("  " + cores.summary())
    masks = [cores_dir / f"{n}.safetensors" for n in tasks]
    echo("$ cpift-merge cluster " + " ".join(f"{cores_dir / n}.safetensors" for n in tasks) + " --tau 0.1 --seed 0")
    groups = cluster_masks(masks, tau=0.1, seed=0)
    echo("\n".join("  " + line for line in groups.table().splitlines()))
    order = [n for stage in groups.stages() for n in stage]
    echo(f"$ cpift-merge fuse --backbone {tasks['task_a']} "
         + " ".join(f"--task {n}={tasks[n]}:{cores_dir / n}.safetensors" for n in order)
         + f" --overwrite -q --threads 1 -o {root / 'merged' / 'fused'}")
    fused = fuse(tasks["task_a"], [(n, tasks[n], cores_dir / f"{n}.safetensors") for n in order],
                 root / "merged" / "fused", progress=False, overwrite=True, max_shard_size="5GB")
    echo("  " + fused.summary())
    return [fused]
