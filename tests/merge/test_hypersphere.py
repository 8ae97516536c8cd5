"""nuslerp, multislerp, karcher (merge/methods/nuslerp.py, multislerp.py, karcher.py) on checkpoints: the
subcommands against the float64 oracles (mergekit 0.1.5's formulas, tests/oracles.py), mergekit YAML configs
giving the subcommand's bytes, recipes that replay, bad input, and parity with mergekit itself where
CPIFT_MERGEKIT_YAML names a mergekit-yaml."""

from __future__ import annotations

import math
import os
import subprocess

import pytest
import torch
from oracles import karcher64, multislerp64, nuslerp64
from references import load_state
from safetensors.torch import save_file
from test_bad_input import assert_user_error, no_output, run_cli

MERGEKIT = os.environ.get("CPIFT_MERGEKIT_YAML")


@pytest.fixture(scope="module")
def fam(families, tmp_path_factory):
    """The tiny Llama families (base + task1..3, fp32 and bf16), plus 'neg' = −task1 (fp32) for the
    zero-mean refusal."""
    out = {dt: dict(families[("llama", dt)]) for dt in (torch.float32, torch.bfloat16)}
    f32 = out[torch.float32]
    neg = tmp_path_factory.mktemp("sphere") / "neg"
    neg.mkdir()
    (neg / "config.json").write_text((f32["task1"] / "config.json").read_text())
    save_file({k: (-v).contiguous() for k, v in load_state(f32["task1"]).items()}, str(neg / "model.safetensors"),
              metadata={"format": "pt"})
    f32["neg"] = neg
    return out


def _check(got, want, inputs, base, name):
    """Float32 blend of float64 coefficients: twice the rounding to the stored dtype, plus 4 float32 eps and
    the fused reduction's 1e-6 coefficient error, times the blend's scale (|c| ≤ 2 here: angles < 2π/3)."""
    want = want.reshape(-1)
    scale = (0.0 if base is None else base.double().abs().reshape(-1)) + 2 * sum(
        (x.double() - (0.0 if base is None else base.double())).abs().reshape(-1) for x in inputs)
    rounding = (want.to(got.dtype).double() - want).abs()
    tol = 2 * rounding + (4 * torch.finfo(torch.float32).eps + 1e-6) * scale + 1e-12
    err = (got.double().reshape(-1) - want).abs()
    assert bool((err <= tol).all()), (name, float(err.max()))


CLI_CASES = [
    ("nuslerp", ["task1", "task2"], [], ["--weights", "1,3"]),
    ("nuslerp", ["task1", "task2"], ["--base"], ["--weights", "1,3"]),
    ("nuslerp", ["task1", "task2"], ["--base"], ["--weights", "2,1", "--no-flatten"]),
    ("nuslerp", ["task1", "task2"], [], ["--weights", "2,1", "--no-flatten", "--row-wise"]),
    ("multislerp", ["task1", "task2", "task3"], [], ["--weights", "1,0.5,2"]),
    ("multislerp", ["task1", "task2", "task3"], ["--base"], ["--weights", "1,0.5,2"]),
    ("multislerp", ["task1", "task2"], ["--base"], ["--no-normalize-weights", "--weights", "0.3,0.5"]),
    ("karcher", ["task1", "task2", "task3"], [], []),
    ("karcher", ["base", "task1", "task2"], [], ["--max-iter", "2", "--tol", "1e-6"]),
]
CLI_IDS = ["nuslerp", "nuslerp-base", "nuslerp-rows-base", "nuslerp-row-wise", "multislerp", "multislerp-base",
           "multislerp-2-unnormalised", "karcher", "karcher-iter2"]


