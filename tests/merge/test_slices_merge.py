"""mergekit ``slices`` merged by a method (several sources per slice, the slices stacked): every output
tensor against a float64 oracle written here from mergekit 0.1.5's rules (layer k of slice i merges
layer lo_j + k − offset_i of each source j; embeddings over the first slice's sources, norm and lm_head
over the last slice's; per-slice base_model and parameters; gradients placed within the slice;
per-model filters matching the source's own name), num_hidden_layers and transformers loading the
result, refusals (one line naming the field), and parity with mergekit where CPIFT_MERGEKIT_YAML names
a mergekit-yaml."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from oracles import slerp64, ties64
from references import load_state
from test_bad_input import run_cli

MERGEKIT = os.environ.get("CPIFT_MERGEKIT_YAML")
PRE = ("model.embed_tokens.weight",)
POST = ("model.norm.weight", "lm_head.weight")


def tiny(path, seed, layers, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=24, intermediate_size=37, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=53, max_position_embeddings=32, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape).to(dtype))  # non-zero, different per model and layer
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def family(tmp_path_factory, dtype):
    root = tmp_path_factory.mktemp(f"slices-{str(dtype)[6:]}")
    return {"A": tiny(root / "A", 1, 4, dtype), "B": tiny(root / "B", 2, 4, dtype),
            "C": tiny(root / "C", 3, 6, dtype), "D": tiny(root / "D", 4, 4, dtype), "dtype": dtype}


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def fam(request, tmp_path_factory):
    return family(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def fam32(tmp_path_factory):
    """For the checks that do not depend on the dtype."""
    return family(tmp_path_factory, torch.float32)


# ------------------------------------------------------------------------------------------------
# The oracle: mergekit's parameter rules and formulas in float64, independent of cpift

def setting(s, name, t):
    """A mergekit value for one tensor: number, gradient, or [{filter, value}] (first match)."""
    if isinstance(s, list) and s and isinstance(s[0], dict):
        for c in s:
            if c.get("filter") in (None, "*") or c["filter"] in name:
                return setting(c["value"], name, t)
        return None
    if isinstance(s, list):
        x = t * (len(s) - 1)
        i0 = int(x)
        i1 = min(len(s) - 1, i0 + 1)
        return (1 - (x - i0)) * s[i0] + (x - i0) * s[i1]
    return s


def resolve(key, scopes, name, t, default=None):
    for sc in scopes:
        if sc and key in sc and (v := setting(sc[key], name, t)) is not None:
            return v
    assert default is not None, key
    return default


def oracle(cfg, states):
    """Output name → float64 tensor, from the config (a dict) and the sources' state dicts."""
    out, k = {}, 0
    top, method = cfg.get("parameters") or {}, cfg["merge_method"]
    slices = cfg["slices"]

    def merge(i, name, srcnames, t):
        sl = slices[i]
        base = sl.get("base_model", cfg.get("base_model"))
        srcs = sl["sources"]
        xs = [states[s["model"]][n].double() for s, n in zip(srcs, srcnames)]

        def per(j, key, default=None):  # per-model: filters match the source's own tensor name
            return resolve(key, [srcs[j].get("parameters"), sl.get("parameters"), top], srcnames[j], t, default)

        shared = lambda key, default=None: resolve(key, [sl.get("parameters"), top], name, t, default)  # noqa: E731
        if method == "linear":
            ws = [per(j, "weight") for j in range(len(srcs))]
            return sum(w * x for w, x in zip(ws, xs)) / sum(ws)
        bi = [s["model"] for s in srcs].index(base)
        if method == "slerp":
            return slerp64(xs[bi], xs[1 - bi], shared("t"))
        others = [j for j in range(len(srcs)) if j != bi]
        ws = [per(j, "weight") for j in others]
        if method == "task_arithmetic":
            return xs[bi] + shared("lambda", 1.0) * sum(w * (xs[j] - xs[bi]) for w, j in zip(ws, others))
        assert method == "ties"
        return ties64(xs[bi], [xs[j] for j in others], ws, [per(j, "density", 1.0) for j in others],
                      shared("lambda", 1.0))

    for n in PRE:
        out[n] = merge(0, n, [n] * len(slices[0]["sources"]), 0.0)
    for i, sl in enumerate(slices):
        ranges = [s["layer_range"] for s in sl["sources"]]
        length = ranges[0][1] - ranges[0][0]
        for o in range(length):
            t = o / (length - 1) if length > 1 else 1.0
            for n in states[sl["sources"][0]["model"]]:
                if n.startswith(f"model.layers.{ranges[0][0] + o}."):
                    suffix = n[len(f"model.layers.{ranges[0][0] + o}."):]
                    srcnames = [f"model.layers.{lo + o}.{suffix}" for lo, _ in ranges]
                    out[f"model.layers.{k + o}.{suffix}"] = merge(i, f"model.layers.{k + o}.{suffix}", srcnames, t)
        k += length
    for n in POST:
        out[n] = merge(len(slices) - 1, n, [n] * len(slices[-1]["sources"]), 0.0)
    return out, k


