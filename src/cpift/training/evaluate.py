"""Evaluation of a causal LM on JSONL data: mean response loss and exact match of greedy generation.

loss: the cross-entropy of every response token in the file, summed and divided by their number
(a token-weighted mean, the quantity training minimises).
exact_match: the share of examples whose greedy continuation of the prompt (everything before the
last assistant turn, with the chat template's generation prompt) equals the last assistant turn
once both are stripped of surrounding whitespace. Generation stops at an end token (the
tokenizer's EOS or the model's generation-config EOS ids) or after the reference's token count + 8
new tokens, enough to see a model that does not stop.

exact_match="teacher-forced" gets the same answer without generating: greedy decoding emits the
reference's tokens and then an end token exactly when, at each of those positions, the argmax of the
logits given the reference's own prefix is the reference's token. The logits of the loss pass give
that for free (one forward pass per batch instead of one per generated token). Where the model would
write the same text through another tokenization the two can differ; a test checks them equal on a
trained model.

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

from cpift.errors import CheckpointError, ParameterError
from cpift.merge.io.checkpoint import Checkpoint
from cpift.merge.io.device import parse_device
from cpift.merge.io.model_files import read_side_files
from cpift.merge.io.stream import progress_bar
from cpift.numbers import parse_number

from .data import IGNORE, Dataset, collate, load_dataset

GENERATION_SLACK = 8  # new tokens allowed beyond the reference's length
EXACT_MATCH_MODES = ("greedy", "teacher-forced")


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

    read_side_files(path)  # transformers follows links: the files are vetted first (merge/io/model_files.py)
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None


def load_model(path: str | os.PathLike, device: torch.device) -> tuple[torch.nn.Module, torch.dtype]:
    """The model in float32 on ``device``, and the dtype its checkpoint stores (to save it back in)."""
    from transformers import AutoModelForCausalLM

    read_side_files(path)  # vetted, as the tokenizer's; Checkpoint vets the weight files
    Checkpoint(path).close()
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


def teacher_forced_hits(logits: torch.Tensor, chunk, stops: list[int]) -> list[bool]:
    """Per example: does greedy decoding reproduce the reference, read off one forward pass's logits?

    The answer runs from the prompt's end through the first end token (``stops``) of the reference; an
    example whose reference has no end token within its kept length cannot be decided so and is a miss
    (greedy generation would have to stop on a token the data does not show).
    """
    hits = []
    for row, e in enumerate(chunk):
        end = next((j for j in range(e.prompt_len, len(e.input_ids)) if e.input_ids[j] in stops), None)
        if end is None or e.prompt_len == 0:
            hits.append(False)
            continue
        want = torch.tensor(e.input_ids[e.prompt_len:end + 1], device=logits.device)
        hits.append(bool((logits[row, e.prompt_len - 1:end].argmax(-1) == want).all()))
    return hits


def _check_mode(exact_match: str) -> None:
    if exact_match not in EXACT_MATCH_MODES:
        raise ParameterError(f"exact_match: {exact_match!r} is not one of {', '.join(EXACT_MATCH_MODES)}")


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, tokenizer, data: Dataset, *, batch_size: int = 8,
                   max_new_tokens: int | None = None, progress: bool = True, exact_match: str = "greedy",
                   per_item: bool = False) -> dict:
    """Loss and exact match of an already loaded model (left in the mode it came in).

    ``exact_match``: "greedy" (generate) or "teacher-forced" (from the loss pass's logits; no generation).
    ``per_item``: also return ``items``, one ``{"where", "hit", "loss", "tokens"}`` per example, for paired tests.
    """
    _check_mode(exact_match)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    stops = _stop_ids(model, tokenizer)
    loss, targets, items = 0.0, 0, []
    bar = progress_bar("eval", len(data), progress, unit="ex")
    try:
        for start in range(0, len(data), batch_size):
            chunk = data.examples[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id(tokenizer)).items()}
            with autocast(device):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss += float(response_loss_sum(logits, batch["labels"]))
            losses = [float(response_loss_sum(logits[i:i + 1], batch["labels"][i:i + 1])) if per_item else None
                      for i in range(len(chunk))]
            targets += sum(e.targets for e in chunk)
            if exact_match == "greedy":
                texts = _greedy(model, tokenizer, chunk, device, max_new_tokens, stops)
                hits = [t.strip() == e.reference.strip() for t, e in zip(texts, chunk)]
            else:
                hits = teacher_forced_hits(logits, chunk, stops)
            items += [{"where": e.where, "hit": h, "loss": x, "tokens": e.targets}
                      for e, h, x in zip(chunk, hits, losses)]
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    result = {"loss": loss / targets, "exact_match": sum(i["hit"] for i in items) / len(data), "n": len(data)}
    return {**result, "items": items} if per_item else result


def evaluate(model: str | os.PathLike, data: str | os.PathLike, *, batch_size: int = 8, max_length: int = 1024,
             max_new_tokens: int | None = None, device: str | torch.device | None = None,
             progress: bool = True, exact_match: str = "greedy", per_item: bool = False) -> dict:
    """Mean response loss and exact match of a saved model on a JSONL file.

    Args:
        model: a Hugging Face model directory (safetensors and tokenizer).
        data: JSONL of ``{"prompt", "response"}`` or ``{"messages"}`` lines ending with the assistant turn.
        batch_size: examples per forward pass and per generation batch.
        max_length: tokens kept per example (the first ones) for the loss.
        max_new_tokens: generation budget; default: the reference's token count + 8.
        device: default CUDA when available, else the CPU.
        progress: show a tqdm bar.
        exact_match: "greedy" (generate and compare) or "teacher-forced" (the same verdict from one
            forward pass; see the module's docstring).
        per_item: also return ``items``: ``{"where", "hit", "loss", "tokens"}`` per example.

    Returns:
        ``{"loss": float, "exact_match": float in [0, 1], "n": examples}`` (and ``items``).

    Raises:
        CheckpointError, DataError, ParameterError: bad model directory, data line or option.

    Example:
        >>> evaluate("out/sft", "data/gsm8k-test.jsonl")["exact_match"]
    """
    parse_number(batch_size, "batch_size", integer=True, lo=1, hi=2**31, error=ParameterError)
    parse_number(max_length, "max_length", integer=True, lo=2, hi=2**31, error=ParameterError)
    if max_new_tokens is not None:  # generation runs this many steps at most: bounded
        parse_number(max_new_tokens, "max_new_tokens", integer=True, lo=1, hi=2**20, error=ParameterError)
    _check_mode(exact_match)
    tokenizer = load_tokenizer(model)
    dataset = load_dataset(data, tokenizer, max_length=max_length, for_eval=True)
    loaded, _ = load_model(model, pick_device(device))
    return evaluate_model(loaded, tokenizer, dataset, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          progress=progress, exact_match=exact_match, per_item=per_item)
