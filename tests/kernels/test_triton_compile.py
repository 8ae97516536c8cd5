"""The Triton kernels compile for a real GPU target (sm_90) with Triton's own ptxas, no GPU needed.

The interpreter runs kernels as numpy and accepts things the compiler rejects (dtype rules of atomics,
bitcasts, constexpr branches); this compiles every variant the launchers use, with the launchers' own
options (kernels/_triton_utils.launch_options), so a user's first GPU run does not meet a compile error
the CPU tests could not see. It also pins the rounding: the PTX holds the fma and IEEE-division forms
each kernel intends (ROUNDING below) and never an approximate division; and every launch in kernels/
passes launch_options() (an ast check), so none leaves enable_fp_fusion to the compiler's default.
"""

from __future__ import annotations

import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from cpift.kernels.backend import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _ptxas() -> bool:
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")) \
        or shutil.which("ptxas") is not None


def _cases():
    from cpift.kernels import _masks_triton as M
    from cpift.kernels import _scores_triton as S
    from cpift.kernels import _slerp_triton as L

    for dt in ("*bf16", "*fp32", "*fp64"):
        for inner, rows in ((1, 4096), (1024, 4)):
            for pas in (0, 1, 2):
                sig = {"x_ptr": dt, "b_ptr": dt, "s_ptr": "*fp32", "hist_ptr": "*i64", "stat_ptr": "*i64", "n": "i64",
                       "n_scores": "i64", "block": "i64", "high_bin": "i32", "HAS_BASE": "constexpr",
                       "F64": "constexpr", "WRITE": "constexpr", "PASS": "constexpr", "ROWS": "constexpr",
                       "INNER": "constexpr", "WINDOW": "constexpr", "STATS": "constexpr"}
                yield (f"score-{dt[1:]}-inner{inner}-pass{pas}", S._score_kernel, sig,
                       {"HAS_BASE": True, "F64": dt == "*fp64", "WRITE": pas == 0, "PASS": pas, "ROWS": rows,
                        "INNER": inner, "WINDOW": min(S.WINDOW, rows), "STATS": False},
                       {"num_warps": 8 if inner == 1 else 4})
        sig = {"x_ptr": dt, "b_ptr": dt, "out_ptr": "*u8", "tie_ptr": "*i32", "n": "i64", "value": "fp32",
               "last_tie": "i64", "HAS_BASE": "constexpr", "F64": "constexpr", "BYTES": "constexpr",
               "PACK": "constexpr"}
        for pack in (True, False):
            yield (f"pack_cut-{dt[1:]}-pack{int(pack)}", M._pack_cut_kernel, sig,
                   {"HAS_BASE": True, "F64": dt == "*fp64", "BYTES": 512, "PACK": pack})
    for dt in ("*bf16", "*fp32"):
        sig = {"a_ptr": dt, "b_ptr": dt, "ex_ptr": "*u8", "part_ptr": "*fp32", "n": "i64",
               "HAS_EXCLUDE": "constexpr", "BLOCK": "constexpr"}
        yield f"slerp_reduce-{dt[1:]}", L._slerp_reduce_kernel, sig, {"HAS_EXCLUDE": True, "BLOCK": 1024}
        sig = {"a_ptr": dt, "b_ptr": dt, "keep_ptr": "*u8", "out_ptr": "*i16" if dt == "*bf16" else dt, "n": "i64",
               "ca": "fp32", "cb": "fp32", "HAS_KEEP": "constexpr", "OUT_BF16": "constexpr", "BLOCK": "constexpr"}
        yield f"slerp_blend-{dt[1:]}", L._slerp_blend_kernel, sig, {"HAS_KEEP": True, "OUT_BF16": dt == "*bf16",
                                                                     "BLOCK": 1024}
    yield "pack", M._pack_kernel, {"mask_ptr": "*u8", "out_ptr": "*u8", "n": "i64", "BYTES": "constexpr"}, \
        {"BYTES": 512}
    yield "unpack", M._unpack_kernel, {"packed_ptr": "*u8", "out_ptr": "*u8", "m": "i64", "BYTES": "constexpr"}, \
        {"BYTES": 512}
    yield "overlap", M._overlap_kernel, {"p_ptr": "*u8", "q_ptr": "*u8", "part_ptr": "*i32", "m": "i64",
                                         "BYTES": "constexpr"}, {"BYTES": 512}
    yield from _delta_merge_cases()