def configs(fam):
    """Each method's config over A (4 layers), B (4), C (6), D (4): partial, shifted and per-slice.
    linear's filter "layers.4." matches C's layer 4, which feeds output layer 3 (mergekit matches a
    per-model filter against the source's name; output layer 4 comes from C's layer 5); slerp's t
    filter "layers.4." matches output layer 4 (from C's layer 1 and D's 2: a whole-merge value is
    resolved against the output name)."""
    A, B, C, D = fam["A"], fam["B"], fam["C"], fam["D"]
    src = lambda m, lo, hi, **p: {"model": m, "layer_range": [lo, hi], **({"parameters": p} if p else {})}  # noqa: E731
    return {
        "linear": {"merge_method": "linear", "slices": [
            {"sources": [src(A, 0, 3, weight=[1.0, 3.0]), src(B, 1, 4, weight=2.0)]},
            {"sources": [src(A, 2, 4), src(C, 4, 6, weight=[{"filter": "layers.4.", "value": 5.0},
                                                              {"value": 0.5}])],
             "parameters": {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]}},
        ], "parameters": {"weight": 1.0}},
        "slerp": {"merge_method": "slerp", "base_model": A, "slices": [
            {"sources": [src(A, 0, 3), src(B, 0, 3)]},
            {"sources": [src(A, 3, 4), src(C, 5, 6)], "parameters": {"t": 0.3}},
            {"sources": [src(C, 1, 3), src(D, 2, 4)], "base_model": D},
        ], "parameters": {"t": [{"filter": "layers.4.", "value": 0.1},
                                {"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": [0.9, 0.2]}]}},
        "slerp_consts": {"merge_method": "slerp", "base_model": B, "slices": [  # one constant t per slice
            {"sources": [src(A, 1, 2), src(B, 0, 1)], "parameters": {"t": 0.2}},
            {"sources": [src(B, 1, 4), src(D, 1, 4)], "parameters": {"t": 0.7}},
        ]},
        "ties": {"merge_method": "ties", "base_model": A, "slices": [
            {"sources": [src(A, 0, 2), src(B, 0, 2, weight=0.7), src(C, 2, 4, density=0.6)]},
            {"sources": [src(B, 2, 4), src(A, 1, 3, weight=[0.2, 0.9]), src(D, 0, 2)], "base_model": B,
             "parameters": {"density": 0.4}},
        ], "parameters": {"weight": 1.0, "density": 0.8, "lambda": 0.9}},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": A, "slices": [
            {"sources": [src(A, 0, 4), src(B, 0, 4, weight=[0.1, 0.9])]},
            {"sources": [src(A, 1, 3), src(C, 2, 4)], "parameters": {"weight": 0.5}},
        ], "parameters": {"weight": 1.0, "lambda": 0.7}},
    }


def write(tmp_path, cfg, dtype=None, name="c.yml"):
    cfg = dict(cfg, **({"dtype": dtype} if dtype else {}))
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def run(capsys, cfg, out):
    return run_cli(capsys, "config", cfg, "-o", out, "-q", "--threads", "1")


