"""tokenizer_source / tokenizer: / chat_template (merge/tokenizer/): the output vocabulary and every merged
embedding and LM-head row against a float64 oracle written here from mergekit 0.1.5's rules
(mergekit/tokenizer/embed.py), pad_to_multiple_of, forced tokens and token sources, the output loading
in transformers, chat templates, and bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from references import load_state  # noqa: E402
from test_bad_input import assert_user_error  # noqa: E402
from tokenizer_family import ADDED, TEMPLATE_1, WORDS, build_family, config_of, vocab_of  # noqa: E402

from cpift.errors import ConfigError  # noqa: E402
from cpift.merge.mergekit.run import run_config  # noqa: E402
from cpift.merge.tokenizer.template import BUILTIN_TEMPLATES  # noqa: E402

VOCAB_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("tokfam"))


def oracle_rows(fam, models, base, weights, out_vocab, rules=None, pad=None, name="lm_head.weight"):
    """The merged (linear, Σw·x/Σw) rows of ``name``, float64, from mergekit's rules written afresh."""
    rules = rules or {}
    vocabs = {m: vocab_of(fam[m]) for m in models}
    states = {m: load_state(fam[m])[name].double() for m in models}
    h = next(iter(states.values())).shape[1]
    rows = {m: torch.zeros(len(out_vocab), h, dtype=torch.float64) for m in models}
    for tok, i in out_vocab.items():
        have = [m for m in models if tok in vocabs[m]]
        rule = rules.get(tok, {})
        force = rule.get("force", False)
        default = None
        if force or len(have) < len(models):
            src = rule.get("source")
            if src == "zero":
                default = torch.zeros(h, dtype=torch.float64)
            elif isinstance(src, tuple):  # (model, token)
                default = states[src[0]][vocabs[src[0]][src[1]]]
            elif isinstance(src, int):  # (model token id in the base)
                default = states[base][src]
            elif isinstance(src, str):
                default = states[src][vocabs[src][tok]]
            elif len(have) == 1:
                default = states[have[0]][vocabs[have[0]][tok]]
            elif not have:
                default = torch.zeros(h, dtype=torch.float64)
            elif base in models and base in have:
                default = states[base][vocabs[base][tok]]
            else:
                default = sum(states[m][vocabs[m][tok]] for m in have) / len(have)
        for m in models:
            rows[m][i] = states[m][vocabs[m][tok]] if (m in have and not force) else default
    n = len(out_vocab)
    total = n if not pad or n % pad == 0 else (n // pad + 1) * pad
    for m in models:
        extra = rows[m].mean(dim=0, keepdim=True).expand(total - n, h)
        rows[m] = torch.cat([rows[m], extra])
    return sum(w * rows[m] for m, w in zip(models, weights)) / sum(weights)


def write_cfg(tmp_path, fam, body: str, models=("base", "ft1", "ft2"), weights=(0.3, 0.3, 0.4),
              base="base", dtype="float32"):
    lines = ["merge_method: linear"] + ([f"base_model: {fam[base]}"] if base else []) + ["models:"]
    for m, w in zip(models, weights):
        lines += [f"  - model: {fam[m]}", f"    parameters: {{weight: {w}}}"]
    p = tmp_path / "c.yml"
    p.write_text("\n".join(lines) + f"\ndtype: {dtype}\n" + body)
    return p


UNION = ["<unk>", "<s>", "</s>", *[f"w{i}" for i in range(37)], "zz", *ADDED]


@pytest.mark.parametrize("dtype, tol", [("float32", 2e-6), ("bfloat16", 2 ** -7)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pad", [None, 16, 11], ids=["nopad", "pad16", "pad11"])
def test_union_rows_match_oracle(fam, tmp_path, dtype, tol, pad):
    body = "tokenizer:\n  source: union\n" + (f"  pad_to_multiple_of: {pad}\n" if pad else "")
    p = write_cfg(tmp_path, fam, body, dtype=dtype)
    run_config(p, tmp_path / "out", progress=False)
    out_vocab = vocab_of(tmp_path / "out")
    assert out_vocab == {t: i for i, t in enumerate(UNION)}  # base, then ft2's "zz", then ft1's added
    n = len(UNION)
    rows = n if not pad or n % pad == 0 else (n // pad + 1) * pad
    assert config_of(tmp_path / "out")["vocab_size"] == rows
    state = load_state(tmp_path / "out")
    for name in VOCAB_NAMES:
        got = state[name]
        assert got.dtype == getattr(torch, dtype) and got.shape[0] == rows
        want = oracle_rows(fam, ["base", "ft1", "ft2"], "base", [0.3, 0.3, 0.4], out_vocab, pad=pad, name=name)
        err = ((got.double() - want).abs() / want.abs().clamp_min(1)).max().item()
        assert err <= tol, (name, err)
    other = "model.layers.0.mlp.up_proj.weight"  # not a vocabulary tensor: the plain linear merge
    want = sum(w * load_state(fam[m])[other].double() for m, w in zip(("base", "ft1", "ft2"), (0.3, 0.3, 0.4)))
    assert torch.allclose(state[other].double(), want, rtol=tol, atol=tol)


def test_output_loads_in_transformers(fam, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = write_cfg(tmp_path, fam, "tokenizer: {source: union, pad_to_multiple_of: 8}\nchat_template: chatml\n")
    run_config(p, tmp_path / "out", progress=False)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = tok("w1 zz <|im_end|>", return_tensors="pt").input_ids
    assert ids.tolist() == [[UNION.index("w1"), UNION.index("zz"), UNION.index("<|im_end|>")]]
    logits = model(ids).logits
    assert logits.shape == (1, 3, 48) and torch.isfinite(logits).all()
    assert tok.chat_template == BUILTIN_TEMPLATES["chatml"]


def test_forced_tokens_and_sources_match_oracle(fam, tmp_path):
    body = ("tokenizer:\n  source: union\n  tokens:\n"
            f"    xtra: {{source: {fam['ft1']}}}\n"
            "    <|im_end|>: {source: {kind: zero}, force: true}\n"
            f"    w3: {{source: {{kind: model_token, model: {fam['ft1']}, token: '<|im_start|>'}}, force: true}}\n"
            f"    newtok: {{source: {{kind: model_token, model: {fam['base']}, token_id: 5}}}}\n"
            f"    w4: {{source: {fam['ft2']}, force: true}}\n")
    p = write_cfg(tmp_path, fam, body)
    run_config(p, tmp_path / "out", progress=False)
    out_vocab = vocab_of(tmp_path / "out")
    assert out_vocab == {t: i for i, t in enumerate(UNION + ["newtok"])}
    rules = {"xtra": {"source": "ft1"}, "<|im_end|>": {"source": "zero", "force": True},
             "w3": {"source": ("ft1", "<|im_start|>"), "force": True}, "newtok": {"source": 5},
             "w4": {"source": "ft2", "force": True}}
    state = load_state(tmp_path / "out")
    for name in VOCAB_NAMES:
        want = oracle_rows(fam, ["base", "ft1", "ft2"], "base", [0.3, 0.3, 0.4], out_vocab, rules, name=name)
        assert torch.allclose(state[name].double(), want, rtol=2e-6, atol=2e-6), name
    assert state["lm_head.weight"][out_vocab["<|im_end|>"]].abs().max() == 0  # forced zero in every model


def test_mean_of_the_models_holding_a_token_without_base(fam, tmp_path):
    """No base_model: tokens in two of three models get the mean of those two (ft1 and ft1's copy)."""
    import shutil

    twin = tmp_path / "ft1b"
    shutil.copytree(fam["ft1"], twin)
    from safetensors.torch import save_file
    st = {k: v * 0.5 + 0.25 for k, v in load_state(fam["ft1"]).items()}
    save_file(st, str(twin / "model.safetensors"), metadata={"format": "pt"})
    fam2 = {**fam, "ft1b": twin}
    p = write_cfg(tmp_path, fam2, "tokenizer_source: union\n", models=("ft3", "ft1", "ft1b"),
                  weights=(1.0, 2.0, 3.0), base=None)
    run_config(p, tmp_path / "out", progress=False)
    out_vocab = vocab_of(tmp_path / "out")
    assert out_vocab == {t: i for i, t in enumerate(WORDS + ADDED)}
    state = load_state(tmp_path / "out")
    for name in VOCAB_NAMES:
        want = oracle_rows(fam2, ["ft3", "ft1", "ft1b"], None, [1.0, 2.0, 3.0], out_vocab, name=name)
        assert torch.allclose(state[name].double(), want, rtol=2e-6, atol=2e-6), name


@pytest.mark.parametrize("source, words", [("base", WORDS), ("ft1", WORDS + ADDED)])
def test_base_or_model_source(fam, tmp_path, source, words):
    src = "base" if source == "base" else str(fam[source])
    p = write_cfg(tmp_path, fam, f"tokenizer_source: {src}\n", models=("base", "ft1"), weights=(1.0, 1.0))
    run_config(p, tmp_path / "out", progress=False)
    out_vocab = vocab_of(tmp_path / "out")
    assert out_vocab == {t: i for i, t in enumerate(words)}
    assert config_of(tmp_path / "out")["vocab_size"] == len(words)
    state = load_state(tmp_path / "out")
    for name in VOCAB_NAMES:
        want = oracle_rows(fam, ["base", "ft1"], "base", [1.0, 1.0], out_vocab, name=name)
        assert torch.allclose(state[name].double(), want, rtol=2e-6, atol=2e-6), name


def test_identical_vocabularies_read_zero_copy(fam, tmp_path):
    from cpift.merge.tokenizer.rows import RemappedCheckpoint

    p = write_cfg(tmp_path, fam, "tokenizer_source: base\n", models=("base", "ft3"), weights=(1.0, 1.0))
    from cpift.merge.mergekit import run as run_mod
    seen = []
    orig = run_mod.plan_call

    def spy(cfg, **kw):
        seen.extend(kw["paths"].values())
        return orig(cfg, **kw)

    run_mod.plan_call = spy
    try:
        run_config(p, tmp_path / "out", progress=False)
    finally:
        run_mod.plan_call = orig
    assert seen and not any(isinstance(m, RemappedCheckpoint) for m in seen)
    st, a, b = load_state(tmp_path / "out"), load_state(fam["base"]), load_state(fam["ft3"])
    assert torch.allclose(st["lm_head.weight"], (a["lm_head.weight"] + b["lm_head.weight"]) / 2, atol=1e-6)


@pytest.mark.parametrize("value, want", [
    ("auto", TEMPLATE_1), ("llama3", BUILTIN_TEMPLATES["llama3"]),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "{% for m in messages %}{{ m['content'] }}{% endfor %}"),
], ids=["auto", "builtin", "jinja"])
@pytest.mark.parametrize("with_tokenizer", [True, False], ids=["union", "template-only"])
def test_chat_template(fam, tmp_path, value, want, with_tokenizer):
    from transformers import AutoTokenizer

    quoted = value if value.isalnum() else f"\"{value}\""
    body = ("tokenizer_source: union\n" if with_tokenizer else "") + f"chat_template: {quoted}\n"
    # without a tokenizer field the vocabularies must agree (base, ft3: no template of their own, so
    # auto finds none and the output keeps the donor's, none)
    p = write_cfg(tmp_path, fam, body, **({} if with_tokenizer else {"models": ("base", "ft3"), "weights": (1, 1)}))
    run_config(p, tmp_path / "out", progress=False)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.chat_template == (want if with_tokenizer or value != "auto" else None)
    assert len(tok.get_vocab()) == (len(UNION) if with_tokenizer else len(WORDS))


@pytest.mark.parametrize("body, message", [
    ("tokenizer:\n  tokens:\n    xtra: {source: elsewhere/model}\n",
     r"tokenizer\.tokens\.xtra\.source: 'elsewhere/model' is not a directory"),
    ("tokenizer:\n  tokens:\n    xtra: {source: BASE}\n",
     r"tokenizer\.tokens\.xtra\.source: token 'xtra' is not in the vocabulary of its source"),
    ("tokenizer:\n  tokens:\n    xtra: {source: {kind: model_token, model: BASE, token: nope}}\n",
     r"tokenizer\.tokens\.xtra\.source\.token: 'nope' is not in the vocabulary of"),
    ("tokenizer:\n  tokens:\n    xtra: {source: FT3}\n",
     r"tokenizer\.tokens\.xtra\.source: '.*ft3' is not one of the merged models"),
    ("tokenizer_source: elsewhere/model\n", r"tokenizer_source: 'elsewhere/model' is not a directory"),
])
def test_bad_token_sources_are_one_line(fam, tmp_path, capsys, monkeypatch, body, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = write_cfg(tmp_path, fam, body.replace("BASE", str(fam["base"])).replace("FT3", str(fam["ft3"])))
    with pytest.raises(ConfigError, match=message):
        run_config(p, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    field = message.split(":")[0].replace("\\", "")
    assert_user_error(capsys, ["config", p, "-o", tmp_path / "out2"], field, inputs=[fam["base"], fam["ft1"]])
    assert not (tmp_path / "out2").exists()


def test_missing_transformers_is_one_line(fam, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    p = write_cfg(tmp_path, fam, "tokenizer_source: union\n")
    with pytest.raises(ConfigError,
                       match=r"need the 'transformers' package \(pip install 'cpift\[tokenizer\]', or transformers\)"):
        run_config(p, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_stack_with_remapped_vocabulary_is_refused(fam, tmp_path):
    p = tmp_path / "s.yml"
    p.write_text(f"merge_method: passthrough\nslices:\n  - sources: [{{model: {fam['base']}, layer_range: [0, 1]}}]\n"
                 f"  - sources: [{{model: {fam['ft1']}, layer_range: [0, 1]}}]\ntokenizer_source: union\n")
    with pytest.raises(ConfigError, match=r"tokenizer_source: remapping the embedding rows of a passthrough stack"):
        run_config(p, tmp_path / "out", progress=False)


def test_recipe_replays_and_card_names_the_tokenizer(fam, tmp_path, monkeypatch):
    body = ("tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n  tokens:\n"
            f"    xtra: {{source: {fam['ft1']}}}\n"
            f"    w3: {{source: {{kind: model_token, model: {fam['ft1']}, token: '<|im_start|>'}}, force: true}}\n")
    p = write_cfg(tmp_path, fam, body)
    run_config(p, tmp_path / "out", progress=False)
    assert ("| copy_tokenizer_from | built from the config's tokenizer fields |"
            in (tmp_path / "out" / "README.md").read_text())
    monkeypatch.chdir(tmp_path / "out")
    run_config(tmp_path / "out" / "cpift_recipe.yml", tmp_path / "again", progress=False)
    a, b = load_state(tmp_path / "out"), load_state(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert vocab_of(tmp_path / "out") == vocab_of(tmp_path / "again")


def test_bf16_inputs_without_dtype_remap_in_bf16(tmp_path_factory, tmp_path):
    fam16 = build_family(tmp_path_factory.mktemp("tokfam16"), torch.bfloat16)
    p = write_cfg(tmp_path, fam16, "tokenizer: {source: union, pad_to_multiple_of: 16}\n", dtype="bfloat16")
    p.write_text(p.read_text().replace("dtype: bfloat16\n", ""))
    run_config(p, tmp_path / "out", progress=False)
    out_vocab = vocab_of(tmp_path / "out")
    state = load_state(tmp_path / "out")
    for name in VOCAB_NAMES:
        assert state[name].dtype == torch.bfloat16 and state[name].shape[0] == 48
        want = oracle_rows(fam16, ["base", "ft1", "ft2"], "base", [0.3, 0.3, 0.4], out_vocab, pad=16, name=name)
        # the default and padded rows are built in bf16 (as mergekit does), then merged in float32 and
        # rounded once: two bf16 roundings of the value's scale at most
        err = ((state[name].double() - want).abs() / want.abs().clamp_min(1)).max().item()
        assert err <= 2 * 2 ** -8, (name, err)


def test_padded_embeddings_are_cut_to_the_vocabulary(fam, tmp_path):
    """A model with more embedding rows than tokens (vocab_size 44, 40 tokens): its extra rows are not
    part of the output, whose vocab_size is the tokenizer's, as in mergekit."""
    import json
    import shutil

    from safetensors.torch import save_file

    wide = tmp_path / "wide"
    shutil.copytree(fam["ft3"], wide)
    st = load_state(fam["ft3"])
    for name in VOCAB_NAMES:
        st[name] = torch.cat([st[name], torch.full((4, st[name].shape[1]), 7.0)])
    save_file(st, str(wide / "model.safetensors"), metadata={"format": "pt"})
    conf = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**conf, "vocab_size": 44}))
    fam2 = {**fam, "wide": wide}
    p = write_cfg(tmp_path, fam2, "tokenizer_source: base\n", models=("base", "wide"), weights=(1.0, 1.0))
    run_config(p, tmp_path / "out", progress=False)
    assert config_of(tmp_path / "out")["vocab_size"] == 40
    out_vocab = vocab_of(tmp_path / "out")
    state = load_state(tmp_path / "out")
    for name in VOCAB_NAMES:
        want = oracle_rows(fam2, ["base", "wide"], "base", [1.0, 1.0], out_vocab, name=name)
        assert state[name].shape[0] == 40 and torch.allclose(state[name].double(), want, atol=1e-6), name


def test_model_without_tokenizer_is_one_line(fam, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(fam["ft3"], bare)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bare / f).unlink()
    p = write_cfg(tmp_path, {**fam, "bare": bare}, "tokenizer_source: union\n", models=("base", "bare"),
                  weights=(1.0, 1.0))
    with pytest.raises(ConfigError, match=r"c\.yml: tokenizer_source: cannot load the tokenizer of .*bare"):
        run_config(p, tmp_path / "out", progress=False)
