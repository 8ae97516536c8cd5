"""sce (merge/methods/consensus.py) and nearswap (merge/methods/swap.py), plus the ties /
task_arithmetic options of mergekit (ties rescale and normalize, task_arithmetic normalize): on
checkpoints against float64 oracles written here from mergekit 0.1.5's definitions, the CLI and a
mergekit YAML giving the same bytes, bad input as one-line errors, and mergekit parity where
CPIFT_MERGEKIT_YAML names a mergekit-yaml."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from oracles import nearswap64, sce64, ties64
from references import load_state
from safetensors.torch import save_file
from test_bad_input import assert_user_error, run_cli
from test_della_breadcrumbs import llama_fam as llama_fam  # noqa: F401  (the real tiny Llama family mergekit accepts)

MERGEKIT = os.environ.get("CPIFT_MERGEKIT_YAML")


def assert_close(got: dict, want: dict, rtol=1e-6, atol=1e-6) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k].double(), want[k].double(), rtol=rtol, atol=atol), (
            k, float((got[k].double() - want[k].double()).abs().max()))


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("sce")
    g = torch.Generator().manual_seed(21)
    shapes = {"a.weight": (33, 97), "b.bias": (31,), "c.one": (1,), "d.weight": (7, 1)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    paths = {}
    for i, name in enumerate(("base", "ft1", "ft2", "ft3")):
        d = root / name
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 1}')
        t = base if name == "base" else {k: v + 0.02 * i * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file({k: v.contiguous() for k, v in t.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
        paths[name] = d
    return paths


def states(fam, *names):
    return [load_state(fam[n]) for n in names]


def yaml_out(capsys, tmp_path, text, name="y"):
    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(text)
    code, _, err = run_cli(capsys, "config", cfg, "-o", tmp_path / name, "-q")
    assert code == 0, err
    return tmp_path / name


# ---------------------------------------------------------------------------------------------------
# sce


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1])
def test_sce_cli_matches_the_oracle_and_the_yaml_bytes(capsys, fam, tmp_path, topk, backend):
    code, _, err = run_cli(capsys, "sce", "--base", fam["base"], fam["ft1"], fam["ft2"], fam["ft3"],
                           "--select-topk", str(topk), "--backend", backend, "-o", tmp_path / "cli", "-q")
    assert code == 0, err
    b, *xs = states(fam, "base", "ft1", "ft2", "ft3")
    assert_close(load_state(tmp_path / "cli"), {k: sce64(b[k], [x[k] for x in xs], topk) for k in b})
    out = yaml_out(capsys, tmp_path, f"merge_method: sce\nbase_model: {fam['base']}\nmodels:\n"
                   f"  - model: {fam['base']}\n" + "".join(f"  - model: {fam[n]}\n" for n in ("ft1", "ft2", "ft3"))
                   + f"parameters:\n  select_topk: {topk}\n  int8_mask: true\ndtype: float32\n")
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "cli" / "model.safetensors").read_bytes()


def test_sce_select_topk_gradient_from_yaml(capsys, fam, tmp_path):
    out = yaml_out(capsys, tmp_path, f"merge_method: sce\nbase_model: {fam['base']}\nmodels:\n"
                   f"  - model: {fam['ft1']}\n  - model: {fam['ft2']}\n"
                   f"parameters:\n  select_topk:\n    - filter: bias\n      value: 0.3\n    - value: 1.0\n")
    b, *xs = states(fam, "base", "ft1", "ft2")
    want = {k: sce64(b[k], [x[k] for x in xs], 0.3 if "bias" in k else 1.0) for k in b}
    assert_close(load_state(out), want)


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_sce_select_topk_outside_0_1_is_one_line(capsys, fam, tmp_path, value):
    assert_user_error(capsys, ["sce", "--base", fam["base"], fam["ft1"], "--select-topk", value, "-o", tmp_path / "o"],
                      "select_topk: ", "is outside [0.0, 1.0]", inputs=list(fam.values()))
    cfg = tmp_path / "bad.yml"
    cfg.write_text(f"merge_method: sce\nbase_model: {fam['base']}\nmodels:\n  - model: {fam['ft1']}\n"
                   f"parameters:\n  select_topk: {value}\n")
    assert_user_error(capsys, ["config", cfg, "-o", tmp_path / "o"], "select_topk", inputs=list(fam.values()))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text,fragment", [
    ("weight", "models[0].parameters.weight: unknown parameter for sce"),
    ("nobase", "base_model: missing; sce merges deltas from it"),
    ("lambda", "parameters.lambda: unknown parameter for sce"),
])
def test_sce_bad_yaml_is_one_line(capsys, fam, tmp_path, text, fragment):
    good = f"merge_method: sce\nbase_model: {fam['base']}\nmodels:\n  - model: {fam['ft1']}\n  - model: {fam['ft2']}\n"
    bad = {"weight": good.replace(f"  - model: {fam['ft1']}\n",
                                  f"  - model: {fam['ft1']}\n    parameters: {{weight: 1}}\n"),
           "nobase": good.replace(f"base_model: {fam['base']}\n", ""),
           "lambda": good + "parameters:\n  lambda: 0.5\n"}[text]
    cfg = tmp_path / "bad.yml"
    cfg.write_text(bad)
    assert_user_error(capsys, ["config", cfg, "-o", tmp_path / "o"], "bad.yml", fragment, inputs=list(fam.values()))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------
# nearswap


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_nearswap_cli_matches_the_oracle_and_the_yaml_bytes(capsys, fam, tmp_path, backend):
    t = 0.02
    code, _, err = run_cli(capsys, "nearswap", fam["base"], fam["ft2"], "--t", str(t), "--backend", backend,
                           "-o", tmp_path / "cli", "-q")
    assert code == 0, err
    a, b = states(fam, "base", "ft2")
    want = {k: nearswap64(a[k], b[k], t) for k in a}
    assert_close(load_state(tmp_path / "cli"), want)
    d = torch.cat([(a[k] - b[k]).abs().reshape(-1) for k in a])
    assert bool((d < t).any()) and bool((d > t).any())  # both regimes
    out = yaml_out(capsys, tmp_path, f"merge_method: nearswap\nbase_model: {fam['base']}\nmodels:\n"
                   f"  - model: {fam['base']}\n  - model: {fam['ft2']}\nparameters:\n  t: {t}\ndtype: float32\n")
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "cli" / "model.safetensors").read_bytes()


def test_nearswap_t_above_1_and_zero(capsys, fam, tmp_path):
    """t is a distance, not slerp's factor: t > 1 is accepted (every entry here is then swapped)."""
    out = yaml_out(capsys, tmp_path, f"merge_method: nearswap\nbase_model: {fam['base']}\nmodels:\n"
                   f"  - model: {fam['ft1']}\nparameters:\n  t: 2.5\n")
    assert_close(load_state(out), load_state(fam["ft1"]), rtol=0, atol=0)
    out = yaml_out(capsys, tmp_path, f"merge_method: nearswap\nbase_model: {fam['base']}\nmodels:\n"
                   f"  - model: {fam['ft1']}\nparameters:\n  t: 0\n", name="z")
    assert_close(load_state(out), load_state(fam["base"]), rtol=0, atol=0)