@pytest.mark.parametrize("method", ["linear", "slerp", "slerp_consts", "ties", "task_arithmetic"])
def test_each_tensor_is_the_float64_oracle(capsys, fam, tmp_path, method):
    if method == "ties" and fam["dtype"] == torch.bfloat16:
        pytest.skip("bf16 deltas tie in magnitude, so the oracle's top-k choice is ambiguous; fp32 tests ties")
    cfg = configs(fam)[method]
    capsys.readouterr()
    code, _, err = run(capsys, write(tmp_path, cfg), tmp_path / "out")
    assert code == 0, err
    got = load_state(tmp_path / "out")
    states = {m: load_state(Path(m)) for m in (fam["A"], fam["B"], fam["C"], fam["D"])}
    want, layers = oracle(cfg, states)
    assert sorted(got) == sorted(want)
    worst = 0.0
    for n, w in want.items():
        assert got[n].dtype == fam["dtype"], n
        if fam["dtype"] == torch.float32:
            # float32 math over ≤ 3 inputs (and slerp's reductions over ≤ 2000 entries): a few float32
            # ulps of the inputs' magnitude (~4), far below any wrong-layer / wrong-parameter error (~1)
            err_ = (got[n].double() - w).abs().max().item()
            worst = max(worst, err_)
            assert err_ <= 1e-5 * max(1.0, w.abs().max().item()), (n, err_)
        else:
            # the same float32 math, rounded once to bf16: within one bf16 ulp of the oracle (2^-7
            # relative), plus the float32 error of the math (1e-5 of the magnitudes, as above)
            d = (got[n].double() - w).abs()
            worst = max(worst, (d / w.abs().clamp_min(1e-3)).max().item())
            assert bool((d <= w.abs() * 2.0 ** -7 + 1e-5 * max(1.0, w.abs().max().item())).all()), \
                (n, d.max().item())
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["num_hidden_layers"] == layers
    print(f"{method} {fam['dtype']}: max |cpift - float64 oracle| = {worst:.3g}")


def test_output_loads_in_transformers_with_the_new_depth(capsys, fam32, tmp_path):
    fam = fam32
    cfg = configs(fam)["slerp"]  # 3 + 1 + 2 layers
    code, _, err = run(capsys, write(tmp_path, cfg), tmp_path / "out")
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert ids.shape == (1, 7)
    recipe = yaml.safe_load((tmp_path / "out" / "cpift_recipe.yml").read_text())
    assert len(recipe["slices"]) == 3  # the recipe is the config: it replays the stack
    code, _, err = run(capsys, tmp_path / "out" / "cpift_recipe.yml", tmp_path / "again")
    assert code == 0, err
    a, b = load_state(tmp_path / "out"), load_state(tmp_path / "again")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_one_whole_slice_still_equals_the_models_form(capsys, fam32, tmp_path):
    fam = fam32
    A, B = fam["A"], fam["B"]
    sl = {"merge_method": "linear", "slices": [{"sources": [{"model": A, "layer_range": [0, 4]},
                                                            {"model": B, "layer_range": [0, 4]}]}],
          "parameters": {"weight": [1.0, 2.0]}}
    md = {"merge_method": "linear", "models": [{"model": A}, {"model": B}], "parameters": {"weight": [1.0, 2.0]}}
    assert run(capsys, write(tmp_path, sl, name="s.yml"), tmp_path / "s")[0] == 0
    assert run(capsys, write(tmp_path, md, name="m.yml"), tmp_path / "m")[0] == 0
    s, m = load_state(tmp_path / "s"), load_state(tmp_path / "m")
    assert sorted(s) == sorted(m) and all(torch.equal(s[n], m[n]) for n in s)


def _bad(fam, kind):
    A, B, C = fam["A"], fam["B"], fam["C"]
    s = lambda m, lo, hi: {"model": m, "layer_range": [lo, hi]}  # noqa: E731
    two = lambda *srcs, **kw: {"sources": list(srcs), **kw}  # noqa: E731
    lin = {"merge_method": "linear", "parameters": {"weight": 1.0}}
    ties = {"merge_method": "ties", "base_model": A, "parameters": {"weight": 1.0}}
    return {
        "lengths": (dict(lin, slices=[two(s(A, 0, 2), s(B, 0, 3))]),
                    "slices[0].sources[1].layer_range: [0, 3] has 3 layers, slices[0].sources[0] [0, 2] has 2"),
        "count": (dict(lin, slices=[two(s(A, 0, 2), s(B, 0, 2)), two(s(A, 2, 4), s(B, 2, 4), s(C, 2, 4))]),
                  "slices[1].sources: 3 sources, slices[0] has 2"),
        "base": (dict(ties, slices=[two(s(B, 0, 2), s(C, 0, 2))]),
                 "slices[0].sources: base_model '" + A + "' must be one of the sources"),
        "twice": (dict(lin, slices=[two(s(A, 0, 2), s(A, 2, 4))]),
                  "slices[0].sources[1].model: '" + A + "' is listed twice"),
        "outside": (dict(lin, slices=[two(s(A, 0, 2), s(B, 0, 2)), two(s(A, 2, 5), s(C, 2, 5))]),
                    "slices[1].sources[0].layer_range: [2, 5] is outside the model's 4 layers"),
        "empty": (dict(lin, slices=[two(s(A, 2, 2), s(B, 2, 2))]), "slices[0].sources[0].layer_range: [2, 2] is empty"),
        "missing": (dict(lin, slices=[two({"model": A}, s(B, 0, 2))]), "slices[0].sources[0].layer_range: missing"),
        "lambda": (dict(ties, slices=[two(s(A, 0, 2), s(B, 0, 2)),
                                      two(s(A, 2, 4), s(B, 2, 4), parameters={"lambda": 0.5})]),
                   "slices[1].parameters: lambda = 0.5 here but 1.0 in slices[0]; cpift's ties takes one lambda"),
        "slerp3": (dict(merge_method="slerp", base_model=A, parameters={"t": 0.5},
                        slices=[two(s(A, 0, 2), s(B, 0, 2), s(C, 0, 2))]),
                   "slices[0].sources: slerp merges exactly two models"),
        "weight": ({"merge_method": "linear", "slices": [two(s(A, 0, 2), s(B, 0, 2))]},
                   "slices[0].sources[0].parameters.weight: missing"),
    }[kind]


