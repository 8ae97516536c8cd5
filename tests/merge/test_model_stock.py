"""model_stock: the kernels (torch, fused CPU, Triton under the interpreter) against an independent
float64 oracle on awkward shapes and dtypes, the singular-denominator guard, the method end to end
through `cpift-merge model-stock` and through a mergekit YAML, bad input, and parity with mergekit
itself where `CPIFT_MERGEKIT_YAML` names a mergekit-yaml."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from oracles import stock64
from references import assert_matches, load_state
from safetensors.torch import save_file
from test_bad_input import assert_user_error, no_output, run_cli

from cpift.kernels.backend import HAS_NUMBA, HAS_TRITON
from cpift.kernels.model_stock import delta_gram, model_stock, model_stock_rows, stock_ratio
from cpift.kernels.threads import serial_reductions
from cpift.merge import methods

MERGEKIT = os.environ.get("CPIFT_MERGEKIT_YAML")
SHAPES = [(1,), (1023,), (3000,), (1 << 18) + 1, (33, 97), (1, 5), (7, 1)]
SHAPE_IDS = ["n1", "n1023", "n3000", "chunk+1", "33x97", "1x5", "7x1"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
BACKENDS = ["torch"] + (["cpu"] if HAS_NUMBA else [])


def inputs(shape, dtype, n, seed=0):
    """A base and n fine-tunes whose deltas share a component (so t is well inside (0, 1)), all entries
    non-zero."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    base = base + torch.where(base < 0, -0.1, 0.1)
    common = 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    xs = [base + common + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
    return base.to(dtype), [x.to(dtype) for x in xs]


# Relative error of t allowed, from the reduction: the fused CPU kernel sums float64 products in float64
# (t to float32 accuracy); Triton folds float32 partials of 1024 entries; the torch path's float32
# torch.dot over 2^18-entry chunks on one thread (measured 1.3e-5 at 2^18 + 1 entries), and the per-row
# form's float32 row dots, are the loosest.
T_ERR = {"cpu": 1e-6, "triton": 1e-5, "torch": 1e-4, "rows": 1e-4}


def check(got, base, xs, filter_wise, name="", t_err=1e-5):
    """got within the rounding of the float64 result, plus float32 rounding of the blend (4 eps of the
    inputs' magnitudes, times max(1, |t|)) and the effect of an error of t_err·max(1, |t|) in t."""
    ref, t = stock64(base, xs, filter_wise)
    rows = ref.reshape(t.shape[0], -1)
    mean_delta = (sum(x.double().reshape(rows.shape) for x in xs) / len(xs) - base.double().reshape(rows.shape)).abs()
    t_room = t_err * t.abs().clamp(min=1.0)[:, None] * mean_delta
    blend = ((base.double().abs() + sum(x.double().abs() for x in xs)).reshape(rows.shape)
             * t.abs().clamp(min=1.0)[:, None])
    scale = blend + t_room / (4 * torch.finfo(torch.float32).eps)  # assert_matches allows 4 eps × scale
    assert_matches(got.reshape(base.shape), ref, name, scale.reshape(base.shape))


def shape_of(s):
    return s if isinstance(s, tuple) else (s,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 3], ids=["N2", "N3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_whole_tensor_matches_float64(shape, dtype, n, backend):
    base, xs = inputs(shape_of(shape), dtype, n)
    out = torch.empty(base.numel(), dtype=dtype)
    t = model_stock(base.reshape(-1), [x.reshape(-1) for x in xs], out=out, backend=backend)
    want = float(stock64(base, xs)[1])
    assert abs(t - want) <= T_ERR[backend] * max(1.0, abs(want)), (t, want)
    check(out, base, xs, False, f"{shape}", T_ERR[backend])


@pytest.mark.parametrize("n", [2, 3], ids=["N2", "N3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(33, 97), (1, 5), (7, 1), (3, 1 << 17), (5, 3001)],
                         ids=["33x97", "1x5", "7x1", "3xhalfchunk", "5x3001"])
def test_rows_match_float64(shape, dtype, n):
    base, xs = inputs(shape, dtype, n)
    out = torch.empty(base.numel(), dtype=dtype)
    with serial_reductions():  # as the method runs it
        model_stock_rows(base.reshape(-1), [x.reshape(-1) for x in xs], shape[-1], out=out)
    check(out, base, xs, True, f"{shape}", T_ERR["rows"])
    if shape[0] > 1:  # the rows really get different t
        assert stock64(base, xs, True)[1].unique().numel() > 1


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("length", [1, 1023, 3000], ids=["n1", "n1023", "n3000"])
def test_triton_interpreter_matches_float64_and_torch(length, dtype):
    base, xs = inputs((length,), dtype, 3)
    got, naive = torch.empty(length, dtype=dtype), torch.empty(length, dtype=dtype)
    t = model_stock(base, xs, out=got, backend="triton")
    t_torch = model_stock(base, xs, out=naive, backend="torch")
    assert abs(t - t_torch) <= T_ERR["torch"] * max(1.0, abs(t_torch))
    check(got, base, xs, False, t_err=T_ERR["triton"])


def test_gram_is_the_same_on_every_backend():
    base, xs = inputs((3 * (1 << 18) + 5,), torch.bfloat16, 3)
    want = delta_gram(base, xs, backend="torch")
    for be in BACKENDS:
        g = delta_gram(base, xs, backend=be)
        assert torch.allclose(g, g.T) and torch.allclose(g, want, rtol=1e-5), be


def _guard_cases():
    a = torch.tensor([0.5, -1.25, 2.0, 0.75])
    yield "N2-opposite", [a, -a]
    # three deltas at 120° (pairwise cosine −1/2): 1 + 2·c = 0
    yield "N3-120deg", [torch.tensor([1.0, -1.0, 0.0]), torch.tensor([0.0, 1.0, -1.0]), torch.tensor([-1.0, 0.0, 1.0])]


@pytest.mark.parametrize("case", list(_guard_cases()), ids=lambda c: c[0])
def test_singular_denominator_gives_the_base(case):
    """Where 1 + (N−1)·c is (within 1e-6 of) 0, t = 0 and the output is the base, bit for bit (mergekit's
    guard: without it t would be ±inf or ~1e7 here)."""
    _, deltas = case
    base = torch.full_like(deltas[0], 3.0)
    xs = [base + d for d in deltas]
    gram = torch.tensor([[float(di @ dj) for dj in deltas] for di in deltas], dtype=torch.float64)
    assert float(stock_ratio(gram)) == 0.0
    for be in BACKENDS:
        out = torch.empty_like(base)
        assert model_stock(base, xs, out=out, backend=be) == 0.0
        assert torch.equal(out, base), be
    out = torch.empty_like(base)
    model_stock_rows(base, xs, base.numel(), out=out)
    assert torch.equal(out, base)
    assert torch.equal(stock64(base, xs)[0], base.double())


def test_identical_deltas_give_the_average_and_zero_deltas_the_base():
    base, (x,) = inputs((1001,), torch.float32, 1)
    assert float(stock_ratio(delta_gram(base, [x, x.clone(), x.clone()]))) == pytest.approx(1.0, abs=1e-6)
    out = torch.empty_like(base)
    assert model_stock(base, [base.clone(), base.clone()], out=out) == 0.0 and torch.equal(out, base)


# --------------------------------------------------------------------------------------------------
# The method on checkpoints: CLI, mergekit YAML, bad input


@pytest.fixture(scope="module")
def stock(tmp_path_factory, families):
    """base + 3 fine-tunes per dtype whose deltas share a component (t ≈ 0.5–0.8, not ≈ 0 as for
    independent perturbations), single-file checkpoints written with the safetensors library."""
    root = tmp_path_factory.mktemp("stock")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        src = families[("llama", dtype)]["base"]
        state = load_state(src)
        g = torch.Generator().manual_seed(7)
        common = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
        paths = {}
        for name in ("base", "ft1", "ft2", "ft3"):
            d = root / f"{str(dtype).removeprefix('torch.')}-{name}"
            d.mkdir()
            shutil.copy(src / "config.json", d / "config.json")
            tensors = state if name == "base" else {
                k: (v.double() + common[k] + 0.01 * torch.randn(v.shape, generator=g)).to(dtype).contiguous()
                for k, v in state.items()}
            save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
            paths[name] = d
        out[dtype] = paths
    return out


def _check_checkpoint(out, fam, filter_wise):
    got = load_state(out)
    b, *xs = (load_state(fam[n]) for n in ("base", "ft1", "ft2", "ft3"))
    assert set(got) == set(b)
    ts = []
    for name, tensor in got.items():
        assert tensor.dtype == b[name].dtype and tensor.shape == b[name].shape, name
        check(tensor, b[name], [x[name] for x in xs], filter_wise, name)
        ts.append(float(stock64(b[name], [x[name] for x in xs], filter_wise)[1].mean()))
    assert 0.3 < sum(ts) / len(ts) < 0.95  # the inputs exercise t well away from 0 and 1


@pytest.mark.parametrize("filter_wise", [False, True], ids=["whole", "filter-wise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cli_end_to_end(capsys, stock, tmp_path, dtype, filter_wise):
    fam = stock[dtype]
    argv = ["model-stock", "--base", fam["base"], fam["ft1"], fam["ft2"], fam["ft3"], "-o", tmp_path / "out",
            "-q", "--threads", "1", *(["--filter-wise"] if filter_wise else [])]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "model_stock: " in out
    _check_checkpoint(tmp_path / "out", fam, filter_wise)
    recipe = (tmp_path / "out" / "cpift_recipe.yml").read_text()
    assert "merge_method: model_stock" in recipe and f"filter_wise: {str(filter_wise).lower()}" in recipe
    assert "method **model_stock**: c = mean pairwise cosine" in (tmp_path / "out" / "README.md").read_text()
    # the recorded recipe replays to the same bytes
    code, _, err = run_cli(capsys, "config", tmp_path / "out" / "cpift_recipe.yml", "-o", tmp_path / "again",
                           "-q", "--threads", "1")
    assert code == 0, err
    assert ((tmp_path / "out" / "model.safetensors").read_bytes()
            == (tmp_path / "again" / "model.safetensors").read_bytes())


@pytest.mark.parametrize("filter_wise", [False, True], ids=["whole", "filter-wise"])
def test_threads_and_backends_give_the_same_bytes(capsys, stock, tmp_path, filter_wise):
    fam = stock[torch.bfloat16]
    argv = ["model-stock", "--base", fam["base"], fam["ft1"], fam["ft2"], "-q",
            *(["--filter-wise"] if filter_wise else [])]
    runs = [(threads, be) for threads in ("1", "2") for be in BACKENDS]
    for threads, be in runs:
        code, _, err = run_cli(capsys, *argv, "-o", tmp_path / f"{threads}-{be}", "--threads", threads, "--backend", be)
        assert code == 0, err
    for threads, be in runs[1:]:
        got, want = load_state(tmp_path / f"{threads}-{be}"), load_state(tmp_path / f"1-{BACKENDS[0]}")
        # any thread count: bit-identical; the per-row form is torch ops on every backend. Fused CPU
        # against torch: t from float64 sums against float32 partials, within one ulp of the scale.
        if be == BACKENDS[0] or filter_wise:
            assert all(torch.equal(got[k], want[k]) for k in want), (threads, be)
        else:
            assert max(scale_ulps(got[k], want[k]) for k in want) <= 1.0, (threads, be)
            same_backend = load_state(tmp_path / f"1-{be}")
            assert all(torch.equal(got[k], same_backend[k]) for k in want), (threads, be)


def _yaml(fam, filter_wise=None, extra=""):
    params = f"parameters:\n  filter_wise: {str(filter_wise).lower()}\n" if filter_wise is not None else ""
    # mergekit's model_stock examples list the base among the models too
    return (f"merge_method: model_stock\nbase_model: {fam['base']}\nmodels:\n  - model: {fam['base']}\n"
            f"  - model: {fam['ft1']}\n  - model: {fam['ft2']}\n{extra}{params}dtype: bfloat16\n")


@pytest.mark.parametrize("filter_wise", [None, True], ids=["default", "filter-wise"])
def test_mergekit_yaml_runs_unchanged(capsys, stock, tmp_path, filter_wise, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fam = stock[torch.bfloat16]
    cfg = tmp_path / "stock.yml"
    cfg.write_text(_yaml(fam, filter_wise))
    code, out, err = run_cli(capsys, "config", cfg, "-o", tmp_path / "yaml", "-q", "--threads", "1")
    assert code == 0, err
    methods.model_stock(fam["base"], [fam["ft1"], fam["ft2"]], tmp_path / "direct", filter_wise=bool(filter_wise),
                        progress=False)
    got, want = load_state(tmp_path / "yaml"), load_state(tmp_path / "direct")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("text,fragment", [
    ("one", "model_stock needs at least 2 models besides base_model, got 1"),
    ("weight", "models[1].parameters.weight: unknown parameter for model_stock"),
    ("filter", "parameters.filter_wise: expected true or false"),
    ("unknown", "parameters.lambda: unknown parameter for model_stock"),
])
def test_bad_yaml_is_one_line(capsys, stock, tmp_path, text, fragment):
    fam = stock[torch.bfloat16]
    good = _yaml(fam)
    bad = {"one": good.replace(f"  - model: {fam['ft2']}\n", ""),
           "weight": good.replace(f"  - model: {fam['ft1']}\n",
                                  f"  - model: {fam['ft1']}\n    parameters: {{weight: 1}}\n"),
           "filter": _yaml(fam).replace("dtype:", "parameters:\n  filter_wise: maybe\ndtype:"),
           "unknown": _yaml(fam).replace("dtype:", "parameters:\n  lambda: 1.0\ndtype:")}[text]
    cfg = tmp_path / "bad.yml"
    cfg.write_text(bad)
    assert_user_error(capsys, ["config", cfg, "-o", tmp_path / "out"], "bad.yml", fragment, inputs=list(fam.values()))
    no_output(tmp_path)


def test_one_model_is_a_one_line_error(capsys, stock, tmp_path):
    fam = stock[torch.bfloat16]
    assert_user_error(capsys, ["model-stock", "--base", fam["base"], fam["ft1"], "-o", tmp_path / "out"],
                      "models: model_stock needs at least 2 models besides the base, got 1",
                      inputs=list(fam.values()))
    no_output(tmp_path)
    r = subprocess.run([sys.executable, "-m", "cpift.cli.merge_cli", "model-stock", "--base", str(fam["base"]),
                        str(fam["ft1"]), "-o",
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def test_bench_refuses_model_stock_with_one_task_model(capsys, stock, tmp_path):
    fam = stock[torch.float32]
    assert_user_error(capsys, ["bench", fam["base"], fam["ft1"], "--methods", "model-stock", "--workdir",
                               tmp_path / "w"],
                      "--methods: model-stock needs at least 2 task models besides the base, got 1",
                      inputs=list(fam.values()))


def test_dry_run_and_the_facade(stock, tmp_path):
    import cpift
    from cpift.merge.io.dryrun import MergePlan

    fam = stock[torch.float32]
    plan = cpift.model_stock(fam["base"], [fam["ft1"], fam["ft2"]], tmp_path / "out", dry_run=True, progress=False)
    assert isinstance(plan, MergePlan) and not (tmp_path / "out").exists()


def test_bench_config_for_mergekit_is_accepted(tmp_path):
    from cpift.merge.mergekit.config import load_config
    from cpift.merge.tools.bench_cases import cpift_args, mergekit_config

    base, tasks = tmp_path / "base", [tmp_path / "t1", tmp_path / "t2"]
    args, read = cpift_args("model-stock", base, tasks, tasks)
    assert args == ["--base", str(base), *map(str, tasks)] and read == [base, *tasks]
    cfg = tmp_path / "mk.yml"
    cfg.write_text(mergekit_config("model-stock", base, tasks, tasks, "bfloat16"))
    loaded = load_config(cfg)
    assert loaded.method == "model_stock" and [m.model for m in loaded.models] == [str(t) for t in tasks]


# --------------------------------------------------------------------------------------------------
# Parity with mergekit itself


def scale_ulps(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x − y| in units in the last place of the tensor's scale (its largest magnitude), as the
    SLERP parity test measures: entries that cancel to near 0 carry the rounding of the inputs'
    magnitude, so a per-entry ulp count would measure that cancellation, not a disagreement."""
    scale = float(x.double().abs().max())
    ulp = 2.0 ** math.floor(math.log2(scale)) * torch.finfo(x.dtype).eps if scale > 0 else torch.finfo(x.dtype).tiny
    return float((x.double() - y.double()).abs().max()) / ulp


# Measured with mergekit 0.1.5 (2026-12-02): float32 math on both sides, max 2.00 ulp of the tensor's
# scale, ~46% of entries bit-identical; bf16 models with `dtype: float32, out_dtype: bfloat16`: 99.99%
# bit-identical, max 0.5; `dtype: bfloat16` (mergekit's math in bf16): max 2.00, ~50% identical.
F32_MATH_ULPS, BF16_MATH_ULPS = 3, 4

# (models' dtype, config dtype, out_dtype): cpift always computes in float32; mergekit in `dtype`.
PARITY = [(torch.float32, "float32", None), (torch.bfloat16, "float32", "bfloat16"),
          (torch.bfloat16, "bfloat16", None)]


@pytest.mark.skipif(not MERGEKIT, reason="CPIFT_MERGEKIT_YAML is not set to a mergekit-yaml")
@pytest.mark.parametrize("filter_wise", [False, True], ids=["whole", "filter-wise"])
@pytest.mark.parametrize("models,dtype,out_dtype", PARITY, ids=["fp32", "bf16-math-fp32", "bf16-math-bf16"])
def test_agrees_with_mergekit(stock, tmp_path, models, dtype, out_dtype, filter_wise, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fam = stock[models]
    text = (f"merge_method: model_stock\nbase_model: {fam['base']}\nmodels:\n  - model: {fam['base']}\n"
            + "".join(f"  - model: {fam[n]}\n" for n in ("ft1", "ft2", "ft3"))
            + f"parameters:\n  filter_wise: {str(filter_wise).lower()}\ndtype: {dtype}\n"
            + (f"out_dtype: {out_dtype}\n" if out_dtype else ""))
    (tmp_path / "stock.yml").write_text(text)
    subprocess.run([MERGEKIT, "stock.yml", str(tmp_path / "mk"), "--no-copy-tokenizer", "--quiet",
                    "--no-write-model-card"], check=True, capture_output=True)
    from cpift.merge.mergekit.run import run_config

    run_config(tmp_path / "stock.yml", tmp_path / "cpift", progress=False)
    ours, theirs = load_state(tmp_path / "cpift"), load_state(tmp_path / "mk")
    assert set(ours) == set(theirs)
    worst = {name: scale_ulps(x, theirs[name]) for name, x in ours.items()}
    same = sum(int((x == theirs[name]).sum()) for name, x in ours.items()) / sum(x.numel() for x in ours.values())
    top = max(worst, key=worst.get)
    print(f"parity {models} dtype={dtype} filter_wise={filter_wise}: {100 * same:.2f}% of entries bit-identical, "
          f"max {worst[top]:.2f} ulp of the tensor's scale ({top})")
    # float32 math on both sides (mergekit: t·mean x + (1−t)·b; cpift: b + t·mean δ): rounding only.
    # mergekit's bf16 math (dtype: bfloat16) rounds the deltas' products, the mean and the blend to bf16.
    assert worst[top] <= (F32_MATH_ULPS if dtype == "float32" else BF16_MATH_ULPS), worst


@pytest.mark.skipif(not MERGEKIT, reason="CPIFT_MERGEKIT_YAML is not set to a mergekit-yaml")
def test_bench_mergekit_config_runs_in_mergekit(stock, tmp_path, capsys):
    """The config `cpift-merge bench` gives mergekit for model-stock runs there and merges the same."""
    from cpift.merge.tools.bench_cases import cpift_args, mergekit_config

    fam = stock[torch.bfloat16]
    tasks = [fam["ft1"], fam["ft2"], fam["ft3"]]
    (tmp_path / "mk.yml").write_text(mergekit_config("model-stock", fam["base"], tasks, tasks, "bfloat16"))
    subprocess.run([MERGEKIT, str(tmp_path / "mk.yml"), str(tmp_path / "mk"), "--no-copy-tokenizer", "--quiet",
                    "--no-write-model-card"], check=True, capture_output=True)
    args, _ = cpift_args("model-stock", fam["base"], tasks, tasks)
    code, _, err = run_cli(capsys, "model-stock", *args, "-o", tmp_path / "cpift", "-q", "--threads", "1")
    assert code == 0, err
    ours, theirs = load_state(tmp_path / "cpift"), load_state(tmp_path / "mk")
    assert set(ours) == set(theirs)
    assert max(scale_ulps(x, theirs[n]) for n, x in ours.items()) <= BF16_MATH_ULPS
