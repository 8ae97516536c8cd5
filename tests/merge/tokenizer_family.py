"""A tiny Llama family whose vocabularies differ, with real fast tokenizers built offline (WordLevel):
``base`` (40 tokens), ``ft1`` (base + 3 added tokens: 43 rows), ``ft2`` (base + one ordinary token "zz":
41 rows), ``ft3`` (base's vocabulary, other weights). Used by tests/merge/test_tokenizer_*.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["<unk>", "<s>", "</s>", *[f"w{i}" for i in range(37)]]
ADDED = ["<|im_start|>", "<|im_end|>", "xtra"]
TEMPLATE_1 = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def save_tokenizer(d: Path, words: list[str], added: list[str], template: str | None = None) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if added:
        fast.add_tokens(added, special_tokens=True)
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(d))


def build_family(root: Path, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    specs = {"base": (WORDS, [], None), "ft1": (WORDS, ADDED, TEMPLATE_1), "ft2": (WORDS + ["zz"], [], TEMPLATE_1),
             "ft3": (WORDS, [], None)}
    paths = {}
    for i, (name, (words, added, template)) in enumerate(specs.items()):
        n = len(words) + len(added)
        cfg = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=n, max_position_embeddings=32, tie_word_embeddings=False,
                          bos_token_id=1, eos_token_id=2, pad_token_id=None)
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_config(cfg).to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape) * 0.5)
        d = root / name
        model.save_pretrained(d, safe_serialization=True)
        save_tokenizer(d, words, added, template)
        paths[name] = d
    return paths


def vocab_of(d: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d)).get_vocab()


def config_of(d: Path) -> dict:
    return json.loads((Path(d) / "config.json").read_text())
