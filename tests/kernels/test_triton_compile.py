"""The Triton kernels compile for a real GPU target (sm_90) with Triton's own ptxas, no GPU needed.

The interpreter runs kernels as numpy and accepts things the compiler rejects (dtype rules of atomics,
bitcasts, constexpr branches); this compiles every variant the launchers use, so a user's first GPU
run does not meet a compile error the CPU tests could not see.
"""

from __future__ import annotations

import os
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
        for inner, rows in ((1, 2048), (1024, 4)):
            for pas in (0, 1, 2):
                sig = {"x_ptr": dt, "b_ptr": dt, "s_ptr": "*fp32", "hist_ptr": "*i32", "n": "i64", "n_scores": "i64",
                       "block": "i64", "high_bin": "i32", "HAS_BASE": "constexpr", "F64": "constexpr",
                       "WRITE": "constexpr", "PASS": "constexpr", "ROWS": "constexpr", "INNER": "constexpr"}
                yield (f"score-{dt[1:]}-inner{inner}-pass{pas}", S._score_kernel, sig,
                       {"HAS_BASE": True, "F64": dt == "*fp64", "WRITE": pas == 0, "PASS": pas, "ROWS": rows,
                        "INNER": inner})
        sig = {"x_ptr": dt, "b_ptr": dt, "out_ptr": "*u8", "tie_ptr": "*i32", "n": "i64", "value": "fp32",
               "last_tie": "i64", "HAS_BASE": "constexpr", "F64": "constexpr", "BYTES": "constexpr"}
        yield f"pack_cut-{dt[1:]}", M._pack_cut_kernel, sig, {"HAS_BASE": True, "F64": dt == "*fp64", "BYTES": 512}
    for dt in ("*bf16", "*fp32"):
        sig = {"a_ptr": dt, "b_ptr": dt, "ex_ptr": "*u8", "part_ptr": "*fp32", "n": "i64",
               "HAS_EXCLUDE": "constexpr", "BLOCK": "constexpr"}
        yield f"slerp_reduce-{dt[1:]}", L._slerp_reduce_kernel, sig, {"HAS_EXCLUDE": True, "BLOCK": 1024}
        sig = {"a_ptr": dt, "b_ptr": dt, "keep_ptr": "*u8", "out_ptr": "*i16" if dt == "*bf16" else dt, "n": "i64",
               "ca": "fp32", "cb": "fp32", "HAS_KEEP": "constexpr", "OUT_BF16": "constexpr", "BLOCK": "constexpr"}
        yield f"slerp_blend-{dt[1:]}", L._slerp_blend_kernel, sig, {"HAS_KEEP": True, "OUT_BF16": dt == "*bf16",
                                                                     "BLOCK": 1024}
    yield "pack", M._pack_kernel, {"mask_ptr": "*u8", "out_ptr": "*u8", "n": "i64", "BYTES": "constexpr"}, {"BYTES": 512}
    yield "unpack", M._unpack_kernel, {"packed_ptr": "*u8", "out_ptr": "*u8", "m": "i64", "BYTES": "constexpr"}, \
        {"BYTES": 512}
    yield "overlap", M._overlap_kernel, {"p_ptr": "*u8", "q_ptr": "*u8", "part_ptr": "*i32", "m": "i64",
                                         "BYTES": "constexpr"}, {"BYTES": 512}


def main() -> None:
    """Compile every case for sm_90; print one line per kernel and check the histogram atomics."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    for name, fn, sig, consts in _cases():
        ptx = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target).asm["ptx"]
        assert ".visible .entry" in ptx, name
        if consts.get("PASS"):
            # Histogram counts are fire-and-forget reductions (red), not returning atomics.
            assert "red.global" in ptx and "atom.global" not in ptx, name
        print("compiled", name)


def test_kernels_compile_for_sm90(tmp_path):
    if not _ptxas():
        pytest.skip("no ptxas in the triton wheel or on PATH")
    # A fresh process: this one imported triton under TRITON_INTERPRET=1 (tests/conftest.py), and the
    # compiler refuses functions defined in interpreter mode.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # really compile, every run
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled ") == 28, proc.stdout


if __name__ == "__main__":
    main()
