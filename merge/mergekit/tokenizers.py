"""The tokenizer of a mergekit config: ``tokenizer_source`` / ``tokenizer:`` (parsed here) and the check
that copying one model's tokenizer is exact (every vocabulary the same, of config.json's vocab_size)."""

from __future__ import annotations

from pathlib import Path

from cpift.errors import ConfigError
from cpift.merge.io.safe_parse import load_json_bounded
from cpift.merge.mergekit.values import located


def _mapping(raw, fld: str, source, what: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{located(source, fld)}: expected {what}, got {raw!r}")
    return raw


def parse_tokenizer_source(data: dict, source, model_ref) -> str | None:
    src = data.get("tokenizer_source")
    tok = data.get("tokenizer")
    fld = "tokenizer_source"
    if tok is not None:
        if src is not None:
            raise ConfigError(f"{located(source, 'tokenizer')}: give tokenizer or tokenizer_source, not both")
        tok = _mapping(tok, "tokenizer", source, "a mapping")
        for key in tok:
            if key == "source":
                continue
            if key in ("tokens", "pad_to_multiple_of"):
                if tok[key] is not None:
                    raise ConfigError(f"{located(source, f'tokenizer.{key}')}: not supported (cpift does not "
                                      f"edit vocabularies or embeddings)")
                continue
            raise ConfigError(f"{located(source, f'tokenizer.{key}')}: unknown key")
        src, fld = tok.get("source", "union"), "tokenizer.source"
    if src is None:
        return None
    if src == "union":
        raise ConfigError(f"{located(source, fld)}: 'union' builds a new vocabulary and remaps embeddings, "
                          f"which cpift does not do; use 'base', a model path, or leave it out")
    if src == "base":
        return "base"
    return model_ref(src, fld, source)


def _vocabulary(model_dir: Path) -> dict[str, int] | None:
    """token → id of a fast tokenizer (tokenizer.json: model vocab plus added tokens), None if absent."""
    f = model_dir / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        data = load_json_bounded(f.read_bytes(), source=f)
        vocab = data["model"]["vocab"]
        out = (dict(vocab) if isinstance(vocab, dict)
               else {entry[0]: i for i, entry in enumerate(vocab)})
        for tok in data.get("added_tokens") or []:
            out[tok["content"]] = tok["id"]
        return out
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        raise ConfigError(f"{f}: not a readable tokenizer.json") from None


def check_tokenizer(cfg, tok_dir: Path, dirs: list[Path], conf: dict) -> None:
    """tokenizer_source is exact in cpift only when mergekit's vocabulary remapping is the identity."""
    fld = f"{cfg.source}: tokenizer_source"
    ref = _vocabulary(tok_dir)
    if ref is None:
        raise ConfigError(f"{fld}: {tok_dir} has no tokenizer.json, so cpift cannot check that every model "
                          f"shares its vocabulary (mergekit would remap embeddings); leave tokenizer_source "
                          f"out to copy the tokenizer of base_model")
    for d in dirs:
        voc = _vocabulary(d)
        if voc is None:
            raise ConfigError(f"{fld}: {d} has no tokenizer.json, so cpift cannot check its vocabulary "
                              f"against {tok_dir}'s; leave tokenizer_source out")
        if voc != ref:
            raise ConfigError(f"{fld}: {d} and {tok_dir} have different vocabularies; mergekit would remap "
                              f"the embedding rows, which cpift does not do")
    size = conf.get("vocab_size", (conf.get("text_config") or {}).get("vocab_size"))
    if size != len(ref) or max(ref.values(), default=-1) >= len(ref):
        raise ConfigError(f"{fld}: the tokenizer has {len(ref)} tokens but the embeddings have {size} rows; "
                          f"mergekit would resize them to the tokenizer, which cpift does not do; leave "
                          f"tokenizer_source out")
