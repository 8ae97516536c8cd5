"""``chat_template`` of a mergekit config, resolved as mergekit 0.1.5's ``_set_chat_template`` does
(mergekit/merge.py): ``auto`` takes the most common template among the inputs' tokenizers (a dict's
``default``; stripped; none found: the output keeps its tokenizer's own); a built-in name
(builtin_templates.py, mergekit's files byte for byte) its text; any other string is the template."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

from cpift.merge.tokenizer.builtin_templates import BUILTIN_TEMPLATES

__all__ = ["BUILTIN_TEMPLATES", "resolve_chat_template"]


def resolve_chat_template(value: str | None, model_dirs: Sequence[Path]) -> str | None:
    """The template text to set on the output tokenizer, or None to leave it as it is.

    Args:
        value: the config's ``chat_template`` (validated by mergekit/tokenizers.parse_chat_template).
        model_dirs: every input model, in the config's order (for ``auto``).
    """
    if not value:
        return None
    if value == "auto":
        from cpift.merge.tokenizer.vocab import load_tokenizer

        found = []
        for d in model_dirs:
            template = load_tokenizer(d, "chat_template").chat_template
            if isinstance(template, dict):
                template = template.get("default", None)
            if template:
                found.append(template.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value and value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    return value
