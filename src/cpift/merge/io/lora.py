"""LoRA / PEFT adapter inputs: a base checkpoint seen with an adapter merged in, tensor by tensor.

A model argument ``BASE+ADAPTER`` (mergekit's ``ModelReference`` spelling: one ``+``), or a PEFT
adapter directory alone (its base is ``base_model_name_or_path`` in adapter_config.json), opens as
an ``AdaptedCheckpoint``: the base's tensors, where each tensor the adapter targets is returned as

    W' = W + scale · (B @ A)          (transposed when fan_in_fan_out; always for embeddings)
    scale = lora_alpha / r            (lora_alpha / sqrt(r) with use_rslora; rank_pattern and
                                       alpha_pattern override r and alpha per module, as in PEFT)

computed in float32 (float64 for a float64 base) and cast once to the base tensor's dtype. A plain
adapter tensor (modules_to_save, saved embeddings) replaces the base tensor of that name. PEFT's key
format ``base_model.model.<module>.lora_A.weight`` maps to the base's ``<module>.weight``. Only the
current tensor's A and B are read (zero-copy views of adapter_model.safetensors, or of
adapter_model.bin read by the Checkpoint reader, merge/io/bin_shards.py), so memory stays bounded.
Everything is validated when the input is opened (before any output is written): unsupported
adapter types (DoRA, non-LoRA PEFT types, ...) and shape mismatches are one-line errors naming
adapter_config.json or the adapter file and the field or tensor.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from cpift.errors import CheckpointError
from cpift.merge.io.checkpoint import Checkpoint
from cpift.merge.io.fp8 import FP8, dequantized
from cpift.merge.io.model_files import read_model_file
from cpift.merge.io.refs import ADAPTER_CONFIG, is_adapter_dir, split_lora_ref
from cpift.merge.io.safe_parse import load_json_bounded
from cpift.numbers import F32_MAX, parse_number, shown

__all__ = ["ADAPTER_CONFIG", "AdaptedCheckpoint", "is_adapter_dir", "split_lora_ref"]

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# Config fields whose non-default value changes the merge in a way cpift does not implement.
REFUSED = {"use_dora": (False, None), "lora_bias": (False, None), "layer_replication": (None, []),
           "trainable_token_indices": (None, {}, []), "target_parameters": (None, []),
           "alora_invocation_tokens": (None,), "arrow_config": (None,)}
_FACTOR = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight|(?P<emb>.+)\.(?P<ekind>lora_embedding_[AB])")


def read_adapter_config(adapter: Path) -> dict:
    """adapter_config.json, validated: a LoRA without DoRA or other variants cpift does not merge."""
    file = adapter / ADAPTER_CONFIG
    raw = read_model_file(adapter, ADAPTER_CONFIG)
    if raw is None:
        raise CheckpointError(f"{adapter}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    cfg = load_json_bounded(raw, source=file, error=CheckpointError)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{file}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA adapters "
                              f"are merged)")
    for key, defaults in REFUSED.items():
        if cfg.get(key) not in defaults:
            raise CheckpointError(f"{file}: {key}: {cfg[key]!r} is not supported (cpift merges plain LoRA "
                                  f"adapters only; merge this one with peft's merge_and_unload first)")
    cfg["r"] = _rank(cfg.get("r"), f"{file}: r")
    cfg["lora_alpha"] = _alpha(cfg.get("lora_alpha"), f"{file}: lora_alpha")
    for key, check in (("rank_pattern", _rank), ("alpha_pattern", _alpha)):
        patterns = cfg.get(key) or {}
        if not isinstance(patterns, dict):
            raise CheckpointError(f"{file}: {key}: expected an object of module pattern -> number")
        for pattern, v in patterns.items():
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except re.error as e:
                raise CheckpointError(f"{file}: {key}: {shown(pattern)} is not a regular expression ({e})") from None
            patterns[pattern] = check(v, f"{file}: {key}[{shown(pattern)}]")
        cfg[key] = patterns
    return cfg


def _rank(v, field: str) -> int:
    """A LoRA rank: a JSON integer ≥ 1 (bounded: it is a matrix dimension)."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise CheckpointError(f"{field}: expected an integer ≥ 1, got {shown(v)}")
    return parse_number(v, field, integer=True, lo=1, hi=2**31, error=CheckpointError)


