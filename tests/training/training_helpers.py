"""A tiny random Llama and a character-level tokenizer, built in the tests (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cpift.kernels.masks import pack_bits
from cpift.merge.cpi.masks import block_size, mask_entries, save_core_mask
from cpift.training.evaluate import quiet_transformers

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 +=?:.\n")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(chat: bool = False):
    """One token per character; <eos> ends a response. ``chat``: role tokens, a template, <|end|> as EOS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<eos>"] + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    if chat:
        fast.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
        fast.eos_token = "<|end|>"
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(path: Path, *, chat: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0,
               hidden: int = 32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(chat)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with quiet_transformers():
        LlamaForCausalLM(config).to(dtype).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def arithmetic_rows(n: int, seed: int = 0) -> list[dict]:
    """Small sums: learnable enough that the loss falls within a few steps."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = torch.randint(0, 10, (2,), generator=g).tolist()
        rows.append({"prompt": f"{a}+{b}=", "response": str(a + b)})
    return rows


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def write_mask(path, shapes: dict[str, tuple[int, ...]], *, granularity: str = "element", share: float = 0.3,
               seed: int = 0):
    """A core-mask file selecting a random share of each tensor's mask entries."""
    g = torch.Generator().manual_seed(seed)
    bits = {n: torch.rand(mask_entries(granularity, s), generator=g) < share for n, s in shapes.items()}
    counts = {n: int(b.sum()) for n, b in bits.items()}
    save_core_mask(path, {n: pack_bits(b) for n, b in bits.items()}, shapes, granularity=granularity, p=share * 100,
                   k=sum(counts.values()), threshold=0.0, counts=counts)
    return path, bits


def element_mask_of(bits: torch.Tensor, granularity: str, shape) -> torch.Tensor:
    """Expand mask entries to elements by hand (independent of CoreMask.element_mask)."""
    b = block_size(granularity, shape)
    numel = torch.Size(shape).numel()
    return torch.tensor([bool(bits[i // b]) for i in range(numel)]).reshape(shape)