def _delta_merge_cases():
    from cpift.kernels import _ties_triton as T

    for dt in ("*bf16", "*fp32"):
        sig = {"base_ptr": dt, "xs": (dt,) * 3, "out_ptr": "*i16" if dt == "*bf16" else dt, "iprm_ptr": "*i64",
               "cut_v": ("fp32",) * 3, "dens": ("fp32",) * 3, "num_w": ("fp32",) * 3, "w": ("fp32",) * 3,
               "lam": "fp32", "n": "i64", "q0": "i64", "SHIFT": "constexpr", "HAS_CUT": "constexpr",
               "HAS_DROP": "constexpr", "ELECT": "constexpr", "NORMALIZE": "constexpr", "OUT_BF16": "constexpr",
               "ROWS": "constexpr"}
        for mode, (cut, drop, elect, norm) in {"sum": (0, 0, 0, 0), "ties": (1, 0, 1, 1),
                                               "dare_ties": (0, 1, 1, 0)}.items():
            yield (f"delta_merge-{dt[1:]}-{mode}", T._delta_merge_kernel, sig,
                   {"SHIFT": 0, "HAS_CUT": bool(cut), "HAS_DROP": bool(drop), "ELECT": bool(elect),
                    "NORMALIZE": bool(norm), "OUT_BF16": dt == "*bf16", "ROWS": 256})


# name prefix -> (forms the PTX must hold, forms it must not). The torch references fuse the SLERP
# blend's a·ca into b·cb (add_(alpha=)) and every delta weighting (tl.fma in the kernels); block means,
# and the TIES quotient are IEEE divisions (torch's div_), never the approximate div.full.f32.
ROUNDING = {
    "score-fp32-inner1024": (["div.rn.f32"], ["fma.rn.f32"]),
    "score-bf16-inner1024": (["div.rn.f32"], ["fma.rn.f32"]),
    "score-fp64-inner1024": (["div.rn.f64"], []),
    "slerp_blend": (["fma.rn.f32"], []),
    "slerp_reduce": ([], ["fma.rn.f32"]),
    "delta_merge-bf16-ties": (["fma.rn.f32", "div.rn.f32"], []),
    "delta_merge-fp32-ties": (["fma.rn.f32", "div.rn.f32"], []),
    "delta_merge-fp32-sum": (["fma.rn.f32"], ["div.rn.f32"]),
}
NEVER = ["div.full.f32", "div.approx.f32", "div.approx.ftz.f32"]


def main() -> None:
    """Compile every case for sm_90; print one line per kernel and check the histogram atomics."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cpift.kernels._triton_utils import launch_options

    target = GPUTarget("cuda", 90, 32)
    options = launch_options()
    assert options == {"enable_fp_fusion": False}, options  # what every launcher passes on a GPU
    for name, fn, sig, consts, *extra in _cases():  # extra: the launcher's other options (num_warps)
        ptx = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                             options={**options, **(extra[0] if extra else {})}).asm["ptx"]
        assert ".visible .entry" in ptx, name
        if consts.get("PASS"):
            # Histogram counts are fire-and-forget reductions (red), not returning atomics.
            assert "red.global" in ptx and "atom.global" not in ptx, name
        assert not any(form in ptx for form in NEVER), (name, [f for f in NEVER if f in ptx])
        for prefix, (must, must_not) in ROUNDING.items():
            if name.startswith(prefix):
                assert all(f in ptx for f in must) and not any(f in ptx for f in must_not), (name, must, must_not)
                print("rounding", name)
        print("compiled", name)


def test_kernels_compile_for_sm90(tmp_path):
    if not _ptxas():
        pytest.skip("no ptxas in the triton wheel or on PATH")
    # A fresh process: this one imported triton under TRITON_INTERPRET=1 (tests/conftest.py), and the
    # compiler refuses functions defined in interpreter mode.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # really compile, every run
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the launch options, not the default, must decide
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled ") == 37, proc.stdout
    assert proc.stdout.count("rounding ") == 16, proc.stdout


def _launches_without_options(path: pathlib.Path) -> list[str]:
    """Kernel launches `k[grid](...)` that do not pass **launch_options()."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            opts = [k.value for k in node.keywords if k.arg is None]
            if not any(isinstance(v, ast.Call) and getattr(v.func, "id", "") == "launch_options" for v in opts):
                bad.append(f"{path.name}:{node.lineno}")
    return bad


def test_every_launch_states_its_fp_fusion():
    kernels = pathlib.Path(__file__).resolve().parents[2] / "src" / "cpift" / "kernels"
    files = sorted(kernels.glob("_*_triton.py"))
    assert len(files) >= 6
    assert sum(f.read_text().count("**launch_options()") for f in files) >= 12
    bad = [line for f in files for line in _launches_without_options(f)]
    assert not bad, "pass **launch_options() to every kernel launch: " + ", ".join(bad)


if __name__ == "__main__":
    main()