def _alpha(v, field: str) -> float:
    """A LoRA alpha: a positive finite JSON number."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise CheckpointError(f"{field}: expected a positive number, got {shown(v)}")
    return parse_number(v, field, lo=0, lo_open=True, hi=F32_MAX, error=CheckpointError)


def _pattern(patterns: dict, module: str, default: float) -> float:
    """PEFT's get_pattern_key: the first pattern that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _load_adapter_tensors(adapter: Path) -> tuple[Path, Checkpoint]:
    """The adapter weights file and a Checkpoint reading it (safetensors, or .bin through bin_shards)."""
    for file in (adapter / n for n in ADAPTER_FILES):
        if file.is_file():
            return file, Checkpoint(file)
    raise CheckpointError(f"{adapter}: no {' or '.join(ADAPTER_FILES)} next to {ADAPTER_CONFIG}")


class AdaptedCheckpoint(Checkpoint):
    """A base checkpoint with a PEFT LoRA adapter merged in on read (module docstring).

    Args:
        base: the base model directory (or .safetensors file).
        adapter: the adapter directory (adapter_config.json + adapter_model.safetensors / .bin).
        ref: the model argument as given (``BASE+ADAPTER``), for the card.

    Raises:
        CheckpointError: the base or adapter is unreadable, the adapter type unsupported, or a
            factor targets a tensor the base lacks or does not fit its shape.
    """

    def __init__(self, base: str | os.PathLike, adapter: str | os.PathLike, *, ref: str | None = None):
        super().__init__(base, ref=ref)
        self.base_ref = split_lora_ref(self.ref)[0] if split_lora_ref(self.ref) else os.fspath(base)
        self.adapter_dir = Path(adapter)
        cfg = read_adapter_config(self.adapter_dir)
        self.adapter_file, self._adapter = _load_adapter_tensors(self.adapter_dir)
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        self._lora: dict[str, tuple[str, str, float, bool]] = {}  # base name -> (A key, B key, scale, transpose)
        self._replace: dict[str, str] = {}  # base name -> adapter key
        self._plan(cfg)
        self.notes.append(f"note: {self.path} read with the LoRA adapter {self.adapter_dir} merged in "
                          f"({len(self._lora)} tensors adapted, {len(self._replace)} replaced)")

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._adapter.info(key).shape)

    def _plan(self, cfg: dict) -> None:
        where = self.adapter_file
        keys = list(self._adapter.tensors)
        factors: dict[str, dict[str, str]] = {}
        for key in keys:
            if not key.startswith(PREFIX):
                raise CheckpointError(f"{where}: tensor '{key}' does not start with '{PREFIX}' (not PEFT's key format)")
            name = key[len(PREFIX):]
            m = _FACTOR.fullmatch(name)
            if m is None:
                if "lora_" in name:
                    raise CheckpointError(f"{where}: tensor '{key}' is not a LoRA factor cpift can merge "
                                          f"(expected <module>.lora_A.weight / lora_B.weight)")
                self._replace[name] = key
                continue
            module = m["module"] or m["emb"]
            kind = (m["kind"] or m["ekind"])[-1]  # "A" or "B"
            factors.setdefault(module, {})[kind] = key
            factors[module]["emb"] = "1" if m["emb"] else ""
        for name, key in self._replace.items():
            if name not in self.tensors:
                raise CheckpointError(f"{where}: tensor '{key}' replaces '{name}', which {self.path} lacks")
            if self._shape(key) != tuple(self.tensors[name].shape):
                raise CheckpointError(f"{where}: tensor '{key}' has shape {list(self._shape(key))} but "
                                      f"'{name}' in {self.path} has {list(self.tensors[name].shape)}")
        for module, f in factors.items():
            if "A" not in f or "B" not in f:
                raise CheckpointError(f"{where}: module '{module}' has lora_{'B' if 'A' in f else 'A'} "
                                      f"but not lora_{'A' if 'A' in f else 'B'}")
            target = f"{module}.weight"
            if target not in self.tensors:
                raise CheckpointError(f"{where}: tensor '{f['A']}' targets '{target}', which {self.path} lacks")
            r = _pattern(cfg.get("rank_pattern") or {}, module, cfg["r"])
            alpha = _pattern(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
            a, b = self._shape(f["A"]), self._shape(f["B"])
            transpose = bool(f["emb"]) or self.fan_in_fan_out
            w = tuple(self.tensors[target].shape)
            want = (w[1], w[0]) if transpose and len(w) == 2 else w
            if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r or (b[0], a[1]) != want:
                raise CheckpointError(f"{where}: tensors '{f['B']}' {list(b)} @ '{f['A']}' {list(a)} do not fit "
                                      f"'{target}' {list(w)} with r = {r} ({ADAPTER_CONFIG}"
                                      f"{', fan_in_fan_out' if self.fan_in_fan_out else ''})")
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            self._lora[target] = (f["A"], f["B"], scale, transpose)

    def get(self, name: str) -> torch.Tensor:
        """The base tensor with the adapter applied (a new tensor), or the base's zero-copy view."""
        if name in self._replace:
            return self._adapter.get(self._replace[name]).to(self.tensors[name].dtype)
        if name not in self._lora:
            return super().get(name)
        a_key, b_key, scale, transpose = self._lora[name]
        w = super().get(name)
        math_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        delta = self._adapter.get(b_key).to(math_dtype) @ self._adapter.get(a_key).to(math_dtype)
        if transpose:
            delta = delta.T
        delta = delta * scale
        out = w.to(math_dtype, copy=True)
        out += delta
        return out.to(w.dtype)

    def input_paths(self) -> list[Path]:
        return [*super().input_paths(), self.adapter_dir, self.adapter_dir / ADAPTER_CONFIG, self.adapter_file]

    def close(self) -> None:
        super().close()
        self._adapter.close()


def open_model(ref: str | os.PathLike) -> Checkpoint:
    """Open a model argument: a path or Hub id, ``BASE+ADAPTER``, or a PEFT adapter directory alone."""
    from cpift.merge.hub import resolve_model

    parts = split_lora_ref(ref)
    if parts is not None:
        return _no_fp8(AdaptedCheckpoint(resolve_model(parts[0]), resolve_model(parts[1]), ref=os.fspath(ref)))
    path = resolve_model(ref)
    if is_adapter_dir(path):
        base = read_adapter_config(path).get("base_model_name_or_path")
        if not isinstance(base, str) or not base:
            raise CheckpointError(f"{path / ADAPTER_CONFIG}: base_model_name_or_path is not set; give the "
                                  f"model as BASE+{os.fspath(ref)}")
        return _no_fp8(AdaptedCheckpoint(resolve_model(base), path, ref=f"{base}+{os.fspath(ref)}"))
    return dequantized(Checkpoint(path, ref=os.fspath(ref)))  # fp8 tensors read as float32 (merge/io/fp8.py)


def _no_fp8(ckpt: AdaptedCheckpoint) -> AdaptedCheckpoint:
    bad = next((n for n, i in ckpt.tensors.items() if i.dtype in FP8), None)
    if bad is not None:
        ckpt.close()
        raise CheckpointError(f"{ckpt.path}: tensor '{bad}' is fp8; a LoRA adapter is not merged into an fp8 base "
                              f"(dequantise it first: cpift-merge passthrough {ckpt.base_ref} -o BASE-FP32)")
    return ckpt
