"""mergekit YAML configs: every supported form and the call it maps to, and bit-identity of
``run_config`` with the direct call of the same method."""

from __future__ import annotations

from pathlib import Path

import pytest
from config_helpers import L4, SLERP, cfg_of, value, write

from cpift.errors import ConfigError
from cpift.merge.mergekit.plan import plan_call
from cpift.merge.mergekit.run import run_config

# ------------------------------------------------------------------------------------------------
# Configs: every supported form, and the call each maps to

LINEAR = """
    merge_method: linear
    models:
      - model: a
        parameters: {weight: 1.0}
      - model: b
        parameters:
          weight: [{filter: mlp, value: 3}, {value: 1}]
    dtype: float16
"""


def test_linear_models_form(tmp_path):
    cfg = cfg_of(tmp_path, LINEAR)
    assert cfg.method == "linear" and [m.model for m in cfg.models] == ["a", "b"]
    assert cfg.dtype == "float16" and cfg.out_dtype is None and cfg.base_model is None
    call = plan_call(cfg, num_layers=4)
    assert call.function == "linear" and call.args == (("a", "b"),)
    w = call.kwargs["weights"]
    assert w[0] == 1.0 and value(w[1], "model.layers.0.mlp.up_proj.weight") == 3.0
    assert value(w[1], "model.norm.weight") == 1.0


def test_linear_global_weight_is_per_model_fallback_and_unlisted_base_is_added(tmp_path):
    cfg = cfg_of(tmp_path, """
        merge_method: linear
        base_model: c
        parameters: {weight: 0.5}
        models:
          - model: a
            parameters: {weight: 2}
          - model: b
    """)
    call = plan_call(cfg, num_layers=4)
    assert call.args == (("a", "b", "c"),)
    assert call.kwargs["weights"] == [2.0, 0.5, 0.5]
    assert any("base_model 'c' is not listed" in n for n in call.notes)


def test_linear_normalize_false_only_when_constant_weights_sum_to_one(tmp_path):
    ok = cfg_of(tmp_path, """
        merge_method: linear
        parameters: {normalize: false}
        models: [{model: a, parameters: {weight: 0.25}}, {model: b, parameters: {weight: 0.75}}]
    """)
    assert plan_call(ok).kwargs["weights"] == [0.25, 0.75]
    bad = cfg_of(tmp_path, """
        merge_method: linear
        parameters: {normalize: false}
        models: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 1}}]
    """)
    with pytest.raises(ConfigError, match=r"merge\.yml: parameters\.normalize: false .*sum of 2"):
        plan_call(bad)
    assert plan_call(bad, native={"normalize"}).kwargs["normalize"] is False





def test_slerp_slices_form_base_is_model_a(tmp_path):
    cfg = cfg_of(tmp_path, SLERP)
    assert cfg.layer_range == (0, 4)
    call = plan_call(cfg, num_layers=4)
    assert call.function == "slerp" and call.args == ("base", "other")
    t = call.kwargs["t"]
    # L = 4, n = 5: layer 1 sits at s = 4/3, between 0.5 and 0.3 at a third of the way.
    assert t("model.layers.1.self_attn.k_proj.weight") == pytest.approx(0.5 + (0.3 - 0.5) / 3)
    assert t("model.layers.3.mlp.gate_proj.weight") == 0.0
    assert t("model.layers.2.input_layernorm.weight") == 0.5
    assert t("model.embed_tokens.weight") == 0.5


def test_slerp_models_form_with_unlisted_base(tmp_path):
    cfg = cfg_of(tmp_path, """
        merge_method: slerp
        base_model: base
        models: [{model: other}]
        parameters: {t: 0.3}
    """)
    assert plan_call(cfg).args == ("base", "other") and plan_call(cfg).kwargs == {"t": 0.3}


TIES = """
    merge_method: ties
    base_model: base
    models:
      - model: base
      - model: a
        parameters: {weight: 1.0, density: 0.5}
      - model: b
        parameters:
          weight: [0, 1]
          density: [{filter: mlp, value: 0.2}]
    parameters:
      density: 0.7
      lambda: 0.9
      normalize: true
      int8_mask: true
    dtype: float32
    out_dtype: bfloat16
"""