@pytest.mark.parametrize("text,fragment", [
    ("three", "nearswap merges exactly two models, base_model and one other; got 3"),
    ("no_t", "parameters.t: missing; nearswap needs a distance t ≥ 0"),
    ("negative", "parameters.t: -0.1 is negative (nearswap's t is a distance ≥ 0)"),
    ("nobase", "base_model: missing; nearswap needs it"),
])
def test_nearswap_bad_yaml_is_one_line(capsys, fam, tmp_path, text, fragment):
    good = (f"merge_method: nearswap\nbase_model: {fam['base']}\nmodels:\n  - model: {fam['ft1']}\n"
            f"parameters:\n  t: 0.01\n")
    bad = {"three": good.replace(f"  - model: {fam['ft1']}\n", f"  - model: {fam['ft1']}\n  - model: {fam['ft2']}\n"),
           "no_t": good.replace("parameters:\n  t: 0.01\n", ""),
           "negative": good.replace("t: 0.01", "t: -0.1"),
           "nobase": good.replace(f"base_model: {fam['base']}\n", "").replace(
               f"  - model: {fam['ft1']}\n", f"  - model: {fam['ft1']}\n  - model: {fam['ft2']}\n")}[text]
    cfg = tmp_path / "bad.yml"
    cfg.write_text(bad)
    assert_user_error(capsys, ["config", cfg, "-o", tmp_path / "o"], "bad.yml", fragment, inputs=list(fam.values()))
    assert not (tmp_path / "o").exists()


def test_nearswap_bad_cli_is_one_line(capsys, fam, tmp_path):
    assert_user_error(capsys, ["nearswap", fam["base"], fam["ft1"], "-o", tmp_path / "o"],
                      "t: missing; nearswap needs a distance t ≥ 0", inputs=list(fam.values()))
    assert_user_error(capsys, ["nearswap", fam["base"], fam["ft1"], "--t", "-1", "-o", tmp_path / "o"],
                      "t: -1.0 is outside [0.0, inf]", inputs=list(fam.values()))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------
# ties rescale / normalize, task_arithmetic normalize (mergekit's options)


