"""A ``tokenizer.tokens`` entry of a mergekit config, validated (merge/mergekit/tokenizers.py builds it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenRule:
    """Where token ``token``'s default row comes from: kind None (mergekit's automatic choice), "model"
    (``model``'s row of the token), "zero", or "model_token" (``model``'s row of ``token_id`` or of
    ``src_token``); ``force``: every model takes the default row, even one that has the token."""

    token: str
    kind: str | None
    model: str | None = None
    token_id: int | None = None
    src_token: str | None = None
    force: bool = False
    field: str = "tokenizer.tokens"
