"""The tokenizer fields of a mergekit config, parsed and validated (no file read): ``tokenizer_source``,
the ``tokenizer:`` block (``source``, ``tokens``, ``pad_to_multiple_of``) and ``chat_template``, with
mergekit 0.1.5's schema (mergekit/tokenizer/config.py, config.py). Building the vocabulary and remapping
the embedding rows: merge/tokenizer/."""

from __future__ import annotations

from dataclasses import dataclass

from cpift.errors import ConfigError
from cpift.merge.mergekit.values import located
from cpift.merge.tokenizer.rules import TokenRule
from cpift.numbers import parse_number, shown


def _mapping(raw, fld: str, source, what: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{located(source, fld)}: expected {what}, got {raw!r}")
    return raw


@dataclass(frozen=True)
class TokenizerFields:
    """``source`` ("base", "union" or a model reference), the token rules, ``pad_to_multiple_of``."""

    source: str
    tokens: tuple[TokenRule, ...] = ()
    pad_to_multiple_of: int | None = None


def _token_rule(tok: str, raw, source, model_ref) -> TokenRule:
    fld = f"tokenizer.tokens.{tok}"
    raw = _mapping(raw, fld, source, "a mapping with 'source' and/or 'force'")
    for key in raw:
        if key not in ("source", "force"):
            raise ConfigError(f"{located(source, f'{fld}.{key}')}: unknown key (source, force)")
    force = raw.get("force", False)
    if not isinstance(force, bool):
        raise ConfigError(f"{located(source, f'{fld}.force')}: expected true or false, got {force!r}")
    src, sfld = raw.get("source"), f"{fld}.source"
    if src is None:
        return TokenRule(tok, None, force=force, field=located(source, sfld))
    if isinstance(src, str):
        return TokenRule(tok, "model", model_ref(src, sfld, source), force=force, field=located(source, sfld))
    src = _mapping(src, sfld, source, "a model, {kind: zero} or {kind: model_token, model, token}")
    kind = src.get("kind")
    allowed = {"zero": ("kind",), "model_token": ("kind", "model", "token", "token_id")}
    if kind not in allowed:
        raise ConfigError(f"{located(source, f'{sfld}.kind')}: expected 'zero' or 'model_token', got {kind!r}")
    for key in src:
        if key not in allowed[kind]:
            raise ConfigError(f"{located(source, f'{sfld}.{key}')}: unknown key for kind {kind} "
                              f"({', '.join(allowed[kind])})")
    if kind == "zero":
        return TokenRule(tok, "zero", force=force, field=located(source, sfld))
    if "model" not in src:
        raise ConfigError(f"{located(source, f'{sfld}.model')}: missing")
    model = model_ref(src["model"], f"{sfld}.model", source)
    tid, stok = src.get("token_id"), src.get("token")
    if (tid is None) == (stok is None):
        raise ConfigError(f"{located(source, sfld)}: give exactly one of token and token_id")
    if tid is not None and (not isinstance(tid, int) or isinstance(tid, bool)):
        raise ConfigError(f"{located(source, f'{sfld}.token_id')}: expected an integer >= 0, got {shown(tid)}")
    if tid is not None:
        tid = parse_number(tid, located(source, f"{sfld}.token_id"), integer=True, lo=0)
    if stok is not None and not isinstance(stok, str):
        raise ConfigError(f"{located(source, f'{sfld}.token')}: expected a string, got {stok!r}")
    return TokenRule(tok, "model_token", model, tid, stok, force, located(source, sfld))


def tokenizer_fields(data: dict, source, model_ref) -> TokenizerFields | None:
    """The validated tokenizer fields of a config's top-level mapping (None: neither field given)."""
    src = data.get("tokenizer_source")
    tok = data.get("tokenizer")
    if tok is None:
        if src is None:
            return None
        if src in ("base", "union"):
            return TokenizerFields(src)
        return TokenizerFields(model_ref(src, "tokenizer_source", source))
    if src is not None:
        raise ConfigError(f"{located(source, 'tokenizer')}: give tokenizer or tokenizer_source, not both")
    tok = _mapping(tok, "tokenizer", source, "a mapping")
    for key in tok:
        if key not in ("source", "tokens", "pad_to_multiple_of"):
            raise ConfigError(f"{located(source, f'tokenizer.{key}')}: unknown key (source, tokens, "
                              f"pad_to_multiple_of)")
    src = tok.get("source", "union")
    if src is None:
        src = "union"
    if src not in ("base", "union"):
        src = model_ref(src, "tokenizer.source", source)
    tokens = _mapping(tok.get("tokens"), "tokenizer.tokens", source, "a mapping of token -> {source, force}")
    rules = []
    for t, raw in tokens.items():
        if not isinstance(t, str) or not t:
            raise ConfigError(f"{located(source, 'tokenizer.tokens')}: a token must be a non-empty string, "
                              f"got {t!r}")
        rules.append(_token_rule(t, raw, source, model_ref))
    pad = tok.get("pad_to_multiple_of")
    if pad is not None:  # rows are padded up to a multiple: beyond 2^20 it is no padding but a blow-up
        if isinstance(pad, bool) or not isinstance(pad, int):
            raise ConfigError(f"{located(source, 'tokenizer.pad_to_multiple_of')}: expected an integer >= 1, "
                              f"got {shown(pad)}")
        pad = parse_number(pad, located(source, "tokenizer.pad_to_multiple_of"), integer=True, lo=1, hi=2**20)
    return TokenizerFields(src, tuple(rules), pad)


def parse_tokenizer_source(data: dict, source, model_ref) -> str | None:
    """``tokenizer_source`` / ``tokenizer.source`` as MergeConfig keeps it: None, "base", "union" or a
    model reference; the whole block is validated (tokenizer_fields)."""
    fields = tokenizer_fields(data, source, model_ref)
    return None if fields is None else fields.source


def parse_chat_template(value, source) -> str | None:
    """``chat_template``: "auto", a built-in name mergekit ships, or a Jinja template (mergekit's test:
    a name is under 256 characters with no newline or ``{``; anything else under 20 characters or
    without ``{`` is refused)."""
    from cpift.merge.tokenizer.template import BUILTIN_TEMPLATES

    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{located(source, 'chat_template')}: expected 'auto', a template name "
                          f"({', '.join(BUILTIN_TEMPLATES)}) or a Jinja template string, got {value!r}")
    if value == "auto" or value in BUILTIN_TEMPLATES:
        return value
    if len(value) < 20 or "{" not in value:
        raise ConfigError(f"{located(source, 'chat_template')}: {value!r} is neither 'auto', a built-in "
                          f"template ({', '.join(BUILTIN_TEMPLATES)}) nor a Jinja template")
    return value