def _delta_yaml(fam, method, params, density=0.4):
    return (f"merge_method: {method}\nbase_model: {fam['base']}\nmodels:\n"
            f"  - model: {fam['ft1']}\n    parameters: {{weight: 1.0, density: {density}}}\n"
            f"  - model: {fam['ft2']}\n    parameters: {{weight: 0.5, density: {density}}}\n"
            f"parameters:\n{params}dtype: float32\n")


@pytest.mark.parametrize("params,kw", [("  rescale: true\n", dict(rescale=True)),
                                       ("  normalize: false\n", dict(normalize=False)),
                                       ("  rescale: true\n  normalize: false\n", dict(rescale=True, normalize=False))],
                         ids=["rescale", "no-normalize", "both"])
def test_ties_options_match_the_oracle(capsys, fam, tmp_path, params, kw):
    out = yaml_out(capsys, tmp_path, _delta_yaml(fam, "ties", params))
    b, *xs = states(fam, "base", "ft1", "ft2")
    assert_close(load_state(out),
                 {k: ties64(b[k], [x[k] for x in xs], [1.0, 0.5], 0.4, mergekit=True, **kw) for k in b})
    if kw.get("rescale"):  # the rescale changes the result (it is not silently ignored)
        plain = yaml_out(capsys, tmp_path, _delta_yaml(fam, "ties", "  rescale: false\n"), name="plain")
        assert not torch.equal(load_state(plain)["a.weight"], load_state(out)["a.weight"])


def test_task_arithmetic_normalize_matches_the_oracle(capsys, fam, tmp_path):
    out = yaml_out(capsys, tmp_path, _delta_yaml(fam, "task_arithmetic", "  normalize: true\n  lambda: 0.7\n", 1.0))
    b, *xs = states(fam, "base", "ft1", "ft2")
    want = {k: b[k].double() + 0.7 * ((xs[0][k].double() - b[k].double()) + 0.5 * (xs[1][k].double() - b[k].double()))
            / 1.5 for k in b}
    assert_close(load_state(out), want)


# ---------------------------------------------------------------------------------------------------
# Parity with mergekit itself (on test_della_breadcrumbs' real tiny Llama family: base and two fine-tunes)


def _parity(tmp_path, text, label):
    """Run one config through mergekit-yaml and cpift-merge config (merge/tools/parity.py) and print the
    figures; float32 outputs within 1e-6, bf16 ones within one bf16 ulp of each tensor's scale."""
    from cpift.merge.tools.parity import ParityCase, compare, run_both

    bf16 = "out_dtype: bfloat16" in text
    case = ParityCase(label, text.replace("{", "{{").replace("}", "}}"), "bfloat16" if bf16 else "float32",
                      ("ulp", 1) if bf16 else ("rel", 1e-6))
    ours, theirs = run_both(case, {}, tmp_path / "run", MERGEKIT)
    row = compare(case, ours, theirs, ours)
    print(f"parity {label}: max abs {row['max_abs']:.3g}, {row['max_ulps']:.2f} ulp of the tensor scale, "
          f"{100 * row['bit_identical']:.2f}% bit-identical")
    assert row["ok"], row


MK = pytest.mark.skipif(not MERGEKIT, reason="CPIFT_MERGEKIT_YAML is not set to a mergekit-yaml")


