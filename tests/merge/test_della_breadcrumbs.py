"""breadcrumbs, breadcrumbs_ties, della, della_linear (merge/methods/delta.py): the masks against
float64 references written from mergekit 0.1.5's definitions (sort-based), DELLA's keep statistics per
rank bucket, the merge against a float64 oracle, the CLI, a mergekit YAML, bad input, and mergekit
parity where CPIFT_MERGEKIT_YAML names a mergekit-yaml."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
from oracles import breadcrumbs_keep64
from references import load_state
from safetensors.torch import save_file
from test_bad_input import assert_user_error, run_cli

import cpift
from cpift.errors import ParameterError
from cpift.kernels.ties import delta_merge_ref
from cpift.merge.methods.delta import breadcrumbs_keep, della_keep, l1_scale

MERGEKIT = os.environ.get("CPIFT_MERGEKIT_YAML")
SHAPES = [(1,), (1023,), (3000,), (33, 97), (7, 1)]
SHAPE_IDS = ["n1", "n1023", "n3000", "33x97", "7x1"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def pair(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g, dtype=torch.float64)
    x = b + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    return b.to(dtype).reshape(-1), x.to(dtype).reshape(-1)


@pytest.mark.parametrize("density,gamma", [(0.9, 0.01), (0.5, 0.1), (0.3, 0.9), (0.05, 0.0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_breadcrumbs_mask_is_mergekits(shape, dtype, density, gamma):
    b, x = pair(shape, dtype)
    assert torch.equal(breadcrumbs_keep(x, b, density, gamma), breadcrumbs_keep64(x, b, density, gamma))


def test_breadcrumbs_ties_follow_the_stable_sort():
    x = torch.tensor([1.0, 1, 1, 1, 2, 2, 2, 2, 3, 3])
    b = torch.zeros(10)
    assert torch.equal(breadcrumbs_keep(x, b, 0.3, 0.2), breadcrumbs_keep64(x, b, 0.3, 0.2))


@pytest.mark.parametrize("shape", [(4000,), (64, 512)], ids=["1d", "64x512"])
def test_della_keep_probability_per_rank_bucket(shape):
    b, x = pair(shape, torch.float32, seed=3)
    density, eps = 0.5, 0.15
    rows = (x - b).abs().view(shape if len(shape) == 2 else (1, -1))
    cols = rows.shape[1]
    rank = torch.sort(rows, dim=1, stable=True).indices.argsort(dim=1).double()
    expect = (density - eps) + 2 * eps * rank / (cols - 1)
    kept = torch.stack([della_keep(x, b, shape, density, eps, s).view(rows.shape) for s in range(20)]).double()
    buckets = torch.div(rank * 10, cols, rounding_mode="floor")
    for q in range(10):
        sel = buckets == q
        got, want = float(kept[:, sel].mean()), float(expect[sel].mean())
        # 20 draws × n/10 entries: a binomial share's standard error is below 0.005; 5 sigma
        assert abs(got - want) < 0.025, (q, got, want)


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (1, 1), (33, 97), (301, 7), (5, 9, 11), (2000, 1)],
                         ids=["n0", "n1", "n7", "1x1", "33x97", "301x7", "5x9x11", "2000x1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_della_keep_is_the_rank_rule_exactly_in_blocks(shape, dtype, monkeypatch):
    """The mask from row blocks (a block far smaller than the tensor) is the rule applied to the whole
    tensor: rank along dim 1 by |x − b| in float32, ties lower index first (a float64 numpy stable sort
    here), keep where u < density − ε + 2ε·rank/(C − 1) (0.5 for C = 1), u the Philox stream of the index."""
    import numpy as np

    from cpift.kernels.dare import philox_uniform
    from cpift.merge.methods import delta

    monkeypatch.setattr(delta, "_DELLA_BLOCK", 50)
    n = 1
    for d in shape:
        n *= d
    b, x = pair((n,), dtype, seed=11)
    x[::5] = b[::5]  # ties at |δ| = 0
    density, eps, seed = 0.4, 0.25, 9
    mag = (x.float() - b.float()).abs().double().numpy()
    rows = mag.reshape(shape if len(shape) >= 2 else (1, n))
    order = np.argsort(rows, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(rows.shape[1]).reshape([1, -1] + [1] * (rows.ndim - 2)), axis=1)
    cols = rows.shape[1] if rows.ndim > 1 else 1
    p = (density - eps) + 2 * eps * (rank / (cols - 1) if cols > 1 else 0.5)
    u = philox_uniform(seed, 0, n).double().numpy().reshape(rows.shape)
    want = torch.from_numpy((u < p).reshape(-1))
    assert torch.equal(della_keep(x, b, shape, density, eps, seed), want)


def test_della_mean_matches_expectation():
    """della_linear without rescale: E[out] = b + Σ w_i p_ij δ_ij; the mean over seeds converges to it."""
    b, x = pair((8, 1000), torch.float32, seed=5)
    rows = (x - b).view(8, 1000)
    rank = torch.sort(rows.abs(), dim=1, stable=True).indices.argsort(dim=1).double()
    p = 0.4 + 0.3 * rank / 999
    keeps = torch.stack([della_keep(x, b, (8, 1000), 0.55, 0.15, s) for s in range(40)]).double()
    mean = (keeps * (x - b).double()).mean(0)
    want = (p.view(-1) * (x - b).double())
    assert float((mean - want).abs().mean()) < 0.1 * float((x - b).abs().mean())


def test_l1_rescale():
    b, x = pair((1023,), torch.float32)
    keep = breadcrumbs_keep64(x, b, 0.5, 0.1)
    c = l1_scale(x, b, keep)
    d = (x - b).double()
    assert abs(c * float(d[keep].abs().sum()) - float(d.abs().sum())) < 1e-9 * float(d.abs().sum())
    assert l1_scale(b, b, keep) == 1.0


# --------------------------------------------------------------------------------------------------
# On checkpoints


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("crumbs")
    g = torch.Generator().manual_seed(11)
    shapes = {"a.weight": (33, 97), "b.bias": (31,), "c.one": (1,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    paths = {}
    for name in ("base", "ft1", "ft2"):
        d = root / name
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 1}')
        t = base if name == "base" else {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file({k: v.contiguous() for k, v in t.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
        paths[name] = d
    return paths


def oracle(fam, method, density, extra, w=(1.0, 0.5), lam=1.0, seed=0):
    from cpift.kernels.dare import tensor_seed

    b, *xs = (load_state(fam[n]) for n in ("base", "ft1", "ft2"))
    out = {}
    for name, bt in b.items():
        bf = bt.reshape(-1)
        ys, cs = [], []
        for i, x in enumerate(xs):
            xf = x[name].reshape(-1)
            keep = (della_keep(xf, bf, bt.shape, density, extra, tensor_seed(seed, name, i)) if "della" in method
                    else breadcrumbs_keep64(xf, bf, density, extra))
            cs.append(l1_scale(xf, bf, keep) if method.startswith("della") else 1.0)
            ys.append(torch.where(keep, xf, bf))
        if method == "della_linear":
            pass  # normalize false by default
        out[name] = delta_merge_ref(bf, ys, list(w), lam=lam, elect_sign=method in ("della", "breadcrumbs_ties"),
                                    normalize=method == "della", scales=cs).reshape(bt.shape)
    return out


@pytest.mark.parametrize("method,extra_opt,extra", [("breadcrumbs", "--gamma", 0.05),
                                                    ("breadcrumbs-ties", "--gamma", 0.05),
                                                    ("della", "--epsilon", 0.1), ("della-linear", "--epsilon", 0.1)])
def test_cli_matches_float64_oracle(capsys, fam, tmp_path, method, extra_opt, extra):
    code, _, err = run_cli(capsys, method, "--base", fam["base"], fam["ft1"], fam["ft2"], "--weights", "1,0.5",
                           "--density", "0.6", extra_opt, str(extra), "-o", tmp_path / "out", "-q")
    assert code == 0, err
    got, want = load_state(tmp_path / "out"), oracle(fam, method.replace("-", "_"), 0.6, extra)
    for k in want:
        assert torch.allclose(got[k].double(), want[k], rtol=1e-6, atol=1e-6), k


def test_yaml_runs_unchanged(capsys, fam, tmp_path):
    cfg = tmp_path / "d.yml"
    cfg.write_text(f"merge_method: della\nbase_model: {fam['base']}\nmodels:\n"
                   f"  - model: {fam['ft1']}\n    parameters: {{weight: 1.0, density: 0.6, epsilon: 0.1}}\n"
                   f"  - model: {fam['ft2']}\n    parameters: {{weight: 0.5, density: 0.6, epsilon: 0.1}}\n"
                   f"dtype: float32\n")
    code, _, err = run_cli(capsys, "config", cfg, "-o", tmp_path / "yaml", "-q")
    assert code == 0, err
    got, want = load_state(tmp_path / "yaml"), oracle(fam, "della", 0.6, 0.1)
    for k in want:
        assert torch.allclose(got[k].double(), want[k], rtol=1e-6, atol=1e-6), k


@pytest.mark.parametrize("method,extra_opt,extra", [("breadcrumbs", "--gamma", "0.05"),
                                                    ("della-linear", "--epsilon", "0.1")])
def test_the_recipe_replays_gamma_and_epsilon(capsys, fam, tmp_path, method, extra_opt, extra):
    """The recipe carries the per-model gamma / epsilon (not mergekit's default) and replays bit for bit."""
    code, _, err = run_cli(capsys, method, "--base", fam["base"], fam["ft1"], fam["ft2"], "--density", "0.6",
                           extra_opt, extra, *(["--seed", "5"] if "della" in method else []),
                           "-o", tmp_path / "cli", "-q")
    assert code == 0, err
    recipe = (tmp_path / "cli" / "cpift_recipe.yml").read_text()
    assert recipe.count(f"{extra_opt[2:]}: {extra}") == 2
    code, _, err = run_cli(capsys, "config", tmp_path / "cli" / "cpift_recipe.yml", "-o", tmp_path / "replay", "-q")
    assert code == 0, err
    got, want = load_state(tmp_path / "replay"), load_state(tmp_path / "cli")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("setting", ["normalize", "rescale"])
def test_a_mergekit_setting_is_validated_by_the_runner(fam, tmp_path, setting):
    with pytest.raises(ParameterError, match=f"^{setting}: expected true or false, got 'yes'$"):
        cpift.della(fam["base"], [fam["ft1"]], tmp_path / "out", progress=False, **{setting: "yes"})
    assert not (tmp_path / "out").exists()


def test_bad_epsilon_is_one_line(capsys, fam, tmp_path):
    assert_user_error(capsys, ["della", "--base", fam["base"], fam["ft1"], "--density", "0.9", "--epsilon", "0.2",
                               "-o", tmp_path / "out"], "epsilon: density ± epsilon must lie in (0, 1)",
                      inputs=list(fam.values()))


@pytest.fixture(scope="module")
def llama_fam(tmp_path_factory, families):
    """A real (tiny) Llama base and two perturbed fine-tunes: mergekit needs an architecture it knows."""
    src = families[("llama", torch.float32)]["base"]
    state = load_state(src)
    g = torch.Generator().manual_seed(13)
    root = tmp_path_factory.mktemp("crumbs-llama")
    paths = {}
    for name in ("base", "ft1", "ft2"):
        d = root / name
        d.mkdir()
        shutil.copy(src / "config.json", d / "config.json")
        t = state if name == "base" else {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
        save_file({k: v.contiguous() for k, v in t.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
        paths[name] = d
    return paths


@pytest.mark.skipif(not MERGEKIT, reason="CPIFT_MERGEKIT_YAML is not set to a mergekit-yaml")
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_agree_with_mergekit(llama_fam, tmp_path, method, monkeypatch):
    fam = llama_fam
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yml").write_text(
        f"merge_method: {method}\nbase_model: {fam['base']}\nmodels:\n"
        f"  - model: {fam['ft1']}\n    parameters: {{weight: 1.0, density: 0.6, gamma: 0.05}}\n"
        f"  - model: {fam['ft2']}\n    parameters: {{weight: 0.5, density: 0.6, gamma: 0.05}}\ndtype: float32\n")
    subprocess.run([MERGEKIT, "c.yml", str(tmp_path / "mk"), "--no-copy-tokenizer", "--quiet",
                    "--no-write-model-card"], check=True, capture_output=True)
    from cpift.merge.mergekit.run import run_config

    run_config(tmp_path / "c.yml", tmp_path / "cpift", progress=False)
    ours, theirs = load_state(tmp_path / "cpift"), load_state(tmp_path / "mk")
    for k, x in ours.items():
        assert torch.allclose(x, theirs[k], rtol=1e-6, atol=1e-6), k
