"""The wheel holds every module of the source tree, and a regular install works from the repo root."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOTS = {"src/cpift": "cpift"}


def _source_modules() -> set[str]:
    found = set()
    for folder, target in ROOTS.items():
        for py in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in py.parts:
                found.add(f"{target}/{py.relative_to(ROOT / folder).as_posix()}")
    return found


def _build_wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src-copy"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info",
                                                             "__pycache__", "results", "work", ".venv"))
    out = tmp_path / "dist"
    out.mkdir()
    code = f"from setuptools import build_meta as b; print(b.build_wheel({str(out)!r}))"
    run = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return out / run.stdout.strip().splitlines()[-1]


def test_wheel_holds_every_module_and_installs_from_the_repo_root(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        target = tmp_path / "site"
        z.extractall(target)
    missing = _source_modules() - names
    assert not missing, f"modules missing from the wheel: {sorted(missing)[:10]}"
    assert "cpift/py.typed" in names
    assert not any(n.split("/")[0] in {"kernels", "merge", "training", "cli"} for n in names), \
        "no bare top-level kernels/merge/training/cli package may be installed"
    # Run from the repository root, as a user who cloned it would, without the editable finder (-S skips
    # the .pth files): the installed package must win over anything in the working directory.
    purelib = sysconfig.get_paths()["purelib"]
    code = (f"import sys; sys.path.insert(1, {str(target)!r}); sys.path.append({purelib!r}); "
            "import cpift, cpift.merge.methods, cpift.kernels.slerp, cpift.training, cpift.cli.merge_cli; "
            "print(cpift.__file__); print(cpift.slerp.__module__)")
    run = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    first, module = run.stdout.split()
    assert Path(first).is_relative_to(target)
    assert module == "cpift.merge.methods.slerp"


def test_facade_names_are_the_library_functions() -> None:
    import cpift
    from cpift.merge import hub, methods
    from cpift.merge.cpi import cluster, cores, fuse

    assert set(cpift.__all__) >= {"slerp", "ties", "linear", "task_arithmetic", "dare_ties", "dare_linear",
                                  "compute_cores", "cluster_masks", "fuse", "pull", "push"}
    assert cpift.slerp is methods.slerp and cpift.ties is methods.ties
    assert cpift.compute_cores is cores.compute_cores and cpift.cluster_masks is cluster.cluster_masks
    assert cpift.fuse is fuse.fuse and cpift.pull is hub.pull and cpift.push is hub.push
    for name in cpift.__all__:
        assert getattr(cpift, name) is not None
    try:
        cpift.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("unknown facade names must raise AttributeError")


def test_import_cpift_loads_neither_torch_nor_triton() -> None:
    code = "import sys, cpift; print(sorted(m for m in ('torch', 'triton', 'numba') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
