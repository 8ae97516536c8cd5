"""The seesaw benchmark's base model: a small Llama-shaped char-level LM, pre-trained briefly on local text.

Pre-training data is a generic mixture read from this machine (docstrings of the Python standard library)
plus generated arithmetic and short sentences, so that fine-tuning starts from a model that already
knows characters, words and digits. The model is written as a Hugging Face directory (safetensors, a
char tokenizer) that `cpift-train pipeline` loads like any other; it is cached by its settings.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import random
import string
import time
from pathlib import Path

import torch

# printable ASCII without the rare vertical whitespace: every task's text stays in this alphabet
CHARS = [c for c in string.printable if c not in "\r\x0b\x0c"]
STDLIB_MODULES = ("string", "json", "collections", "os", "re", "random", "textwrap", "functools", "itertools",
                  "pathlib", "statistics", "fractions", "heapq", "bisect", "shutil", "csv", "datetime", "math")


def make_tokenizer():
    """One token per character; <eos> ends every response (the pipeline's data appends it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<eos>"] + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def corpus(seed: int = 0) -> str:
    """Generic text: stdlib docstrings, then generated sums, sentences and repeated new words (a third)."""
    docs = []
    for name in STDLIB_MODULES:
        mod = importlib.import_module(name)
        for obj in [mod, *(getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_"))]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 40:
                docs.append(" ".join(doc.split()))
    text = "\n".join(dict.fromkeys(docs))  # dedupe, keep order
    rng = random.Random(seed)
    nouns = ["cat", "tree", "river", "book", "city", "robot", "apple", "friend", "house", "song"]
    verbs = ["sees", "likes", "finds", "moves", "reads", "builds", "paints", "follows"]
    gen = []
    for _ in range(len(text) // 40):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 6)))
        # copying a new word is what a real LM's pre-training gives (induction); docstrings alone teach too little
        gen.append(rng.choice([f"{a} + {b} = {a + b}.", f"{a} - {b} = {a - b}.",
                               f"The {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)}.",
                               f"The word {w} is {w}.", f"Say {w}: {w}."]))
    return text + "\n" + " ".join(gen)


def base_settings(scale: str) -> dict:
    if scale == "ci":
        return {"hidden": 64, "layers": 2, "steps": 60, "batch": 16, "seq": 64, "lr": 3e-3}
    return {"hidden": 128, "layers": 2, "steps": 500, "batch": 32, "seq": 64, "lr": 3e-3}


def pretrain(work: Path, scale: str, log=print) -> Path:
    """Build and pre-train the base (cached in WORK/base-HASH); returns its directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = base_settings(scale)
    text = corpus()
    key = json.dumps(cfg, sort_keys=True) + hashlib.sha1(text.encode()).hexdigest()  # settings and data
    out = work / f"base-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if out.exists():
        log(f"base: cached {out}")
        return out
    tokenizer = make_tokenizer()
    h = cfg["hidden"]
    config = LlamaConfig(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=cfg["layers"],
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tokenizer),
                         max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    start, steps, seq = time.perf_counter(), cfg["steps"], cfg["seq"]
    for step in range(steps):
        for group in opt.param_groups:  # short warm-up, then cosine to zero
            group["lr"] = cfg["lr"] * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        at = torch.randint(0, len(ids) - seq - 1, (cfg["batch"],), generator=g)
        batch = torch.stack([ids[i:i + seq] for i in at.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"base: step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    tmp = work / f".{out.name}.partial"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(json.dumps({**cfg, "final_loss": loss.item(), "corpus_tokens": len(ids),
                                                   "seconds": time.perf_counter() - start}, indent=2) + "\n")
    tmp.rename(out)
    return out