@pytest.mark.parametrize("kind", ["lengths", "count", "base", "twice", "outside", "empty", "missing", "lambda",
                                  "slerp3", "weight"])
def test_bad_slices_are_one_line_exit_2(capsys, fam32, tmp_path, kind):
    cfg, fragment = _bad(fam32, kind)
    capsys.readouterr()
    code, _, err = run(capsys, write(tmp_path, cfg), tmp_path / "out")
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and fragment in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not MERGEKIT, reason="CPIFT_MERGEKIT_YAML is not set to a mergekit-yaml")
@pytest.mark.parametrize("method", ["linear", "slerp", "slerp_consts", "ties", "task_arithmetic"])
def test_agrees_with_mergekit(capsys, fam, tmp_path, method):
    bf16 = fam["dtype"] == torch.bfloat16
    if bf16 and method == "ties":
        pytest.skip("bf16 ties: a few entries per tensor whose |delta| ties at the trim threshold are kept "
                    "differently (cpift: lowest flat index; mergekit: torch.topk), in the models: form too; "
                    "fp32 ties agrees")
    # bf16: float32 math on both sides (mergekit computes in the inputs' dtype unless dtype is set)
    extra = {"dtype": "float32", "out_dtype": "bfloat16"} if bf16 else {}
    cfg = write(tmp_path, {**configs(fam)[method], **extra})
    subprocess.run([MERGEKIT, str(cfg), str(tmp_path / "mk"), "--no-copy-tokenizer", "--quiet",
                    "--no-write-model-card"], check=True, capture_output=True)
    code, _, err = run(capsys, cfg, tmp_path / "cp")
    assert code == 0, err
    mk, cp = load_state(tmp_path / "mk"), load_state(tmp_path / "cp")
    assert sorted(mk) == sorted(cp)
    worst_abs = worst_rel = worst_ulps = 0.0
    for n in mk:
        assert mk[n].dtype == cp[n].dtype, n
        a, b = mk[n].double(), cp[n].double()
        d = (a - b).abs()
        worst_abs = max(worst_abs, d.max().item())
        worst_rel = max(worst_rel, d.max().item() / a.abs().max().item())  # of the tensor's scale
        if bf16:
            # one bf16 ulp of the tensor's scale, as tests/merge/test_mergekit_parity.py: both compute
            # in float32, summing in different orders, and round once to bf16
            ulp = 2.0 ** (math.floor(math.log2(a.abs().max().item())) - 7)
            worst_ulps = max(worst_ulps, d.max().item() / ulp)
            assert d.max().item() <= ulp, (n, d.max().item(), ulp)
        else:
            assert torch.allclose(b, a, rtol=1e-6, atol=1e-6), (n, d.max().item())
    for f in ("mk", "cp"):
        assert json.loads((tmp_path / f / "config.json").read_text())["num_hidden_layers"] == \
            sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0]
                for s in configs(fam)[method]["slices"])
    ulps = f", max {worst_ulps:.3g} bf16 ulps of the tensor's scale" if bf16 else ""
    print(f"PARITY {method} {fam['dtype']}: max abs {worst_abs:.3g}, max abs / tensor scale {worst_rel:.3g}{ulps}")


