"""Refactors keep outputs byte-identical: every method's, cores' and fuse's tensor files, computed with
the reference (torch) kernels on fixed synthetic models, hash to the digests committed beside this test.

The digests were recorded before the streaming engine's redesign; a change that alters them changes
what cpift computes and must say so (regenerate with CPIFT_WRITE_DIGESTS=1 only for such a change).

SLERP and fuse (whose non-core entries are SLERPed) are recorded on the fused cpu backend: the torch
backend's dot products and norms go through the BLAS library, whose summation order depends on the
CPU (an AMD EPYC and an Intel Xeon, both AVX-512, gave different last bits), while the fused kernels
sum in fixed blocks in a fixed order with no reassociation, the same bits on every x86-64 CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open
from test_bad_input import digest, run_cli
from test_determinism import CASES, fill, odd  # noqa: F401  (odd is a fixture)

DIGESTS = Path(__file__).with_name("output_digests.json")
COMMON = ["--max-shard-size", "300000", "--backend", "torch", "--threads", "2", "-q"]
FIXED_ORDER = ["--max-shard-size", "300000", "--backend", "cpu", "--threads", "2", "-q"]
REDUCING = ("slerp",)  # methods with a dot product: recorded on the fused backend (see above)


def _tensor_files(out: Path) -> dict[str, str]:
    """SHA-256 of each safetensors file's bytes; for mask files (whose header records the input paths,
    which differ run to run) of the tensors and of the metadata less the model identities."""
    found = {}
    for k, v in digest(out).items():
        if not k.endswith(".safetensors"):
            continue
        with safe_open(k, "pt") as f:
            meta = dict(f.metadata() or {})
            if "base" in meta and "task" in meta:
                h = hashlib.sha256(json.dumps({m: meta[m] for m in meta if m not in ("base", "task")},
                                              sort_keys=True).encode())
                for name in sorted(f.keys()):
                    h.update(name.encode() + f.get_tensor(name).numpy().tobytes())
                v = h.hexdigest()
        found[Path(k).relative_to(out).as_posix()] = v
    return found


def _run_all(capsys, models: dict[str, Path], tmp: Path) -> dict[str, dict[str, str]]:
    found = {}
    for method, argv in CASES.items():
        opts = FIXED_ORDER if method in REDUCING else COMMON
        code, _, err = run_cli(capsys, *fill(argv, models), "-o", tmp / method, *opts)
        assert code == 0, err
        found[method] = _tensor_files(tmp / method)
    for gran in ("element", "block:3"):
        code, _, err = run_cli(capsys, "cores", "--base", models["base"], "--model", f"a={models['a']}",
                               "--model", f"b={models['b']}", "--p", "2", "--granularity", gran,
                               "-o", tmp / f"cores-{gran}", "--backend", "torch", "--threads", "2")
        assert code == 0, err
        found[f"cores-{gran}"] = _tensor_files(tmp / f"cores-{gran}")
    masks = tmp / "cores-element"
    code, _, err = run_cli(capsys, "fuse", "--backbone", models["a"],
                           "--task", f"a={models['a']}:{masks / 'a.safetensors'}",
                           "--task", f"b={models['b']}:{masks / 'b.safetensors'}",
                           "-o", tmp / "fuse", *FIXED_ORDER)
    assert code == 0, err
    found["fuse"] = _tensor_files(tmp / "fuse")
    return found


def test_outputs_match_the_committed_digests(capsys, odd, tmp_path):  # noqa: F811
    found = _run_all(capsys, odd, tmp_path)
    if os.environ.get("CPIFT_WRITE_DIGESTS") == "1":
        DIGESTS.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
        pytest.skip("digests written")
    expected = json.loads(DIGESTS.read_text())
    assert sorted(found) == sorted(expected)
    changed = {m: sorted(k for k in found[m] if found[m][k] != expected[m].get(k)) for m in found
               if found[m] != expected[m]}
    assert not changed, f"outputs changed: {changed}"