def _oracle(method, models, base, opts, name):
    w = [float(v) for v in opts[opts.index("--weights") + 1].split(",")] if "--weights" in opts else None
    if method == "nuslerp":
        t = w[1] / (w[0] + w[1])
        return nuslerp64(t, models[0], models[1], base=base, flatten="--no-flatten" not in opts,
                         row_wise="--row-wise" in opts)
    if method == "multislerp":
        return multislerp64(models, w, base=base, normalize="--no-normalize-weights" not in opts)
    it = int(opts[opts.index("--max-iter") + 1]) if "--max-iter" in opts else 10
    tol = float(opts[opts.index("--tol") + 1]) if "--tol" in opts else 1e-5
    return karcher64(models, max_iter=it, tol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method,models,base,opts", CLI_CASES, ids=CLI_IDS)
def test_cli_matches_float64_oracle(capsys, fam, tmp_path, method, models, base, opts, dtype):
    f = fam[dtype]
    argv = [method, *[f[m] for m in models], *([base[0], f["base"]] if base else []), *opts, "-o", tmp_path / "out",
            "-q", "--threads", "1"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    got = load_state(tmp_path / "out")
    states = [load_state(f[m]) for m in models]
    b = load_state(f["base"]) if base else None
    assert set(got) == set(states[0])
    for name, tensor in got.items():
        xs = [s[name] for s in states]
        bt = b[name] if b else None
        assert tensor.dtype == dtype and tensor.shape == xs[0].shape
        _check(tensor, _oracle(method, xs, bt, opts, name), xs, bt, name)
    readme = (tmp_path / "out" / "README.md").read_text()
    assert f"method **{method}**" in readme and ("| base |" in readme) == bool(base)
    # the recorded recipe replays to the same bytes
    code, _, err = run_cli(capsys, "config", tmp_path / "out" / "cpift_recipe.yml", "-o", tmp_path / "again", "-q",
                           "--threads", "1")
    assert code == 0, err
    again = load_state(tmp_path / "again")
    assert all(torch.equal(got[k], again[k]) for k in got)


def _yaml(method, models, *, base=None, params="", per_model=None, dtype="float32", extra=""):
    lines = [f"merge_method: {method}"] + ([f"base_model: {base}"] if base else []) + ["models:"]
    for i, m in enumerate(models):
        lines.append(f"  - model: {m}")
        if per_model is not None and per_model[i] is not None:
            lines.append(f"    parameters: {{weight: {per_model[i]}}}")
    if params:
        lines.append("parameters:\n" + "".join(f"  {kv}\n" for kv in params.split(";")).rstrip("\n"))
    return "\n".join(lines + [f"dtype: {dtype}", extra]) + "\n"


YAML_CASES = [  # (method, yaml models (names), base, per-model weights, params, equivalent subcommand)
    ("nuslerp", ["task1", "task2"], None, [1, 3], "", ["nuslerp", "task1", "task2", "--weights", "1,3"]),
    ("nuslerp", ["base", "task1", "task2"], "base", [None, 1, 3], "nuslerp_flatten: false",
     ["nuslerp", "task1", "task2", "--base", "base", "--weights", "1,3", "--no-flatten"]),
    ("nuslerp", ["task1", "task2"], "base", [2, 1], "nuslerp_flatten: false;nuslerp_row_wise: true",
     ["nuslerp", "task1", "task2", "--base", "base", "--weights", "2,1", "--no-flatten", "--row-wise"]),
    ("multislerp", ["task1", "task2", "task3"], "base", [1, 0.5, 2], "eps: 1e-6",
     ["multislerp", "task1", "task2", "task3", "--base", "base", "--weights", "1,0.5,2", "--eps", "1e-6"]),
    ("multislerp", ["task1", "task2"], None, [1, 2], "normalize_weights: false",
     ["multislerp", "task1", "task2", "--weights", "1,2", "--no-normalize-weights"]),
    # karcher: an unlisted base_model is one more input, the last (mergekit adds it)
    ("karcher", ["task1", "task2"], "base", None, "max_iter: 5;tol: 1e-6",
     ["karcher", "task1", "task2", "base", "--max-iter", "5", "--tol", "1e-6"]),
    ("karcher", ["task1", "task2", "task3"], None, None, "", ["karcher", "task1", "task2", "task3"]),
]


@pytest.mark.parametrize("case", YAML_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(YAML_CASES)])
def test_mergekit_yaml_gives_the_subcommands_bytes(capsys, fam, tmp_path, case):
    method, models, base, weights, params, sub = case
    f = fam[torch.float32]
    cfg = tmp_path / "c.yml"
    cfg.write_text(_yaml(method, [f[m] for m in models], base=base and f[base], params=params, per_model=weights))
    code, out, err = run_cli(capsys, "config", cfg, "-o", tmp_path / "yaml", "-q", "--threads", "1")
    assert code == 0, err
    argv = [f[a] if a in f else a for a in sub]
    code, _, err = run_cli(capsys, *argv, "-o", tmp_path / "sub", "-q", "--threads", "1")
    assert code == 0, err
    got, want = load_state(tmp_path / "yaml"), load_state(tmp_path / "sub")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_threads_give_the_same_bytes(capsys, fam, tmp_path):
    f = fam[torch.bfloat16]
    for method, extra in (("karcher", []), ("multislerp", ["--base", f["base"]]), ("nuslerp", ["--no-flatten"])):
        models = [f["task1"], f["task2"]] + ([f["task3"]] if method != "nuslerp" else [])
        for threads in ("1", "2"):
            code, _, err = run_cli(capsys, method, *models, *extra, "-o", tmp_path / f"{method}{threads}", "-q",
                                   "--threads", threads)
            assert code == 0, err
        a, b = load_state(tmp_path / f"{method}1"), load_state(tmp_path / f"{method}2")
        assert all(torch.equal(a[k], b[k]) for k in a), method


def test_a_per_tensor_weight_runs_and_its_recipe_replays(capsys, fam, tmp_path):
    """A gradient weight (a per-tensor value): the recipe is the config itself, and it replays to the same
    bytes; the layers really get different t."""
    f = fam[torch.float32]
    cfg = tmp_path / "g.yml"
    cfg.write_text(_yaml("nuslerp", [f["task1"], f["task2"]], per_model=["[0.0, 1.0]", 1]))
    code, _, err = run_cli(capsys, "config", cfg, "-o", tmp_path / "a", "-q")
    assert code == 0, err
    import yaml

    recipe = yaml.safe_load((tmp_path / "a" / "cpift_recipe.yml").read_text())
    assert recipe["models"][0]["parameters"]["weight"] == [0.0, 1.0]
    code, _, err = run_cli(capsys, "config", tmp_path / "a" / "cpift_recipe.yml", "-o", tmp_path / "b", "-q")
    assert code == 0, err
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    x0, x1 = load_state(f["task1"]), load_state(f["task2"])
    first = "model.layers.0.mlp.up_proj.weight"  # at the first layer the weights are 0 and 1: t = 1, task2
    assert torch.allclose(a[first], x1[first], rtol=1e-6, atol=1e-7) and not torch.equal(a[first], x0[first])


def test_row_wise_without_no_flatten_is_noted_and_changes_nothing(fam, tmp_path):
    from cpift.merge import methods

    f = fam[torch.float32]
    noted = methods.nuslerp([f["task1"], f["task2"]], tmp_path / "a", row_wise=True, progress=False)
    assert any("row_wise has no effect while flatten is on" in n for n in noted.notes)
    methods.nuslerp([f["task1"], f["task2"]], tmp_path / "b", progress=False)
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_model_is_copied(capsys, fam, tmp_path):
    f = fam[torch.bfloat16]
    for method in ("multislerp", "karcher"):
        code, _, err = run_cli(capsys, method, f["task1"], "-o", tmp_path / method, "-q")
        assert code == 0, err
        got, want = load_state(tmp_path / method), load_state(f["task1"])
        assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("argv,fragment", [
    (["nuslerp", "task1", "task2", "task3"], "models: nuslerp merges exactly 2 models, got 3"),
    (["nuslerp", "task1", "--base", "base"], "models: nuslerp merges exactly 2 models besides the base, got 1"),
    (["nuslerp", "task1", "task2", "--weights", "1"], "weights: got 1 values for 2 models"),
    (["multislerp", "task1", "task2", "--weights", "1,-1"], "weights: they sum to 0"),
    (["multislerp", "task1", "neg", "task2", "--weights", "1,1,0"],
     "multislerp: the weighted mean of the unit vectors is zero"),
    (["multislerp", "task1", "task2", "--eps", "-1"], "eps: -1.0 is outside [0.0, inf]"),
    (["karcher", "task1", "task2", "--max-iter", "2.5"], "max_iter: expected a whole number of iterations, got 2.5"),
    (["karcher", "task1", "task2", "--tol", "-1"], "tol: -1.0 is outside [0.0, inf]"),
], ids=["nuslerp-3", "nuslerp-1", "weights-count", "weights-sum-0", "zero-mean", "eps", "max-iter", "tol"])
def test_bad_input_is_one_line(capsys, fam, tmp_path, argv, fragment):
    f = fam[torch.float32]
    argv = [f[a] if a in f else a for a in argv]
    assert_user_error(capsys, [*argv, "-o", tmp_path / "out"], fragment, inputs=[f["task1"], f["neg"]])
    no_output(tmp_path)


@pytest.mark.parametrize("text,fragment", [
    (("nuslerp", ["task1"], None, [1], ""), "models: nuslerp merges exactly 2 models, got 1"),
    (("nuslerp", ["task1", "task2", "task3"], "base", [1, 1, 1], ""),
     "models: nuslerp merges exactly 2 models besides base_model, got 3"),
    (("nuslerp", ["task1", "task2"], None, [1, None], ""),
     "models[1].parameters.weight: missing; nuslerp needs a weight"),
    (("nuslerp", ["task1", "task2"], None, [1, 1], "t: 0.5"), "parameters.t: unknown parameter for nuslerp"),
    (("nuslerp", ["task1", "task2"], None, [1, 1], "nuslerp_flatten: maybe"),
     "parameters.nuslerp_flatten: expected true or false"),
    (("multislerp", ["task1", "task2"], None, [1, 1], "max_iter: 3"), "parameters.max_iter: unknown parameter"),
    (("karcher", ["task1", "task2"], None, [1, 1], ""), "models[0].parameters.weight: unknown parameter for karcher"),
    (("karcher", ["task1", "task2"], None, None, "max_iter: 2.5"), "max_iter: expected a whole number"),
    (("multislerp", ["task1", "neg", "task2"], None, [1, 1, 0], ""), "multislerp: the weighted mean of the unit"),
], ids=["nuslerp-1", "nuslerp-3", "no-weight", "unknown", "flag", "multislerp-key", "karcher-weight", "max-iter",
        "zero-mean"])
def test_bad_yaml_is_one_line(capsys, fam, tmp_path, text, fragment):
    f = fam[torch.float32]
    method, models, base, weights, params = text
    cfg = tmp_path / "bad.yml"
    cfg.write_text(_yaml(method, [f[m] for m in models], base=base and f[base], params=params, per_model=weights))
    assert_user_error(capsys, ["config", cfg, "-o", tmp_path / "out"], fragment, inputs=[f["task1"]])
    no_output(tmp_path)


def test_facade_dry_run_and_bench_configs(fam, tmp_path):
    import cpift
    from cpift.merge.io.dryrun import MergePlan
    from cpift.merge.mergekit.config import load_config
    from cpift.merge.tools.bench_cases import cpift_args, mergekit_config

    f = fam[torch.float32]
    plan = cpift.karcher([f["task1"], f["task2"]], tmp_path / "out", dry_run=True, progress=False)
    assert isinstance(plan, MergePlan) and not (tmp_path / "out").exists()
    tasks = [f["task1"], f["task2"], f["task3"]]
    for method in ("nuslerp", "multislerp", "karcher"):
        args, read = cpift_args(method, f["base"], tasks, tasks[:2])
        want = tasks[:2] if method == "nuslerp" else tasks
        assert read == want and args[:len(want)] == [str(t) for t in want]
        cfg = tmp_path / f"{method}.yml"
        cfg.write_text(mergekit_config(method, f["base"], tasks, tasks[:2], "float32"))
        loaded = load_config(cfg)
        assert loaded.method == method and [m.model for m in loaded.models] == [str(t) for t in want]


# --------------------------------------------------------------------------------------------------
# Parity with mergekit itself (float32 math on both sides)

PARITY = [  # (id, yaml method, models, base, per-model weights, params)
    ("nuslerp", "nuslerp", ["task1", "task2"], None, [1, 3], ""),
    ("nuslerp-base", "nuslerp", ["base", "task1", "task2"], "base", [None, 1, 3], ""),
    ("nuslerp-rows-base", "nuslerp", ["task1", "task2"], "base", [2, 1], "nuslerp_flatten: false"),
    ("nuslerp-row-wise", "nuslerp", ["task1", "task2"], None, [2, 1], "nuslerp_flatten: false;nuslerp_row_wise: true"),
    ("multislerp", "multislerp", ["task1", "task2", "task3"], None, [1, 0.5, 2], ""),
    ("multislerp-base", "multislerp", ["task1", "task2", "task3"], "base", [1, 0.5, 2], ""),
    ("karcher", "karcher", ["task1", "task2", "task3"], None, None, ""),
    ("karcher-base-added", "karcher", ["task1", "task2"], "base", None, "max_iter: 20;tol: 1e-7"),
    ("nuslerp-gradient", "nuslerp", ["task1", "task2"], None, ["[0.2, 1.0]", 1], ""),
    ("multislerp-gradient-eps", "multislerp", ["task1", "task2", "task3"], "base", [1, "[2.0, 0.5]", 1],
     "eps: 1e-6;normalize_weights: false"),
]


def scale_ulps(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x − y| in float32 ulps of the tensor's scale (its largest magnitude)."""
    scale = float(y.double().abs().max())
    ulp = 2.0 ** math.floor(math.log2(scale)) * torch.finfo(torch.float32).eps if scale > 0 else 1e-45
    return float((x.double() - y.double()).abs().max()) / ulp


@pytest.mark.skipif(not MERGEKIT, reason="CPIFT_MERGEKIT_YAML is not set to a mergekit-yaml")
@pytest.mark.parametrize("case", PARITY, ids=[c[0] for c in PARITY])
def test_agrees_with_mergekit(fam, tmp_path, case, monkeypatch):
    cid, method, models, base, weights, params = case
    f = fam[torch.float32]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yml").write_text(_yaml(method, [f[m] for m in models], base=base and f[base], params=params,
                                          per_model=weights))
    subprocess.run([MERGEKIT, "c.yml", str(tmp_path / "mk"), "--no-copy-tokenizer", "--quiet",
                    "--no-write-model-card"], check=True, capture_output=True)
    from cpift.merge.mergekit.run import run_config

    run_config(tmp_path / "c.yml", tmp_path / "cpift", progress=False)
    ours, theirs = load_state(tmp_path / "cpift"), load_state(tmp_path / "mk")
    assert set(ours) == set(theirs)
    absd = max(float((x.double() - theirs[k].double()).abs().max()) for k, x in ours.items())
    reld = max(float(((x.double() - theirs[k].double()).abs() / theirs[k].double().abs().clamp(min=1e-30)).max())
               for k, x in ours.items())
    ulps = {k: scale_ulps(x, theirs[k]) for k, x in ours.items()}
    top = max(ulps, key=ulps.get)
    same = sum(int((x == theirs[k]).sum()) for k, x in ours.items()) / sum(x.numel() for x in ours.values())
    print(f"parity {cid}: max abs {absd:.3g}, max rel {reld:.3g}, max {ulps[top]:.2f} float32 ulps of the tensor's "
          f"scale ({top}), {100 * same:.1f}% bit-identical")
    for k, x in ours.items():
        assert torch.allclose(x, theirs[k], rtol=1e-6, atol=1e-6), k
    assert ulps[top] <= 8, ulps[top]


