"""Training data: JSONL conversations → token ids with labels on the response only.

Each non-blank line is one object, either ``{"prompt": str, "response": str}`` or
``{"messages": [{"role": ..., "content": ...}, ...]}`` with at least one assistant message. Other
keys (ids, sources) are ignored. The loss counts assistant tokens only; every other label is -100,
the ``ignore_index`` of torch's cross-entropy.

Rendering. With a chat template the conversation is rendered to text once; the characters of
assistant turn i are those between the rendering of ``messages[:i]`` with the generation prompt and
the rendering of ``messages[:i+1]`` (a template renders a conversation as a prefix of its
continuation; one that does not is refused). A rendering gets RENDER_SECONDS and MAX_RENDERED
characters: a template that raises, loops or blows up is a DataError naming file:line and the
template, as is a line holding a lone surrogate (JSON's unpaired ``\\ud800``), which no tokenizer
can encode. Without a template the text is the turns' contents concatenated, the EOS token after
each assistant turn, so put separators such as "Answer:" into the prompt itself. The whole text is
tokenized in one call and a token is a label when its character span overlaps an assistant span:
tokenizing the pieces separately would split merges a BPE makes across the boundary, and training
would see token sequences the model never sees at inference.

Truncation keeps the first ``max_length`` tokens (the prompt is kept, the response end is lost) and
is counted; an example with no response token left is an error naming its file:line.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from cpift.errors import DataError
from cpift.merge.io.safe_parse import load_json_bounded

IGNORE = -100  # label of tokens the loss skips (torch.nn.functional.cross_entropy's ignore_index)
RENDER_SECONDS = 3.0  # one chat-template rendering (milliseconds normally); a template looping for ever stops
MAX_RENDERED = 2**24  # characters of one rendered conversation


@dataclass
class Record:
    """One JSONL line: where it came from and its turns as (role, content)."""

    where: str  # "file:line"
    turns: list[tuple[str, str]]


@dataclass
class Example:
    """One tokenized record. ``prompt_len`` tokens precede the last assistant turn."""

    where: str
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    reference: str  # the last assistant turn's text, for exact match
    reference_len: int  # tokens after the prompt before truncation (bounds generation)
    truncated: bool

    @property
    def targets(self) -> int:
        """Tokens the loss counts: labelled positions that have a previous token to predict them from."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


@dataclass
class Dataset:
    path: Path
    examples: list[Example]

    @property
    def truncated(self) -> int:
        return sum(e.truncated for e in self.examples)

    def __len__(self) -> int:
        return len(self.examples)


def _turns(obj: object, where: str) -> list[tuple[str, str]]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'prompt' and 'response', or 'messages'; "
                        f"got {type(obj).__name__}")
    if "messages" in obj and ("prompt" in obj or "response" in obj):
        raise DataError(f"{where}: give either 'prompt' and 'response' or 'messages', not both")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        turns = []
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: messages[{i}] needs a string 'role' and a string 'content'")
            turns.append((m["role"], m["content"]))
        if not any(role == "assistant" and content for role, content in turns):
            raise DataError(f"{where}: no non-empty assistant message, so nothing to train on")
        return turns
    if "prompt" not in obj:
        raise DataError(f"{where}: expected 'prompt' and 'response', or 'messages'; got keys {sorted(obj)}")
    if "response" not in obj:
        raise DataError(f"{where}: no 'response' field (each line needs 'prompt' and 'response', or 'messages')")
    for key in ("prompt", "response"):
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(obj[key]).__name__}")
    if not obj["response"]:
        raise DataError(f"{where}: 'response' is empty, so nothing to train on")
    return [("user", obj["prompt"]), ("assistant", obj["response"])]


def _text_only(turns: list[tuple[str, str]], where: str) -> list[tuple[str, str]]:
    """JSON's \\ud800 escapes decode to lone surrogates, which are no text: no tokenizer can encode them."""
    for i, turn in enumerate(turns):
        for part, value in zip(("role", "content"), turn):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{where}: turn {i} {part}: a lone surrogate {value[e.start]!r} at character "
                                f"{e.start} (an unpaired \\uD800-\\uDFFF escape) is not text") from None
    return turns


