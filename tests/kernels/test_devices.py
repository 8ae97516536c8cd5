"""Every kernel entry point keeps its work on the inputs' device, and gives the torch path's result.

A tensor factory parametrised by device builds realistic bf16 deltas (exact zeros, many ties at the
cut); each entry point runs on that device (the CPU under TRITON_INTERPRET=1 with backend="triton",
CUDA with backend="auto" when a GPU is present, skipped otherwise), and its result is compared with
backend="torch" on CPU copies. A static check (no GPU needed) refuses any tensor allocation in
kernels/ without an explicit device=, the failure a CPU run cannot show (a CPU scratch buffer met by a
CUDA input raises a device mismatch only on a GPU).
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from _compare import assert_exact

from cpift.kernels import dare, masks, nearswap, sce, scores, select, slerp, ties, topk
from cpift.kernels.backend import HAS_TRITON
from cpift.kernels.linear import linear, weighted_sum

KERNELS = pathlib.Path(__file__).resolve().parents[2] / "src" / "cpift" / "kernels"
ALLOCATORS = {"empty", "zeros", "ones", "full", "tensor", "arange", "as_tensor", "rand", "randn", "randint"}

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
N = 3 * 4096 + 77  # several tie-count slices of kernels/_masks_triton.py, and a ragged tail


def _backend(device: str) -> str:
    return "triton" if device == "cpu" else "auto"


def bf16_models(device: str, count: int = 3, n: int = N) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A bf16 base and task models whose deltas are quantized (ties), a quarter exactly zero."""
    base = torch.randn(n, dtype=torch.float64).to(torch.bfloat16)
    xs = []
    for _ in range(count):
        step = torch.randint(-6, 7, (n,), dtype=torch.float64) * 2.0 ** -8
        step = torch.where(torch.rand(n) < 0.25, 0.0, step)
        xs.append((base.double() + step).to(torch.bfloat16))
    return base.to(device), [x.to(device) for x in xs]


def _cpu(t):
    return t.cpu() if isinstance(t, torch.Tensor) else [x.cpu() for x in t]


