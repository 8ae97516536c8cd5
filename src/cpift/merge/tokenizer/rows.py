"""The embedding and LM-head rows of every input, remapped onto the output vocabulary as mergekit 0.1.5
does (mergekit/tokenizer/embed.py, PermutedVocabulary), seen through a Checkpoint view.

For an output token t (id i) and a model m: row i of m is m's own row of t when m has t and t is not
``force``d; otherwise the token's *default row*, the same for every model:

- ``tokenizer.tokens`` gives its source: a model (that model's row of t), ``{kind: zero}`` (zeros),
  ``{kind: model_token, model, token | token_id}`` (that model's row of that token or id);
- else, t in exactly one model: that model's row; in none: zeros; in base_model: the base's row;
  else the mean of the rows of the models holding t (summed in model order, then divided, in the
  tensor's dtype, as mergekit does).

With ``pad_to_multiple_of`` the rows past the vocabulary up to the next multiple are each model's mean
over its first len(vocab) remapped rows. Rows are built in the dtype mergekit builds them in (the config's
``dtype``, else the promoted dtype of the inputs) and merged by the method like any tensor. Tensors
remapped: those named ``*embed_tokens.weight``, ``*lm_head.weight``, ``*wte.weight``, ``*embed_out.weight``
(mergekit's vocabulary weights of Llama, Mistral, Qwen2, Gemma, GPT-2, GPT-NeoX), vocabulary axis 0.
Memory: one output tensor per model per name, filled ``BLOCK`` rows at a time from the read-only map
(the source is never converted whole), plus the default rows (only tokens some model lacks or forced).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Mapping, Sequence

import torch

from cpift.errors import ConfigError
from cpift.merge.io.checkpoint import Checkpoint
from cpift.merge.tokenizer.rules import TokenRule

VOCAB_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_out.weight")
BLOCK = 4096  # rows gathered at a time


def is_vocab_tensor(name: str) -> bool:
    return name.endswith(VOCAB_SUFFIXES)


def padded_size(n: int, multiple: int | None) -> int:
    return (n // multiple + 1) * multiple if multiple and n % multiple else n


class RowPlan:
    """What every output row of every model is (module docstring); shared by the models' views."""

    def __init__(self, vocab: Mapping[str, int], perms: Mapping[str, Sequence[int]], models: Sequence[str],
                 base: str | None, rules: Mapping[str, TokenRule], original: Mapping[str, Mapping[str, int]],
                 *, pad_to_multiple_of: int | None, dtype: torch.dtype):
        self.n = len(vocab)
        self.rows = padded_size(self.n, pad_to_multiple_of)
        self.models = list(models)
        self.dtype = dtype
        forced = torch.zeros(self.n, dtype=torch.bool)
        for t, r in rules.items():
            if r.force:
                forced[vocab[t]] = True
        self.idx = {m: torch.tensor(list(perms[m]), dtype=torch.long) for m in self.models}
        self.own = {m: (self.idx[m] >= 0) & ~forced for m in self.models}
        # default rows: (output id, source) for tokens forced or missing from some model
        self.defaults: list[tuple[int, tuple]] = []
        for t, i in vocab.items():
            present = [m for m in self.models if perms[m][i] >= 0]
            r = rules.get(t)
            if not (r is not None and r.force) and len(present) == len(self.models):
                continue
            self.defaults.append((i, self._source(t, i, r, present, perms, base, original)))
        self._cache: dict[str, list] = {}
        self._lock = threading.Lock()

    def _source(self, t, i, r, present, perms, base, original) -> tuple:
        if r is None:
            if len(present) == 1:
                return ("row", present[0], perms[present[0]][i])
            if not present:
                return ("zero",)
            if base in self.models and perms[base][i] >= 0:
                return ("row", base, perms[base][i])
            return ("mean", tuple(present))
        if r.kind == "zero":
            return ("zero",)
        if r.model not in self.models:
            raise ConfigError(f"{r.field}.model: '{r.model}' is not one of the merged models (mergekit needs "
                              f"its embedding rows)")
        if r.kind == "model_token":
            if r.token_id is not None:
                return ("row", r.model, r.token_id)
            src = original[r.model].get(r.src_token)
            if src is None:
                raise ConfigError(f"{r.field}.token: {r.src_token!r} is not in the vocabulary of '{r.model}'")
            return ("row", r.model, src)
        if perms[r.model][i] < 0:
            raise ConfigError(f"{r.field}: token {t!r} is not in the vocabulary of its source '{r.model}'")
        return ("row", r.model, perms[r.model][i])

    def _default_rows(self, name: str, srcs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The default rows of ``name``, in ``self.defaults`` order, in ``self.dtype``."""
        shape = next(iter(srcs.values())).shape[1:]
        out = torch.zeros((len(self.defaults), *shape), dtype=self.dtype)
        means: dict[int, list[int]] = {}
        for k, (_, s) in enumerate(self.defaults):
            if s[0] == "row":
                src = srcs[s[1]]
                if not 0 <= s[2] < src.shape[0]:
                    raise ConfigError(f"tokenizer.tokens: token id {s[2]} is out of range for '{s[1]}' "
                                      f"(tensor '{name}' has {src.shape[0]} rows)")
                out[k] = src[s[2]].to(self.dtype)
            elif s[0] == "mean":
                means.setdefault(len(s[1]), []).append(k)
        for m in self.models:  # zeros + row + row ..., in model order (mergekit's sum), then / count
            ks = [k for k, (_, s) in enumerate(self.defaults) if s[0] == "mean" and m in s[1]]
            if ks:
                rows = self.idx[m][[self.defaults[k][0] for k in ks]]
                out[ks] = out[ks] + srcs[m].index_select(0, rows).to(self.dtype)
        for count, ks in means.items():
            out[ks] = out[ks] / count
        return out

    def tensor(self, model: str, name: str, srcs: Mapping[str, Checkpoint]) -> torch.Tensor:
        """Model ``model``'s remapped ``name`` (a new tensor of ``self.rows`` rows)."""
        with self._lock:
            entry = self._cache.get(name)
            if entry is None:
                views = {m: srcs[m].inner.get(name) for m in self.models}
                entry = self._cache[name] = [self._default_rows(name, views), set(self.models)]
            defaults, waiting = entry
            waiting.discard(model)
            if not waiting:
                del self._cache[name]
        src = srcs[model].inner.get(name)
        idx, own = self.idx[model], self.own[model]
        if self.n and int(idx.max()) >= src.shape[0]:
            raise ConfigError(f"tokenizer_source: tensor '{name}' of {srcs[model].path} has {src.shape[0]} "
                              f"rows, but its tokenizer has id {int(idx.max())} below its vocab_size")
        out = torch.zeros((self.rows, *src.shape[1:]), dtype=self.dtype)
        for b in range(0, self.n, BLOCK):
            sel = own[b:b + BLOCK]
            if bool(sel.any()):
                rows = torch.nonzero(sel).flatten()
                out[b + rows] = src.index_select(0, idx[b + rows]).to(self.dtype)
        fill = [k for k, (i, _) in enumerate(self.defaults) if not bool(own[i])]  # rows the model lacks
        if fill:
            out[[self.defaults[k][0] for k in fill]] = defaults[fill]
        if self.rows > self.n:
            out[self.n:] = torch.mean(out[:self.n], dim=0)
        return out


class RemappedCheckpoint(Checkpoint):
    """A model seen with its vocabulary tensors remapped by a RowPlan (every other tensor as it is)."""

    def __init__(self, inner: Checkpoint, key: str, plan: RowPlan, views: dict[str, RemappedCheckpoint]):
        self.inner, self.key, self.plan, self._views = inner, key, plan, views
        self.path, self.dir, self.ref, self.notes = inner.path, inner.dir, inner.ref, inner.notes
        self.index_name, self._bin = inner.index_name, None
        self._lock, self._maps = inner._lock, inner._maps  # the inner files' maps, shared with the prefetch thread
        for attr in ("adapter_dir", "base_ref"):  # an AdaptedCheckpoint, for the card
            if hasattr(inner, attr):
                setattr(self, attr, getattr(inner, attr))
        self.remapped = {n for n, i in inner.tensors.items() if is_vocab_tensor(n) and len(i.shape) >= 1}
        self.tensors = dict(inner.tensors)
        for n in self.remapped:
            info = inner.tensors[n]
            shape = (plan.rows, *info.shape[1:])
            numel = 1
            for d in shape:
                numel *= d
            self.tensors[n] = dataclasses.replace(info, dtype=plan.dtype, shape=shape,
                                                  end=info.begin + numel * plan.dtype.itemsize)
        views[key] = self

    def names(self) -> list[str]:
        return self.inner.names()

    def get(self, name: str) -> torch.Tensor:
        if name in self.remapped:
            return self.plan.tensor(self.key, name, self._views)
        return self.inner.get(name)

    def populate(self, name: str) -> None:
        self.inner.populate(name)

    def release(self, name: str) -> None:
        self.inner.release(name)

    def input_paths(self):
        return self.inner.input_paths()

    def close(self) -> None:
        self.inner.close()