def read_jsonl(path: str | os.PathLike) -> list[Record]:
    """Parse and validate every line; DataError names file:line and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    records = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not valid UTF-8") from None
            if not line.strip():
                continue
            obj = load_json_bounded(line.rstrip("\r\n"), source=where, error=DataError)
            records.append(Record(where, _text_only(_turns(obj, where), where)))
    if not records:
        raise DataError(f"{path}: no examples (the file is empty or holds only blank lines)")
    return records


class _RenderTimeout(Exception):
    """Raised by the alarm inside a chat template's rendering that ran past RENDER_SECONDS."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the enclosed Python code after ``seconds`` (SIGALRM, so in the main thread only; an
    outer timer, a bench's limit, is re-armed afterwards with what is left of it, or left to fire first
    when it is due sooner)."""
    outer = signal.getitimer(signal.ITIMER_REAL)[0] if hasattr(signal, "setitimer") else None
    if outer is None or threading.current_thread() is not threading.main_thread() or 0 < outer <= seconds:
        yield
        return

    def stop(signum, frame):
        raise _RenderTimeout

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer > 0:
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer - (time.monotonic() - start)))


def _template(tokenizer, msgs: list[dict], **kw) -> str:
    """The conversation rendered by the tokenizer's chat template (a Jinja sandbox), bounded in time and
    size; anything the template raises is a DataError naming the tokenizer."""
    from jinja2 import TemplateError

    whose = f"the template of {getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}"
    try:
        with _time_limit(RENDER_SECONDS):
            text = tokenizer.apply_chat_template(msgs, tokenize=False, **kw)
    except _RenderTimeout:
        raise DataError(f"the tokenizer's chat template ran for over {RENDER_SECONDS:g} s on this conversation "
                        f"(a loop that does not end?; {whose})") from None
    except TemplateError as e:  # templates raise on e.g. roles that do not alternate
        raise DataError(f"the tokenizer's chat template refused this conversation ({_line(e)}; {whose})") from None
    except Exception as e:  # a template's own bugs: 1 / 0, a string divided, endless recursion
        raise DataError(f"the tokenizer's chat template failed on this conversation ({type(e).__name__}: "
                        f"{_line(e)}; {whose})") from None
    if not isinstance(text, str) or len(text) > MAX_RENDERED:
        size = len(text) if isinstance(text, str) else type(text).__name__
        raise DataError(f"the tokenizer's chat template rendered this conversation as {size} characters "
                        f"(at most {MAX_RENDERED:,}; {whose})")
    return text


def _line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:200] + "..."


def render(tokenizer, turns: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text, and the character spans [start, end) of its assistant turns."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": r, "content": c} for r, c in turns]
        text = _template(tokenizer, msgs)
        spans = []
        for i, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            before = _template(tokenizer, msgs[:i], add_generation_prompt=True) if i else ""
            through = _template(tokenizer, msgs[:i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise DataError("the tokenizer's chat template does not render a conversation as a prefix of "
                                "its continuation, so the response tokens cannot be located")
            spans.append((len(before), len(through)))
        return text, spans
    if tokenizer.eos_token is None:
        raise DataError("the tokenizer has neither a chat template nor an EOS token to end a response with")
    text, spans = "", []
    for role, content in turns:
        if role == "assistant":
            piece = content + tokenizer.eos_token
            spans.append((len(text), len(text) + len(piece)))
        else:
            piece = content
        text += piece
    return text, spans


def encode(tokenizer, record: Record, max_length: int) -> Example:
    """Tokenize one record; labels are the ids of tokens overlapping an assistant span, else IGNORE."""
    try:
        text, spans = render(tokenizer, record.turns)
    except DataError as e:
        raise DataError(f"{record.where}: {e}") from None
    # a chat template writes BOS itself (apply_chat_template tokenizes without special tokens too)
    templated = bool(getattr(tokenizer, "chat_template", None))
    enc = tokenizer(text, add_special_tokens=not templated, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = []
    for tok, (s, e) in zip(ids, enc["offset_mapping"]):
        # s == e: a token the post-processor added (BOS), which covers no character of the text
        inside = s < e and any(s < b and e > a for a, b in spans)
        labels.append(tok if inside else IGNORE)
    last = spans[-1][0] if record.turns[-1][0] == "assistant" else len(text)
    prompt_len = next((i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < e and e > last), len(ids))
    ex = Example(record.where, ids[:max_length], labels[:max_length], min(prompt_len, max_length),
                 record.turns[-1][1], len(ids) - prompt_len, len(ids) > max_length)
    if ex.targets == 0 and not ex.truncated:
        raise DataError(f"{record.where}: nothing to predict: the response is the text's first token, which no "
                        f"earlier token predicts; give a prompt")
    if ex.targets == 0:
        first = next((i for i, label in enumerate(labels) if label != IGNORE), len(ids))
        raise DataError(f"{record.where}: the prompt takes {first} tokens, so max length {max_length} leaves no "
                        f"response token to train on; raise --max-length or shorten the prompt")
    return ex


def load_dataset(path: str | os.PathLike, tokenizer, *, max_length: int, for_eval: bool = False) -> Dataset:
    """Read, validate and tokenize a JSONL file.

    Args:
        path: the JSONL file.
        tokenizer: a fast Hugging Face tokenizer (offsets place the labels).
        max_length: tokens kept per example (the first ones).
        for_eval: also require every conversation to end with the assistant turn that exact match
            compares against.

    Raises:
        DataError: naming file:line for a bad line, the file for an empty or missing one.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{path}: cpift needs a fast (Rust) tokenizer to place the labels; got "
                        f"{type(tokenizer).__name__}")
    if max_length < 2:
        raise DataError(f"{path}: max length must be at least 2 tokens, got {max_length}")
    records = read_jsonl(path)
    if for_eval:
        for r in records:
            if r.turns[-1][0] != "assistant":
                raise DataError(f"{r.where}: the last message must be the assistant's reply that generation "
                                f"is compared with")
    return Dataset(Path(path), [encode(tokenizer, r, max_length) for r in records])


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
