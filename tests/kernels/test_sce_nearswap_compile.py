"""The nearswap and SCE Triton kernels compile for sm_90 (Triton's own ptxas, no GPU needed), and with
the launchers' enable_fp_fusion=False their PTX holds no fused multiply-add: the products are rounded
before they are added, as in torch and mergekit (with fusion on, the same source compiles to fmas, so
the check can fail), and the divisions are IEEE (div.rn)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cpift.kernels.backend import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _cases():
    from cpift.kernels import _nearswap_triton as N
    from cpift.kernels import _sce_triton as C

    for dt in ("*bf16", "*fp32"):
        out = "*i16" if dt == "*bf16" else dt
        yield (f"nearswap-{dt[1:]}", N._nearswap_kernel,
               {"a_ptr": dt, "b_ptr": dt, "out_ptr": out, "n": "i64", "t": "fp32", "eps": "fp32",
                "OUT_BF16": "constexpr", "BLOCK": "constexpr"}, {"OUT_BF16": dt == "*bf16", "BLOCK": 1024}, True)
        for cut in (False, True):
            yield (f"sce_combine-{dt[1:]}-cut{int(cut)}", C._combine_kernel,
                   {"base_ptr": dt, "xs": (dt,) * 3, "ws": ("fp32",) * 3, "sc_ptr": "*fp32", "tie_ptr": "*i64",
                    "out_ptr": out, "n": "i64", "cut_v": "fp32", "eps": "fp32", "HAS_CUT": "constexpr",
                    "OUT_BF16": "constexpr", "BLOCK": "constexpr"},
                   {"HAS_CUT": cut, "OUT_BF16": dt == "*bf16", "BLOCK": 1024}, True)
        yield (f"sce_variance-{dt[1:]}", C._variance_kernel,
               {"base_ptr": dt, "xs": (dt,) * 2, "out_ptr": "*fp32", "n": "i64", "BLOCK": "constexpr"},
               {"BLOCK": 1024}, False)
        yield (f"sce_square_sums-{dt[1:]}", C._square_sums_kernel,
               {"base_ptr": dt, "xs": (dt,) * 2, "sc_ptr": "*fp32", "tie_ptr": "*i64", "part_ptr": "*fp64",
                "n": "i64", "cut_v": "fp32", "HAS_CUT": "constexpr", "BLOCK": "constexpr"},
               {"HAS_CUT": True, "BLOCK": 1024}, False)


def main() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cpift.kernels._triton_utils import launch_options

    target = GPUTarget("cuda", 90, 32)
    options = launch_options()  # what the launchers pass on a GPU
    assert options == {"enable_fp_fusion": False}, options
    for name, fn, sig, consts, rounded in _cases():
        ptx = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                             options=options).asm["ptx"]
        assert ".visible .entry" in ptx, name
        if rounded:
            assert "fma.rn.f32" not in ptx and "div.rn.f32" in ptx, name
            fused = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                                   options={"enable_fp_fusion": True}).asm["ptx"]
            assert "fma.rn.f32" in fused, name  # the option is what keeps the products rounded
        print("compiled", name)


def test_kernels_compile_for_sm90_without_fma(tmp_path):
    from test_triton_compile import _ptxas

    if not _ptxas():
        pytest.skip("no ptxas in the triton wheel or on PATH")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiler refuses interpreted functions
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled ") == 10, proc.stdout


if __name__ == "__main__":
    main()