@MK
@pytest.mark.parametrize("topk", [1.0, 0.5])
def test_sce_agrees_with_mergekit(llama_fam, tmp_path, topk, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fam = llama_fam
    _parity(tmp_path, f"merge_method: sce\nbase_model: {fam['base']}\nmodels:\n"
            + "".join(f"  - model: {fam[n]}\n" for n in ("ft1", "ft2"))
            + f"parameters:\n  select_topk: {topk}\ndtype: float32\n", f"sce select_topk={topk}")


@MK
def test_nearswap_agrees_with_mergekit(llama_fam, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fam = llama_fam
    _parity(tmp_path, f"merge_method: nearswap\nbase_model: {fam['base']}\nmodels:\n  - model: {fam['base']}\n"
            f"  - model: {fam['ft1']}\nparameters:\n  t: 0.03\ndtype: float32\n", "nearswap t=0.03")


@MK
@pytest.mark.parametrize("method,params", [("ties", "  rescale: true\n"), ("ties", "  normalize: false\n"),
                                           ("task_arithmetic", "  normalize: true\n")],
                         ids=["ties-rescale", "ties-no-normalize", "ta-normalize"])
def test_delta_options_agree_with_mergekit(llama_fam, tmp_path, method, params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _parity(tmp_path, _delta_yaml(llama_fam, method, params, 0.4 if method == "ties" else 1.0),
            f"{method} {params.strip()}")


@pytest.mark.parametrize("method,key,want", [("sce", "select_topk", 0.5), ("nearswap", "t", 0.001)])
def test_bench_gives_mergekit_the_same_settings(tmp_path, method, key, want):
    """The bench's mergekit config of sce / nearswap plans to the call its cpift-merge arguments make."""
    from cpift.merge.mergekit.config import load_config
    from cpift.merge.mergekit.plan import plan_call
    from cpift.merge.tools.bench_cases import cpift_args, mergekit_config

    base, tasks = tmp_path / "base", [tmp_path / "t1", tmp_path / "t2"]
    args, _ = cpift_args(method, base, tasks, tasks)
    cfg = tmp_path / "mk.yml"
    cfg.write_text(mergekit_config(method, base, tasks, tasks, "bfloat16"))
    call = plan_call(load_config(cfg))
    assert call.function == method and call.kwargs == {key: want}
    assert args[args.index(f"--{key.replace('_', '-')}") + 1] == str(want)


def test_ties_rescale_and_normalize_reach_the_function(tmp_path):
    from cpift.merge.mergekit.config import load_config
    from cpift.merge.mergekit.plan import plan_call
    from cpift.merge.methods.registry import METHODS

    cfg = tmp_path / "t.yml"
    cfg.write_text("merge_method: ties\nbase_model: base\nmodels:\n"
                   "  - model: a\n    parameters: {weight: 1, density: 0.5}\n"
                   "parameters: {rescale: true, normalize: false, int8_mask: true}\n")
    call = plan_call(load_config(cfg), native=METHODS["ties"].native)
    assert call.kwargs["rescale"] is True and call.kwargs["normalize"] is False


@pytest.mark.parametrize("argv", [["sce", "--base", "base", "ft1", "ft2", "--select-topk", "0.3"],
                                  ["nearswap", "base", "ft1", "--t", "0.01"]], ids=["sce", "nearswap"])
def test_the_recorded_recipe_replays_to_the_same_bytes(capsys, fam, tmp_path, argv):
    argv = [str(fam.get(a, a)) for a in argv]
    code, _, err = run_cli(capsys, *argv, "-o", tmp_path / "out", "-q")
    assert code == 0, err
    code, _, err = run_cli(capsys, "config", tmp_path / "out" / "cpift_recipe.yml", "-o", tmp_path / "again", "-q")
    assert code == 0, err
    assert ((tmp_path / "out" / "model.safetensors").read_bytes()
            == (tmp_path / "again" / "model.safetensors").read_bytes())
    assert f"method **{argv[0]}**" in (tmp_path / "out" / "README.md").read_text()


def test_a_ties_rescale_recipe_replays_the_rescale(fam, tmp_path):
    import cpift

    cpift.ties(fam["base"], [fam["ft1"], fam["ft2"]], tmp_path / "out", weights=[1.0, 0.5], density=0.4,
               rescale=True, progress=False)
    recipe = (tmp_path / "out" / "cpift_recipe.yml").read_text()
    assert "rescale: true" in recipe
    from cpift.merge.mergekit.run import run_config

    run_config(tmp_path / "out" / "cpift_recipe.yml", tmp_path / "again", progress=False)
    assert ((tmp_path / "out" / "model.safetensors").read_bytes()
            == (tmp_path / "again" / "model.safetensors").read_bytes())


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory, llama_fam):  # noqa: F811  (the imported fixture)
    """llama_fam's models stored in bf16."""
    root = tmp_path_factory.mktemp("sce-llama-bf16")
    paths = {}
    for name in ("base", "ft1", "ft2"):
        d = root / name
        d.mkdir()
        shutil.copy(llama_fam[name] / "config.json", d / "config.json")
        state = {k: v.to(torch.bfloat16).contiguous() for k, v in load_state(llama_fam[name]).items()}
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        paths[name] = d
    return paths


@MK
@pytest.mark.parametrize("method,params", [("sce", "select_topk: 1.0"), ("nearswap", "t: 0.03")])
def test_bf16_models_agree_with_mergekit_in_float32_math(llama_bf16, tmp_path, method, params, monkeypatch):
    """bf16 models, `dtype: float32`: both sides compute in float32 and round once to bf16. (With
    select_topk < 1 the bf16 deltas' variances tie often and the kept sets differ at tied entries; with
    `dtype: bfloat16` mergekit rounds the deltas to bf16 and where two deltas nearly cancel the elected
    sign flips: neither is compared here, the README gives the measured figures.)"""
    monkeypatch.chdir(tmp_path)
    fam = llama_bf16
    _parity(tmp_path, f"merge_method: {method}\nbase_model: {fam['base']}\nmodels:\n  - model: {fam['base']}\n"
            f"  - model: {fam['ft1']}\n" + (f"  - model: {fam['ft2']}\n" if method == "sce" else "")
            + f"parameters:\n  {params}\ndtype: float32\nout_dtype: bfloat16\n", f"bf16 {method} {params}")
