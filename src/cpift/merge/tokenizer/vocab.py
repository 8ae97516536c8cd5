"""The output vocabulary of a mergekit config (``tokenizer_source`` / ``tokenizer.source``), built as
mergekit 0.1.5 builds it (mergekit/tokenizer/build.py), with the ``transformers`` tokenizers it uses:

- every input's tokenizer is loaded with ``AutoTokenizer.from_pretrained(dir)``; base_model's (else the
  first model's) is *stripped*: tokens whose id is >= its config.json ``vocab_size`` are removed (a BPE
  fast tokenizer only, as in mergekit);
- ``base``: the stripped base tokenizer; ``<model>``: that model's tokenizer as it is; ``union``: the
  base tokenizer, plus (``add_tokens``) every other model's ordinary token the base lacks, then every
  model's added token (its first settings win), each token once, in model order: base first, then
  the config's order (mergekit iterates a Python set: its order of the tokens new to the base, and so
  their ids, can change from run to run when two models bring different new tokens);
- then every ``tokenizer.tokens`` key the vocabulary lacks is added as a token;
- the permutation of each model: new id → its id in the model's own vocabulary, -1 where the model lacks
  the token (also where its id is >= its ``vocab_size``: mergekit stops with a KeyError there).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from cpift.errors import ConfigError
from cpift.merge.io.model_files import read_model_json, read_side_files


def transformers_module():
    """``transformers``, imported on first use (building a vocabulary needs it; nothing else does)."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("tokenizer_source / tokenizer / chat_template need the 'transformers' package "
                          "(pip install 'cpift[tokenizer]', or transformers)") from None
    transformers.logging.set_verbosity_error()
    return transformers


def config_vocab_size(model_dir: Path) -> int | None:
    """config.json's ``vocab_size`` (or ``text_config.vocab_size``), as mergekit's get_vocab_size reads it."""
    conf = read_model_json(model_dir, "config.json", error=ConfigError)
    if not isinstance(conf, dict):
        return None
    for c in (conf, conf.get("text_config") or {}):
        v = c.get("vocab_size") if isinstance(c, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def load_tokenizer(model_dir: Path, fld: str):
    tf = transformers_module()
    read_side_files(model_dir)  # transformers follows links: the files are vetted first (merge/io/model_files.py)
    try:
        return tf.AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, KeyError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{fld}: cannot load the tokenizer of {model_dir} ({first})") from None


def stripped_tokenizer(model_dir: Path, fld: str):
    """The tokenizer of ``model_dir`` without the tokens whose id is >= its ``vocab_size``."""
    tf = transformers_module()
    import tokenizers

    tok = load_tokenizer(model_dir, fld)
    size = config_vocab_size(model_dir) or len(tok.get_vocab())
    unused = [t for t, i in tok.get_vocab().items() if i >= size]
    if not unused:
        return tok
    if not tok.is_fast:
        raise ConfigError(f"{fld}: {model_dir} has tokens past vocab_size {size} and no fast tokenizer")
    data = json.loads(tok._tokenizer.to_str())  # noqa: SLF001 (mergekit edits the same JSON)
    if data["model"]["type"] != "BPE":
        raise ConfigError(f"{fld}: {model_dir} has tokens past vocab_size {size} in a "
                          f"{data['model']['type']} tokenizer; only BPE ones can be stripped (as in mergekit)")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    drop = set(unused)
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(m) -> bool:
        parts = m.split(" ") if isinstance(m, str) and m.count(" ") == 1 else m
        if not isinstance(parts, list):
            raise ConfigError(f"{fld}: {model_dir}: unexpected BPE merge {m!r}")
        return not any(p in drop for p in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))  # noqa: SLF001
    del tf
    return tok


def union_tokenizer(base_tok, toks: Mapping[str, Any], sizes: Mapping[str, int | None]):
    """mergekit's build_union_tokenizer: the base tokenizer (a fresh copy) plus every model's tokens."""
    tf = transformers_module()
    out_added: dict[str, Any] = {}
    out_vocab: dict[str, int] = {}
    for key, tok in toks.items():
        size = sizes[key] or tok.vocab_size
        added = tok.added_tokens_decoder
        for t, i in tok.get_vocab().items():
            if i < size:  # added tokens too: mergekit's `tok in added_tokens` tests a str against int keys
                out_vocab.setdefault(t, len(out_vocab))
        for i, info in added.items():
            if i < size and info.content not in out_added:
                out_added[info.content] = info
    with tempfile.TemporaryDirectory() as p:
        base_tok.save_pretrained(p, legacy_format=False, safe_serialization=True)
        res = tf.AutoTokenizer.from_pretrained(p, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


@dataclass
class Vocabulary:
    """The output tokenizer, and per model (by reference) new id → old id (-1: absent)."""

    tokenizer: Any
    vocab: dict[str, int]
    permutations: dict[str, list[int]]
    original_vocabs: dict[str, dict[str, int]]
    notes: list[str] = field(default_factory=list)


def build_vocabulary(base: str, dirs: Mapping[str, Path], source: str, *, source_dir: Path | None = None,
                     add_tokens: Sequence[str] = (), fld: str = "tokenizer_source") -> Vocabulary:
    """Build the output tokenizer and every model's permutation (module docstring).

    Args:
        base: the reference of base_model (else the first model); a key of ``dirs``.
        dirs: every input model, reference → directory, in the config's order.
        source: "base", "union" or a model reference (then ``source_dir`` is its directory).
        add_tokens: the ``tokenizer.tokens`` keys.
    """
    base_tok = stripped_tokenizer(dirs[base], fld)
    toks = {base: base_tok}
    for key, d in dirs.items():
        if key != base:
            toks[key] = load_tokenizer(d, fld)
    sizes = {key: config_vocab_size(d) for key, d in dirs.items()}
    if source == "base":
        out = base_tok
    elif source == "union":
        out = union_tokenizer(base_tok, toks, sizes)
    else:
        out = load_tokenizer(source_dir, fld)
    existing = set(out.get_vocab())
    for t in add_tokens:
        if t not in existing:
            out.add_tokens(t)
            existing.add(t)
    vocab = out.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ConfigError(f"{fld}: the output tokenizer's ids are not 0..{len(vocab) - 1} (holes or repeats); "
                          f"mergekit cannot size the embeddings for it either")
    perms, notes = {}, []
    for key in dirs:
        own = toks[key].get_vocab()
        size = sizes[key] or len(own)
        p = [-1] * len(vocab)
        past = 0
        for t, new in vocab.items():
            old = own.get(t, -1)
            if old >= size:
                past += 1
                old = -1
            p[new] = old
        if past:
            notes.append(f"note: {dirs[key]}: {past} tokens have ids >= its vocab_size {size}; their rows are "
                         f"filled as missing ones (mergekit stops there)")
        perms[key] = p
    return Vocabulary(out, vocab, perms, {k: t.get_vocab() for k, t in toks.items()}, notes)