def _same(got: torch.Tensor, want: torch.Tensor, device: str) -> None:
    assert got.device.type == torch.device(device).type
    assert_exact(got.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_selection_entry_points(device: str) -> None:
    be = _backend(device)
    base, xs = bf16_models(device)
    x = xs[0]
    k = N // 3  # inside a run of ties: the cut splits them (checked below)
    cut = select.magnitude_cut(x, base, k, backend=be)
    want = select.magnitude_cut(_cpu(x), _cpu(base), k, backend="torch")
    assert cut == want == select.magnitude_cut_ref(_cpu(x), _cpu(base), k)
    assert 0 <= cut.last_tie < N - 1, "the case must split a tie"
    ties_at = ((_cpu(x).float() - _cpu(base).float()).abs() == cut.value).nonzero().flatten().tolist()
    assert ties_at[-1] // 4096 >= 2, "the ties must span several slices of the tie search"
    for r in (1, len(ties_at) // 2, len(ties_at)):
        assert select.tie_index(x, base, cut.value, r, backend=be) == ties_at[r - 1]
    with pytest.raises(ValueError, match="only"):
        select.tie_index(x, base, cut.value, len(ties_at) + 1, backend=be)
    packed, t = masks.pack_cut(x, base, cut=cut, backend=be)
    packed0, t0 = masks.pack_cut(_cpu(x), _cpu(base), cut=cut, backend="torch")
    _same(packed, packed0, device)
    assert t == t0
    _same(masks.unpack_bits(packed, N, backend=be), masks.unpack_bits(packed0, N, backend="torch"), device)
    assert masks.overlap(packed, packed, backend=be) == masks.overlap(packed0, packed0, backend="torch")
    s = scores.score_deltas(x, base, block=7, backend=be)
    _same(s, scores.score_deltas(_cpu(x), _cpu(base), block=7, backend="torch"), device)


@pytest.mark.parametrize("device", DEVICES)
def test_global_top_k(device: str) -> None:
    be = _backend(device)
    base, xs = bf16_models(device, n=5001)
    tensors = [(base, xs[:2]), (base[:4001], [x[:4001] for x in xs[1:]])]
    results = []
    for dev_tensors, backend in ((tensors, be), ([(_cpu(b), _cpu(t)) for b, t in tensors], "torch")):
        top = topk.GlobalTopK(2, device=dev_tensors[0][0].device, backend=backend)
        for b, t in dev_tensors:
            top.count(b, t)
        top.fix([3000, 4500])
        for b, t in dev_tensors:
            top.refine(b, t)
        packs = [top.pack(b, t) for b, t in dev_tensors]
        results.append(packs)
    for got, want in zip(*results):
        for (p, c), (p0, c0) in zip(got, want):
            _same(p, p0, device)
            assert c == c0


@pytest.mark.parametrize("device", DEVICES)
def test_combines(device: str) -> None:
    be = _backend(device)
    base, xs = bf16_models(device)
    b0, x0 = _cpu(base), _cpu(xs)
    ws = [1.0, 0.5, 0.25]
    cuts = [select.magnitude_cut(x, base, N // 3, backend=be) for x in xs]
    for opts in (dict(elect_sign=True, cuts=cuts), dict(elect_sign=False, drop_density=0.5, drop_seeds=[1, 2, 3])):
        out = torch.empty(N, dtype=torch.bfloat16, device=device)
        got = ties.delta_merge(base, xs, ws, out=out, backend=be, **opts)
        _same(got, ties.delta_merge(b0, x0, ws, out=torch.empty(N, dtype=torch.bfloat16), backend="torch", **opts),
              device)
    _same(dare.keep_mask(5, 3, N, 0.3).to(device).cpu(), dare.keep_mask(5, 3, N, 0.3), "cpu")
    got = sce.sce_merge(base, xs, 0.5, out=torch.empty(N, dtype=torch.bfloat16, device=device), backend=be)
    _same(got, sce.sce_merge(b0, x0, 0.5, out=torch.empty(N, dtype=torch.bfloat16), backend="torch"), device)
    got = nearswap.nearswap(xs[0], xs[1], 0.01, out=torch.empty(N, dtype=torch.bfloat16, device=device), backend=be)
    _same(got, nearswap.nearswap(x0[0], x0[1], 0.01, out=torch.empty(N, dtype=torch.bfloat16), backend="torch"),
          device)
    got = linear(xs, [1.0, 2.0, 1.0], out=torch.empty(N, dtype=torch.bfloat16, device=device), backend=be)
    assert got.device.type == torch.device(device).type
    got = weighted_sum(xs, [0.5, 0.25, 0.25], out=torch.empty(N, dtype=torch.bfloat16, device=device), backend=be)
    _same(got, weighted_sum(x0, [0.5, 0.25, 0.25], out=torch.empty(N, dtype=torch.bfloat16), backend="torch"),
          device)
    ca, cb = 0.75, 0.25
    got = slerp.slerp_blend(xs[0], xs[1], ca, cb, out=torch.empty(N, dtype=torch.bfloat16, device=device), backend=be)
    assert got.device.type == torch.device(device).type


@pytest.mark.parametrize("device", DEVICES)
def test_float64_fallbacks_stay_on_the_device(device: str) -> None:
    # float64 inputs run the torch path whatever the backend: its scratch must follow the inputs.
    base, xs = bf16_models(device, count=2, n=2001)
    base, xs = base.double(), [x.double() for x in xs]
    cut = select.magnitude_cut(xs[0], base, 700, backend=_backend(device))
    assert cut == select.magnitude_cut_ref(_cpu(xs[0]), _cpu(base), 700)
    out = torch.empty(2001, dtype=torch.float64, device=device)
    got = ties.delta_merge(base, xs, [1.0, 1.0], cuts=[cut, cut], elect_sign=True, out=out, backend=_backend(device))
    want = ties.delta_merge(_cpu(base), _cpu(xs), [1.0, 1.0], cuts=[cut, cut], elect_sign=True,
                            out=torch.empty(2001, dtype=torch.float64), backend="torch")
    _same(got, want, device)


def _allocations_without_device(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text())
    bad = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and node.func.attr in ALLOCATORS and not any(k.arg == "device" for k in node.keywords)):
            bad.append(f"{path.name}:{node.lineno}: torch.{node.func.attr}(...) without device=")
    return bad


def test_every_allocation_in_kernels_names_its_device() -> None:
    files = sorted(KERNELS.glob("*.py"))
    assert len(files) > 20
    bad = [line for f in files for line in _allocations_without_device(f)]
    assert not bad, "allocate on the inputs' device (device=x.device) or say device='cpu':\n" + "\n".join(bad)


def test_the_static_check_can_fail(tmp_path) -> None:
    src = tmp_path / "k.py"
    src.write_text("import torch\na = torch.zeros(3)\nb = torch.empty(3, device=x.device)\n")
    assert _allocations_without_device(src) == ["k.py:2: torch.zeros(...) without device="]
