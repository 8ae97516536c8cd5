"""Evaluation of a causal LM on JSONL data: mean response loss and exact match of greedy generation.

loss: the cross-entropy of every response token in the file, summed and divided by their number
(a token-weighted mean, the quantity training minimises).
exact_match: the share of examples whose greedy continuation of the prompt (everything before the
last assistant turn, with the chat template's generation prompt) equals the last assistant turn
once both are stripped of surrounding whitespace. Generation stops at an end token (the
tokenizer's EOS or the model's generation-config EOS ids) or after the reference's token count + 8
new tokens, enough to see a model that does not stop.

Precision: weights upcast to float32; on CUDA the forward runs under bf16 autocast, as in training.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cpift.merge.io.device import parse_device
from cpift.errors import CheckpointError, ParameterError
from cpift.numbers import parse_number

from .data import IGNORE, Dataset, collate, load_dataset

GENERATION_SLACK = 8  # new tokens allowed beyond the reference's length


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' own progress bars and warnings (ours report the work)."""
    from transformers.utils import logging

    bars, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_text(value, *, indent: int | None = None) -> str:
    """Strict JSON of ``value``: NaN and ±Inf (a diverged loss) become null, never the invalid NaN token."""
    return json.dumps(_finite(value), indent=indent, allow_nan=False)


def pick_device(device: str | torch.device | None) -> torch.device:
    """The given device (checked to exist: ParameterError otherwise), else CUDA when available, else the CPU."""
    if device is not None:
        return parse_device(device) or torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing (float32) elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_tokenizer(path: str | os.PathLike):
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: model directory does not exist")
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None


def load_model(path: str | os.PathLike, device: torch.device) -> tuple[torch.nn.Module, torch.dtype]:
    """The model in float32 on ``device``, and the dtype its checkpoint stores (to save it back in)."""
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load the model ({str(e).splitlines()[0]})") from None
    stored = next(model.parameters()).dtype
    return model.to(device=device, dtype=torch.float32), stored


def pad_id(tokenizer) -> int:
    # Padding is masked out of attention and labels, so any id works when the tokenizer has none.
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def response_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (float32) of predicting labels[:, 1:] from logits[:, :-1], IGNORE skipped."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


def _stop_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(int(i) for i in ids if i is not None)


def _greedy(model, tokenizer, chunk, device, max_new_tokens: int | None, stops: list[int]) -> list[str]:
    """Greedy continuations of the chunk's prompts (left-padded into one batch), decoded."""
    prompts = [e.input_ids[:e.prompt_len] for e in chunk]
    width = max(len(p) for p in prompts)
    pad = pad_id(tokenizer)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    new = max_new_tokens or max(e.reference_len for e in chunk) + GENERATION_SLACK
    with autocast(device), quiet_transformers():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                             do_sample=False, pad_token_id=pad, eos_token_id=stops or None)
    texts = []
    for row in out[:, width:].tolist():
        cut = next((j for j, t in enumerate(row) if t in stops), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, tokenizer, data: Dataset, *, batch_size: int = 8,
                   max_new_tokens: int | None = None, progress: bool = True) -> dict:
    """Loss and exact match of an already loaded model (left in the mode it came in)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    stops = _stop_ids(model, tokenizer)
    loss, targets, hits = 0.0, 0, 0
    bar = tqdm(total=len(data), desc="eval", unit="ex", disable=not progress, leave=False)
    try:
        for start in range(0, len(data), batch_size):
            chunk = data.examples[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id(tokenizer)).items()}
            with autocast(device):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss += float(response_loss_sum(logits, batch["labels"]))
            targets += sum(e.targets for e in chunk)
            texts = _greedy(model, tokenizer, chunk, device, max_new_tokens, stops)
            hits += sum(t.strip() == e.reference.strip() for t, e in zip(texts, chunk))
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return {"loss": loss / targets, "exact_match": hits / len(data), "n": len(data)}


def evaluate(model: str | os.PathLike, data: str | os.PathLike, *, batch_size: int = 8, max_length: int = 1024,
             max_new_tokens: int | None = None, device: str | torch.device | None = None,
             progress: bool = True) -> dict:
    """Mean response loss and exact match of a saved model on a JSONL file.

    Args:
        model: a Hugging Face model directory (safetensors and tokenizer).
        data: JSONL of ``{"prompt", "response"}`` or ``{"messages"}`` lines ending with the assistant turn.
        batch_size: examples per forward pass and per generation batch.
        max_length: tokens kept per example (the first ones) for the loss.
        max_new_tokens: generation budget; default: the reference's token count + 8.
        device: default CUDA when available, else the CPU.
        progress: show a tqdm bar.

    Returns:
        ``{"loss": float, "exact_match": float in [0, 1], "n": examples}``.

    Raises:
        CheckpointError, DataError, ParameterError: bad model directory, data line or option.

    Example:
        >>> evaluate("out/sft", "data/gsm8k-test.jsonl")["exact_match"]
    """
    parse_number(batch_size, "batch_size", integer=True, lo=1, hi=2**31, error=ParameterError)
    parse_number(max_length, "max_length", integer=True, lo=2, hi=2**31, error=ParameterError)
    if max_new_tokens is not None:  # generation runs this many steps at most: bounded
        parse_number(max_new_tokens, "max_new_tokens", integer=True, lo=1, hi=2**20, error=ParameterError)
    tokenizer = load_tokenizer(model)
    dataset = load_dataset(data, tokenizer, max_length=max_length, for_eval=True)
    loaded, _ = load_model(model, pick_device(device))
    return evaluate_model(loaded, tokenizer, dataset, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          progress=progress)