def bf16_ulps(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x − y| in bf16 ulps of the tensor's scale."""
    scale = float(y.double().abs().max())
    ulp = 2.0 ** math.floor(math.log2(scale)) * torch.finfo(torch.bfloat16).eps if scale > 0 else 1e-45
    return float((x.double() - y.double()).abs().max()) / ulp


@pytest.mark.skipif(not MERGEKIT, reason="CPIFT_MERGEKIT_YAML is not set to a mergekit-yaml")
@pytest.mark.parametrize("case", [c for c in PARITY if c[0] in ("nuslerp-base", "multislerp", "karcher")],
                         ids=["nuslerp-base", "multislerp", "karcher"])
def test_bf16_models_agree_with_mergekit(fam, tmp_path, case, monkeypatch):
    """bf16 models, float32 math on both sides (dtype: float32, out_dtype: bfloat16): one rounding each."""
    cid, method, models, base, weights, params = case
    f = fam[torch.bfloat16]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yml").write_text(_yaml(method, [f[m] for m in models], base=base and f[base], params=params,
                                          per_model=weights, extra="out_dtype: bfloat16"))
    subprocess.run([MERGEKIT, "c.yml", str(tmp_path / "mk"), "--no-copy-tokenizer", "--quiet",
                    "--no-write-model-card"], check=True, capture_output=True)
    from cpift.merge.mergekit.run import run_config

    run_config(tmp_path / "c.yml", tmp_path / "cpift", progress=False)
    ours, theirs = load_state(tmp_path / "cpift"), load_state(tmp_path / "mk")
    assert set(ours) == set(theirs) and all(x.dtype == torch.bfloat16 for x in ours.values())
    worst = max(bf16_ulps(x, theirs[k]) for k, x in ours.items())
    same = sum(int((x == theirs[k]).sum()) for k, x in ours.items()) / sum(x.numel() for x in ours.values())
    print(f"parity bf16 {cid}: max {worst:.2f} bf16 ulps of the tensor's scale, {100 * same:.2f}% bit-identical")
    assert worst <= 1.0, worst


