"""A config's tokenizer, made ready before the merge runs (run.py calls ``prepare_tokenizer``):

- the output tokenizer (vocab.py) and chat template (template.py) saved with ``save_pretrained`` into a
  fresh side directory, with config.json and generation_config.json of the config donor (base_model, else
  the first model); the engine copies that directory's files into the output (``copy_tokenizer_from``),
  and config.json's ``vocab_size`` becomes the output's row count (``config_updates``), as mergekit's does;
- ``wrap``: every model argument opened and seen through a RemappedCheckpoint (rows.py), unless every
  model's remapping is the identity (then the models are read as they are, zero-copy).

``chat_template`` without a tokenizer field: the donor's tokenizer re-saved with the template, as
mergekit's ``_copy_tokenizer`` falls back to.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from cpift.errors import ConfigError
from cpift.merge.io.model_files import read_model_file
from cpift.merge.tokenizer.rules import TokenRule
from cpift.merge.tokenizer.template import resolve_chat_template

SIDE = ("config.json", "generation_config.json")


@dataclass
class TokenizerSetup:
    """The side directory to copy into the output, the config.json keys to set, and the model views."""

    side_dir: Path
    config_updates: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    vocabulary: Any = None  # vocab.Vocabulary
    rules: tuple[TokenRule, ...] = ()
    pad_to_multiple_of: int | None = None
    dtype: Any = None  # torch.dtype: the config's dtype
    base: str | None = None

    def wrap(self, models: Mapping[str, Any]) -> dict[str, Any]:
        """Model reference → model argument (a path, a Hub id, BASE+ADAPTER), each opened and remapped."""
        v = self.vocabulary
        if v is None:
            return dict(models)
        import torch

        from cpift.merge.io.models import open_models
        from cpift.merge.tokenizer.rows import RemappedCheckpoint, RowPlan, is_vocab_tensor

        keys = list(models)
        ckpts = dict(zip(keys, open_models([models[k] for k in keys])))
        dtype = self.dtype
        if dtype is None:
            for c in ckpts.values():
                for n, info in c.tensors.items():
                    if is_vocab_tensor(n):
                        dtype = info.dtype if dtype is None else torch.promote_types(dtype, info.dtype)
        if dtype is None:  # no vocabulary tensor: nothing to remap
            return ckpts
        rules = {r.token: r for r in self.rules}
        plan = RowPlan(v.vocab, v.permutations, keys, self.base, rules, v.original_vocabs,
                       pad_to_multiple_of=self.pad_to_multiple_of, dtype=dtype)
        identity = list(range(plan.n))
        if not plan.defaults and all(v.permutations[k] == identity for k in keys) and all(
                info.shape[0] == plan.rows for c in ckpts.values() for n, info in c.tensors.items()
                if is_vocab_tensor(n)):
            return ckpts
        views: dict[str, RemappedCheckpoint] = {}
        return {k: RemappedCheckpoint(c, k, plan, views) for k, c in ckpts.items()}

    def remaps_rows(self) -> bool:
        """Whether some model's embedding rows would move (another vocabulary, added tokens, padding)."""
        v = self.vocabulary
        if v is None:
            return False
        identity = list(range(len(v.vocab)))
        return bool(self.rules or self.pad_to_multiple_of or any(p != identity for p in v.permutations.values()))

    def cleanup(self) -> None:
        shutil.rmtree(self.side_dir, ignore_errors=True)


def tokenizer_setup(cfg, paths: Mapping[str, Path], donor: Path,
                    resolve: Callable[[str, str], Path]) -> TokenizerSetup | None:
    """The TokenizerSetup of a config run (None when it has no tokenizer field and no chat_template)."""
    from cpift.merge.mergekit.tokenizers import parse_chat_template, tokenizer_fields

    fields = tokenizer_fields(cfg.raw, cfg.source, lambda ref, _fld, _src: ref)
    chat = parse_chat_template(cfg.raw.get("chat_template"), cfg.source)
    if fields is None and chat is None:
        return None
    setup = prepare_tokenizer(cfg, fields, chat, paths, donor, resolve)
    if cfg.stack and setup.remaps_rows():
        raise ConfigError(f"{cfg.source}: tokenizer_source: remapping the embedding rows of a passthrough "
                          f"stack is not supported yet (every model's vocabulary must be the output's)")
    return setup