def test_ties_base_in_models_is_dropped_and_scopes_fall_through(tmp_path):
    cfg = cfg_of(tmp_path, TIES)
    assert cfg.out_dtype == "bfloat16"
    call = plan_call(cfg, num_layers=4)
    assert call.function == "ties" and call.args == ("base", ("a", "b"))
    assert call.kwargs["lam"] == 0.9
    w, d = call.kwargs["weights"], call.kwargs["density"]
    assert w[0] == 1.0 and value(w[1], L4.format(3)) == 1.0 and value(w[1], "lm_head.weight") == 0.0
    assert d[0] == 0.5
    assert value(d[1], "model.layers.0.mlp.up_proj.weight") == 0.2
    assert value(d[1], L4.format(0)) == 0.7          # no filter matched: the top-level density
    assert "normalize" not in call.kwargs and call.notes == []


def test_delta_methods_density_default_and_base_parameters_note(tmp_path):
    cfg = cfg_of(tmp_path, """
        merge_method: dare_linear
        base_model: base
        models:
          - model: base
            parameters: {weight: 1}
          - model: a
            parameters: {weight: 0.5}
    """)
    call = plan_call(cfg)
    assert call.function == "dare_linear" and call.args == ("base", ("a",))
    assert call.kwargs == {"weights": [0.5], "lam": 1.0, "density": [1.0]}
    assert any("models[0].parameters (weight) have no effect" in n for n in call.notes)


def test_task_arithmetic_normalize_true_divides_weights(tmp_path):
    cfg = cfg_of(tmp_path, """
        merge_method: task_arithmetic
        base_model: base
        parameters: {normalize: true, lambda: 2}
        models: [{model: a, parameters: {weight: 0.5}}, {model: b, parameters: {weight: 0.3}}]
    """)
    call = plan_call(cfg)
    assert call.kwargs["weights"] == [0.5 / 0.8, 0.3 / 0.8] and call.kwargs["lam"] == 2.0
    assert "density" not in call.kwargs


def test_task_arithmetic_normalize_true_with_gradient_weights(tmp_path):
    cfg = cfg_of(tmp_path, """
        merge_method: task_arithmetic
        base_model: base
        parameters: {normalize: true}
        models: [{model: a, parameters: {weight: [1, 3]}}, {model: b, parameters: {weight: 1}}]
    """)
    w = plan_call(cfg, num_layers=3).kwargs["weights"]
    # layer 1 of 3: weight a = 2, b = 1 → 2/3 and 1/3.
    assert value(w[0], L4.format(1)) == pytest.approx(2 / 3)
    assert value(w[1], L4.format(1)) == pytest.approx(1 / 3)


def test_task_arithmetic_density_is_accepted_with_a_note(tmp_path):
    cfg = cfg_of(tmp_path, """
        merge_method: task_arithmetic
        base_model: base
        parameters: {weight: 1, density: 0.5}
        models: [{model: a}]
    """)
    call = plan_call(cfg)
    assert call.kwargs == {"weights": [1.0], "lam": 1.0}
    assert any("parameters.density has no effect" in n for n in call.notes)


def test_dare_ties_normalize(tmp_path):
    base = """
        merge_method: dare_ties
        base_model: base
        models: [{model: a, parameters: {weight: 1, density: 0.4}}]
    """
    # mergekit's default for dare_ties is normalize: false; cpift's dare_ties takes the TIES mean.
    with pytest.raises(ConfigError, match=r"parameters\.normalize: false \(mergekit's default for "
                                          r"dare_ties\) is not supported"):
        plan_call(cfg_of(tmp_path, base))
    assert plan_call(cfg_of(tmp_path, base), native={"normalize"}).kwargs["normalize"] is False
    ok = plan_call(cfg_of(tmp_path, base + "    parameters: {normalize: true}\n"))
    assert ok.kwargs == {"weights": [1.0], "lam": 1.0, "density": [0.4]}


@pytest.mark.parametrize("method, setting, message", [
    ("ties", "normalize: false", r"parameters\.normalize: false is not supported for ties"),
    ("ties", "rescale: true", r"parameters\.rescale: true is not supported for ties"),
    ("dare_linear", "rescale: false", r"parameters\.rescale: false is not supported for dare_linear"),
])
def test_unsupported_normalize_rescale(tmp_path, method, setting, message):
    cfg = cfg_of(tmp_path, f"""
        merge_method: {method}
        base_model: base
        parameters: {{{setting}}}
        models: [{{model: a, parameters: {{weight: 1}}}}]
    """)
    with pytest.raises(ConfigError, match=message):
        plan_call(cfg)