def _split_vs_whole(fam, method):
    """A config of two slices [0, 2) + [2, 4) of the same sources, and the models: form it must equal."""
    from cpift.merge.methods.registry import METHODS

    spec = METHODS[method]
    names = ["A", "B"] if spec.inputs.base == "pair" else ["A", "B", "D"]
    mk = spec.mergekit
    params = {k: v for k, v in {"weight": 0.6, "density": 0.7, "t": 0.4}.items() if k in mk.inputs + mk.shared}
    with_base = spec.inputs.base in ("required", "pair", "optional")
    base = {"base_model": fam["A"]} if with_base else {}
    sliced = {"merge_method": method, **base, "parameters": params,
              "slices": [{"sources": [{"model": fam[n], "layer_range": [lo, lo + 2]} for n in names]}
                         for lo in (0, 2)]}
    whole = {"merge_method": method, **base, "parameters": params, "models": [{"model": fam[n]} for n in names]}
    return sliced, whole


def _mergekit_methods():
    from cpift.merge.methods.registry import mergekit_methods

    return [m for m in mergekit_methods() if m != "passthrough"]


@pytest.mark.parametrize("method", _mergekit_methods())
def test_every_method_runs_over_slices_and_two_halves_equal_the_whole(capsys, fam32, tmp_path, method):
    """Slices [0, 2) + [2, 4) of the same sources are the models: form merge, bit for bit: the views
    feed each method exactly its inputs (seeded methods too: their streams key on the tensor name)."""
    fam = fam32
    sliced, whole = _split_vs_whole(fam, method)
    capsys.readouterr()
    code, _, err = run(capsys, write(tmp_path, sliced, name="s.yml"), tmp_path / "s")
    assert code == 0, err
    code, _, err = run(capsys, write(tmp_path, whole, name="w.yml"), tmp_path / "w")
    assert code == 0, err
    s, w = load_state(tmp_path / "s"), load_state(tmp_path / "w")
    assert sorted(s) == sorted(w)
    for n in s:
        assert torch.equal(s[n], w[n]), n
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 4


@pytest.fixture(scope="module")
def tok_fam(tmp_path_factory):
    from tokenizer_family import build_family

    return build_family(tmp_path_factory.mktemp("slices-tok"))


def _tok_slices(a, b, tok):
    return {"merge_method": "linear", "parameters": {"weight": 1.0}, "tokenizer_source": tok,
            "slices": [{"sources": [{"model": str(a), "layer_range": [0, 1]}, {"model": str(b), "layer_range": [0, 1]}]}
                       for _ in range(2)]}


def test_tokenizer_source_with_one_vocabulary_runs(capsys, tok_fam, tmp_path):
    """base and ft3 share a vocabulary: the rows stay as they are, the tokenizer is the built one."""
    from tokenizer_family import config_of, vocab_of

    capsys.readouterr()
    code, _, err = run(capsys, write(tmp_path, dict(_tok_slices(tok_fam["base"], tok_fam["ft3"], "base"),
                                                    base_model=str(tok_fam["base"]))), tmp_path / "out")
    assert code == 0, err
    got, a, b = load_state(tmp_path / "out"), load_state(tok_fam["base"]), load_state(tok_fam["ft3"])
    emb = "model.embed_tokens.weight"
    assert torch.allclose(got[emb], (a[emb] + b[emb]) / 2, rtol=1e-6, atol=1e-6)
    assert config_of(tmp_path / "out")["num_hidden_layers"] == 2
    assert config_of(tmp_path / "out")["vocab_size"] == config_of(tok_fam["base"])["vocab_size"]
    assert vocab_of(tmp_path / "out") == vocab_of(tok_fam["base"])


def test_tokenizer_remap_of_stacked_slices_is_refused(capsys, tok_fam, tmp_path):
    capsys.readouterr()
    code, _, err = run(capsys, write(tmp_path, _tok_slices(tok_fam["base"], tok_fam["ft1"], "union")), tmp_path / "o")
    assert code == 2, err
    assert err.count("\n") == 1 and "tokenizer_source: remapping the embedding rows of stacked slices" in err, err
    assert not (tmp_path / "o").exists()


def test_passthrough_stack_with_tokenizer_source_base(capsys, tok_fam, tmp_path):
    """The tokenizer's vocab_size update and the stack's num_hidden_layers both reach config.json."""
    from tokenizer_family import config_of

    cfg = {"merge_method": "passthrough", "tokenizer_source": "base", "base_model": str(tok_fam["base"]),
           "slices": [{"sources": [{"model": str(tok_fam[m]), "layer_range": [0, 1]}]} for m in ("base", "ft3")]}
    capsys.readouterr()
    code, _, err = run(capsys, write(tmp_path, cfg), tmp_path / "out")
    assert code == 0, err
    conf = config_of(tmp_path / "out")
    assert conf["num_hidden_layers"] == 2 and conf["vocab_size"] == config_of(tok_fam["base"])["vocab_size"]