def prepare_tokenizer(cfg, fields, chat_template: str | None, paths: Mapping[str, Path], donor: Path,
                      resolve: Callable[[str, str], Path]) -> TokenizerSetup:
    """Build the output tokenizer of ``cfg`` (module docstring).

    Args:
        cfg: the MergeConfig; fields: its TokenizerFields (None: chat_template only).
        paths: every model reference → its directory, in the config's order (base_model first if unlisted).
        donor: the directory config.json comes from (base_model, else the first model).
        resolve: ``resolve(ref, field)`` → directory, for a tokenizer source that is not a merged model.
    """
    from cpift.merge.tokenizer.vocab import load_tokenizer

    src = cfg.source
    order = [r for r in dict.fromkeys([*(m.model for m in cfg.models), *([cfg.base_model] if cfg.base_model
                                                                         else [])])]
    dirs = {r: paths[r] for r in order}
    side = Path(tempfile.mkdtemp(prefix="cpift-tokenizer-"))
    setup = TokenizerSetup(side)
    weakref.finalize(setup, shutil.rmtree, side, ignore_errors=True)  # removed once the run is over
    (side / ".cpift-tokenizer").write_text("")  # the card names this donor by what it is (merge/card.py)
    try:
        tok = (load_tokenizer(donor, f"{src}: chat_template") if fields is None
               else _vocabulary(cfg, fields, paths, dirs, resolve, setup))
        _write_side(tok, side, donor, resolve_chat_template(chat_template, list(dirs.values())))
    except BaseException:
        setup.cleanup()
        raise
    return setup


def _vocabulary(cfg, fields, paths: Mapping[str, Path], dirs: Mapping[str, Path], resolve: Callable[[str, str], Path],
                setup: TokenizerSetup) -> Any:
    """Build the output vocabulary into ``setup`` (rows, rules, dtype, vocab_size); its tokenizer."""
    from cpift.merge.engine import parse_dtype
    from cpift.merge.tokenizer.vocab import build_vocabulary

    src = cfg.source
    base = cfg.base_model if cfg.base_model is not None else cfg.models[0].model
    fld = f"{src}: tokenizer_source" if "tokenizer" not in cfg.raw else f"{src}: tokenizer.source"
    source_dir = None
    if fields.source not in ("base", "union"):
        source_dir = paths.get(fields.source) or resolve(fields.source, fld.split(": ")[-1])
    rules = tuple(_key_rule(r, dirs, resolve) for r in fields.tokens)
    vocab = build_vocabulary(base, {base: dirs[base], **dirs}, fields.source, source_dir=source_dir,
                             add_tokens=[r.token for r in rules], fld=fld)
    setup.vocabulary, setup.rules, setup.base = vocab, rules, cfg.base_model
    setup.pad_to_multiple_of = fields.pad_to_multiple_of
    setup.notes += vocab.notes
    setup.dtype = parse_dtype(cfg.dtype, "dtype")
    n = len(vocab.vocab)
    m = fields.pad_to_multiple_of
    setup.config_updates["vocab_size"] = (n // m + 1) * m if m and n % m else n
    return vocab.tokenizer


def _write_side(tok, side: Path, donor: Path, template: str | None) -> None:
    """The tokenizer (with the chat template, if one is set) and the donor's other side files, into ``side``."""
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(str(side), safe_serialization=True)
    for name in SIDE:
        data = read_model_file(donor, name)  # vetted: no link out of the donor, no FIFO
        if data is not None:
            (side / name).write_bytes(data)


def _key_rule(rule: TokenRule, dirs: Mapping[str, Path], resolve) -> TokenRule:
    """A token rule whose model is named as one of the merged models' references."""
    if rule.model is None or rule.model in dirs:
        return rule
    fld = rule.field.split(": ", 1)[-1]
    where = resolve(rule.model, fld + (".model" if rule.kind == "model_token" else ""))
    for ref, d in dirs.items():
        if Path(d) == Path(where):
            return TokenRule(rule.token, rule.kind, ref, rule.token_id, rule.src_token, rule.force, rule.field)
    raise ConfigError(f"{rule.field}: '{rule.model}' is not one of the merged models (mergekit needs its "
                      f"embedding rows)")