def test_slice_parameters_sit_between_model_and_top_level(tmp_path):
    cfg = cfg_of(tmp_path, """
        merge_method: ties
        base_model: base
        parameters: {weight: 9, density: 0.9}
        slices:
          - sources:
              - {model: base, layer_range: [0, 4]}
              - {model: a, layer_range: [0, 4], parameters: {density: 0.1}}
            parameters: {weight: [{filter: mlp, value: 2}]}
    """)
    call = plan_call(cfg, num_layers=4)
    w = call.kwargs["weights"][0]
    assert value(w, "model.layers.0.mlp.up_proj.weight") == 2.0 and value(w, "model.norm.weight") == 9.0
    assert call.kwargs["density"] == [0.1]


def test_gradient_needs_num_layers(tmp_path):
    with pytest.raises(ConfigError, match="gradient .*num_hidden_layers"):
        plan_call(cfg_of(tmp_path, LINEAR.replace("weight: 1.0", "weight: [1, 2]")), num_layers=None)


def test_same_model_twice_after_resolution(tmp_path):
    cfg = cfg_of(tmp_path, LINEAR)
    with pytest.raises(ConfigError, match=r"models\[1\]\.model: 'b' is the same model as models\[0\]"):
        plan_call(cfg, num_layers=4, paths={"a": "/x/a", "b": "/x/a"})


def test_misc_top_level_fields(tmp_path):
    cfg = cfg_of(tmp_path, """
        name: my-merge
        merge_method: slerp
        base_model: base
        tokenizer_source: base
        dtype: torch.float16
        models: [{model: base}, {model: other}]
        parameters: {t: 0.5}
    """)
    assert cfg.name == "my-merge" and cfg.tokenizer_source == "base" and cfg.dtype == "float16"
    assert cfg_of(tmp_path, """
        merge_method: slerp
        base_model: base
        tokenizer: {source: some/dir}
        models: [{model: base}, {model: other}]
        parameters: {t: 0.5}
    """).tokenizer_source == "some/dir"


# ------------------------------------------------------------------------------------------------
# Integration: run_config against the direct cpift call, bit for bit

try:
    from cpift.merge import methods
    _ENGINE_ERROR = None
except Exception as e:  # noqa: BLE001 - any import failure means the engine is not there yet
    methods = None
    _ENGINE_ERROR = f"{type(e).__name__}: {e}"

