"""mergekit parity of tokenizer configs (skipped without CPIFT_MERGEKIT_YAML): the same config through
mergekit-yaml and cpift-merge config on a tiny Llama family whose vocabularies differ; every tensor
bit-identical or within 1 bf16 ulp, the vocabularies (token → id) identical, the chat template identical.

Only base_model and one other model bring tokens (mergekit orders the tokens of several models by
iterating a Python set, so their ids can change between its runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from references import load_state  # noqa: E402
from tokenizer_family import build_family, config_of  # noqa: E402

MERGEKIT = os.environ.get("CPIFT_MERGEKIT_YAML")
pytestmark = pytest.mark.skipif(not MERGEKIT, reason="CPIFT_MERGEKIT_YAML is not set to a mergekit-yaml")

CASES = {
    "union-pad-tokens": ("tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n  tokens:\n"
                         "    xtra: {source: FT1}\n    <|im_end|>: {source: {kind: zero}, force: true}\n"
                         "    w3: {source: {kind: model_token, model: FT1, token: '<|im_start|>'}, force: true}\n"
                         "    newtok: {source: {kind: model_token, model: BASE, token_id: 5}}\n"
                         "chat_template: chatml\n"),
    "union": "tokenizer_source: union\nchat_template: auto\n",
    "base": "tokenizer_source: base\n",
    "model": "tokenizer_source: FT1\nchat_template: \"{% for m in messages %}{{ m['content'] }}{% endfor %}\"\n",
}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return {dt: build_family(tmp_path_factory.mktemp(f"tokpar-{dt}"), getattr(torch, dt))
            for dt in ("float32", "bfloat16")}


# ties in bfloat16 is left out: mergekit computes ties in the config dtype, cpift in float32, and every
# tensor then differs (the tokenizer's or not): a method-level difference, not the remapping's.
@pytest.mark.parametrize("method, dtype", [("linear", "float32"), ("linear", "bfloat16"), ("ties", "float32")])
@pytest.mark.parametrize("case", list(CASES))
def test_tokenizer_configs_agree_with_mergekit(fam, tmp_path, monkeypatch, case, method, dtype):
    from transformers import AutoTokenizer

    f = fam[dtype]
    monkeypatch.chdir(tmp_path)
    extra = ", density: 0.7" if method == "ties" else ""
    body = CASES[case].replace("FT1", str(f["ft1"])).replace("BASE", str(f["base"]))
    (tmp_path / "c.yml").write_text(
        f"merge_method: {method}\nbase_model: {f['base']}\nmodels:\n"
        f"  - model: {f['base']}\n    parameters: {{weight: 0.4{extra}}}\n"
        f"  - model: {f['ft1']}\n    parameters: {{weight: 0.6{extra}}}\n"
        f"  - model: {f['ft3']}\n    parameters: {{weight: 0.3{extra}}}\n"
        f"dtype: {dtype}\n" + body)
    subprocess.run([MERGEKIT, "c.yml", str(tmp_path / "mk"), "--quiet", "--no-write-model-card"],
                   check=True, capture_output=True)
    from cpift.merge.mergekit.run import run_config

    run_config(tmp_path / "c.yml", tmp_path / "cpift", progress=False)
    ours, theirs = load_state(tmp_path / "cpift"), load_state(tmp_path / "mk")
    assert ours.keys() == theirs.keys()
    worst, worst_vocab = 0.0, 0.0
    for k, x in ours.items():
        y = theirs[k]
        assert x.shape == y.shape and x.dtype == y.dtype, k
        if dtype == "float32":
            rel = ((x.double() - y.double()).abs() / y.double().abs().clamp_min(1e-30)).max().item()
            assert torch.allclose(x, y, rtol=1e-6, atol=1e-6), (k, rel)
        else:  # within one bf16 ulp of mergekit's value
            ulp = torch.finfo(torch.bfloat16).eps * y.double().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
            assert ((x.double() - y.double()).abs() <= ulp).all(), k
        diff = (x.double() - y.double()).abs().max().item()
        worst = max(worst, diff)
        if k.endswith(("embed_tokens.weight", "lm_head.weight")):
            worst_vocab = max(worst_vocab, diff)
    print(f"{case} {method} {dtype}: max abs diff {worst:.3g} (embeddings and LM head: {worst_vocab:.3g})")
    ta, tb = AutoTokenizer.from_pretrained(tmp_path / "cpift"), AutoTokenizer.from_pretrained(tmp_path / "mk")
    assert ta.get_vocab() == tb.get_vocab()
    assert ta.chat_template == tb.chat_template
    assert config_of(tmp_path / "cpift")["vocab_size"] == config_of(tmp_path / "mk")["vocab_size"]