@pytest.mark.parametrize("argv,fragment", [
    (["karcher", "task1", "task2", "--max-iter", "1000001"], "max_iter: 1000001.0 is outside [0.0, 1000000.0]"),
    (["karcher", "task1", "task2", "--max-iter", "-1"], "max_iter: -1.0 is outside [0.0, 1000000.0]"),
    (["multislerp", "task1", "neg", "task2", "--weights", "1,1,0"],
     "tensor 'model.embed_tokens.weight': multislerp: the weighted mean of the unit vectors is zero"),
], ids=["max-iter-above", "max-iter-below", "zero-mean-names-the-tensor"])
def test_declared_range_is_the_one_enforced(capsys, fam, tmp_path, argv, fragment):
    """karcher's max_iter is declared as the merge enforces it (an integer in [0, 1e6]); a refusal that
    depends on a tensor's values names the tensor."""
    from cpift.merge.methods.registry import METHODS

    p = METHODS["karcher"].param("max_iter")
    assert (p.kind, p.lo, p.hi) == ("integer", 0.0, 1e6)
    f = fam[torch.float32]
    argv = [f[a] if a in f else a for a in argv]
    assert_user_error(capsys, [*argv, "-o", tmp_path / "out"], fragment, inputs=[f["task1"], f["neg"]])
    no_output(tmp_path)
