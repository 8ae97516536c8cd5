"""A tiny character-level Llama and example data, to try ``cpift-train`` in seconds (``cpift-train example``).

The tests build their models with the same functions (tests/training/training_helpers.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from cpift.errors import OutputError

from .evaluate import quiet_transformers

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 +=?:.\n")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

# The pipeline example's three tasks over two digits a, b: prompt and response.
TASKS: dict[str, Callable[[int, int], tuple[str, str]]] = {
    "add": lambda a, b: (f"{a}+{b}=", str(a + b)),
    "cat": lambda a, b: (f"{a}:{b}=", f"{a}{b}"),
    "rev": lambda a, b: (f"{a}{b}?", f"{b}{a}"),
}

RECIPE = """\
base: tiny-llama
seed: 0
tasks:
  - {name: add, train: add.jsonl, eval: add-test.jsonl}
  - {name: cat, train: cat.jsonl, eval: cat-test.jsonl}
  - {name: rev, train: rev.jsonl, eval: rev-test.jsonl}
probe: {steps: 100, lr: 3e-3, batch_size: 16}
p: 5
tau: 0.5
train: {steps_per_task: 100, lr: 3e-3, batch_size: 16}
calibration: {examples: 32, steps_per_task: 10, lr: 1e-3, batch_size: 16}
baselines: {stages: 2, groups: [[add, cat], [rev]]}
eval: {batch_size: 32, max_length: 32}
"""


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


def make_model(path: str | os.PathLike, *, chat: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0,
               hidden: int = 32, intermediate: int | None = None, tied: bool = False) -> Path:
    """Save a random 2-layer Llama of width ``hidden`` with the character tokenizer to ``path``.

    ``intermediate``: the MLP width (default 2 × hidden; an odd one shards unevenly over two ranks);
    ``tied``: the head shares the embedding matrix.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(chat)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with quiet_transformers():
        LlamaForCausalLM(config).to(dtype).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return Path(path)


def write_jsonl(path: str | os.PathLike, rows: list) -> Path:
    """One JSON object (or a given string) per line."""
    path = Path(path)
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


def task_rows(task: str, n: int, *, seed: int) -> list[dict]:
    """``n`` examples of one of ``TASKS`` on seeded random digits."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt, response = TASKS[task](*torch.randint(0, 10, (2,), generator=g).tolist())
        rows.append({"prompt": prompt, "response": response})
    return rows


def example_files() -> dict[str, Callable[[Path], object]]:
    """What ``write_example`` writes: each name and the function that writes it."""
    files: dict[str, Callable[[Path], object]] = {
        "tiny-llama": make_model,
        "sums.jsonl": lambda p: write_jsonl(p, arithmetic_rows(512, seed=0)),
        "sums-test.jsonl": lambda p: write_jsonl(p, arithmetic_rows(64, seed=1)),
    }
    for i, task in enumerate(TASKS):
        files[f"{task}.jsonl"] = lambda p, t=task, s=i: write_jsonl(p, task_rows(t, 256, seed=s))
        files[f"{task}-test.jsonl"] = lambda p, t=task, s=i: write_jsonl(p, task_rows(t, 32, seed=100 + s))
    files["recipe.yml"] = lambda p: p.write_text(RECIPE)
    return files


def write_example(workdir: str | os.PathLike = ".") -> list[Path]:
    """Write the tiny model, the sums data and the pipeline example (three tasks, ``recipe.yml``) into ``workdir``.

    Args:
        workdir: an existing directory; none of the names of ``example_files()`` may exist in it.

    Returns:
        The paths written, in ``example_files()`` order.

    Raises:
        OutputError: ``workdir`` is not a directory, or one of the names exists (nothing is written then).
    """
    root = Path(workdir)
    if not root.is_dir():
        raise OutputError(f"{root}: not a directory (create it first)")
    files = example_files()
    for name in files:
        if os.path.lexists(root / name):
            raise OutputError(f"{root / name}: already exists; cpift-train example writes only new files "
                              f"(use an empty directory)")
    written = []
    for name, write in files.items():
        # Each file appears complete or not at all: written to a hidden sibling, then renamed.
        tmp = root / f".{name}.cpift-partial"
        if tmp.is_dir():
            shutil.rmtree(tmp)
        write(tmp)
        os.replace(tmp, root / name)
        written.append(root / name)
    return written