engine = pytest.mark.skipif(methods is None, reason=f"cpift.merge.methods cannot be imported yet "
                                                    f"({_ENGINE_ERROR})")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """base, a, b, c: tiny Llama checkpoints of 4 layers with independent seeded weights, sharded."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizer_family import save_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    vocab = {f"t{i}": i for i in range(128)}
    for seed, name in enumerate(["base", "a", "b", "c"]):
        torch.manual_seed(1000 + seed)
        model = transformers.LlamaForCausalLM(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.05)
        model.save_pretrained(root / name, max_shard_size="20KB")
        # a real one: tokenizer_source loads it
        save_tokenizer(root / name, ["<unk>", "<s>", "</s>", *list(vocab)[3:]], [])
        assert len(list((root / name).glob("*.safetensors"))) > 2
    return root


def load_out(path: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    assert state, f"no tensors in {path}"
    return state


def assert_identical(x: Path, y: Path) -> None:
    import torch

    a, b = load_out(x), load_out(y)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(-1).view(torch.uint8), b[name].view(-1).view(torch.uint8)), (
            f"{name}: first mismatch at flat index "
            f"{(a[name].reshape(-1) != b[name].reshape(-1)).nonzero()[0].item()}")


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def ramp(name: str) -> float:
    """[0, 1] over 4 layers by hand: layer i → i/3, tensors outside layers → 0."""
    i = layer_of(name)
    return 0.0 if i is None else i / 3


CASES = {
    "linear": ("""
        merge_method: linear
        models:
          - model: a
            parameters: {weight: [0, 1]}
          - model: b
            parameters:
              weight: [{filter: mlp, value: 2}, {value: 1}]
          - model: c
            parameters: {weight: 0.5}
     """, lambda r: methods.linear([r / "a", r / "b", r / "c"], r / "direct", weights=[
        ramp, lambda n: 2.0 if "mlp" in n else 1.0, 0.5], copy_tokenizer_from=r / "a")),
    "slerp": ("""
        merge_method: slerp
        base_model: b
        slices:
          - sources:
              - {model: a, layer_range: [0, 4]}
              - {model: b, layer_range: [0, 4]}
        parameters:
          t: [{filter: self_attn, value: [0, 1]}, {value: 0.25}]
        dtype: bfloat16
     """, lambda r: methods.slerp(r / "b", r / "a", r / "direct",
                                  t=lambda n: ramp(n) if "self_attn" in n else 0.25, dtype="bfloat16",
                                  out_dtype="bfloat16", copy_tokenizer_from=r / "b")),
    "task_arithmetic": ("""
        merge_method: task_arithmetic
        base_model: base
        models:
          - model: base
          - {model: a, parameters: {weight: 0.5}}
          - {model: b, parameters: {weight: -0.25}}
        parameters: {lambda: 0.75}
        out_dtype: float16
     """, lambda r: methods.task_arithmetic(r / "base", [r / "a", r / "b"], r / "direct",
                                            weights=[0.5, -0.25], lam=0.75, out_dtype="float16",
                                            copy_tokenizer_from=r / "base")),
    "ties": ("""
        merge_method: ties
        base_model: base
        models:
          - {model: a, parameters: {weight: 1, density: 0.5}}
          - {model: b, parameters: {weight: 0.5, density: [{filter: mlp, value: 0.2}, {value: 0.7}]}}
          - {model: c, parameters: {weight: 0.25}}
        parameters: {normalize: true, int8_mask: true, density: 0.4}
        tokenizer_source: base
     """, lambda r: methods.ties(r / "base", [r / "a", r / "b", r / "c"], r / "direct",
                                 weights=[1.0, 0.5, 0.25],
                                 density=[0.5, lambda n: 0.2 if "mlp" in n else 0.7, 0.4],
                                 copy_tokenizer_from=r / "base")),
    "dare_linear": ("""
        merge_method: dare_linear
        base_model: base
        models:
          - {model: a, parameters: {weight: 0.6, density: 0.5}}
          - {model: b, parameters: {weight: 0.4, density: 0.9}}
        parameters: {lambda: 1.5}
     """, lambda r: methods.dare_linear(r / "base", [r / "a", r / "b"], r / "direct", weights=[0.6, 0.4],
                                        density=[0.5, 0.9], lam=1.5, seed=7,
                                        copy_tokenizer_from=r / "base")),
    "dare_ties": ("""
        merge_method: dare_ties
        base_model: base
        models:
          - {model: a, parameters: {weight: [1, 0]}}
          - {model: b, parameters: {weight: 1}}
        parameters: {density: 0.6, normalize: true}
     """, lambda r: methods.dare_ties(r / "base", [r / "a", r / "b"], r / "direct",
                                      weights=[lambda n: 1.0 - ramp(n), 1.0], density=[0.6, 0.6], seed=7,
                                      copy_tokenizer_from=r / "base")),
}


@engine
@pytest.mark.parametrize("method", list(CASES))
def test_run_config_matches_direct_call(tiny, tmp_path, monkeypatch, method):
    text, direct = CASES[method]
    root = tmp_path / "run"
    root.mkdir()
    for name in ("base", "a", "b", "c"):
        (root / name).symlink_to(tiny / name)
    monkeypatch.chdir(root)  # the YAML names models relative to the current directory, as mergekit does
    cfg = write(root, text, name=f"{method}.yml")
    result = run_config(cfg, root / "from-yaml", seed=7, progress=False)
    direct(root)
    assert_identical(root / "from-yaml", root / "direct")
    assert result.out == root / "from-yaml"


@engine
def test_slices_form_equals_models_form(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny)
    models = write(tmp_path, """
        merge_method: slerp
        base_model: a
        models: [{model: a}, {model: b}]
        parameters: {t: [0.2, 0.9]}
    """, name="models.yml")
    slices = write(tmp_path, """
        merge_method: slerp
        base_model: a
        slices:
          - sources: [{model: a, layer_range: [0, 4]}, {model: b, layer_range: [0, 4]}]
        parameters: {t: [0.2, 0.9]}
    """, name="slices.yml")
    run_config(models, tmp_path / "m", progress=False)
    run_config(slices, tmp_path / "s", progress=False)
    assert_identical(tmp_path / "m", tmp_path / "s")
